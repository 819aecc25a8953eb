"""Accuracy of a trained MAML or first-order MAML run at other inner learning rates and step counts, without
retraining: whether the recipe's inner loop suits the features it adapts (a pretrained body, say).

    OMP_NUM_THREADS=1 python scripts/sweep_inner_lr.py runs/omniglot/maml-20w5s-pretrained --shape 20w1s15q \\
        --lr 0.1 --lr 0.2 --lr 0.4 --lr 1.0 --steps 5 --steps 10 --json results/sweep.json

Each cell is scored on the same freshly sampled, seeded episodes of ``--split`` (validation by default: the test
split stays unseen while a recipe is chosen). MAML++ runs with learned inner learning rates are refused: their
rates are weights of the run, not a setting.
"""

from __future__ import annotations

import click

from fsltool.atomic import write_json
from fsltool.checkpoint import load_trained, with_method_options
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.device import resolve_device
from fsltool.evaluate import evaluate


@click.command()
@click.argument("run")
@click.option("--shape", required=True, help="episode shape, e.g. 20w1s15q")
@click.option("--lr", "rates", type=float, multiple=True, required=True, help="an inner learning rate (repeat)")
@click.option("--steps", "step_counts", type=int, multiple=True, default=(5,), show_default=True, help="inner steps (repeat)")
@click.option("--split", default="val", show_default=True)
@click.option("--episodes", default=100, show_default=True, help="sampled episodes per cell")
@click.option("--sample-seed", default=1, show_default=True)
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the cells as JSON")
def main(run: str, shape: str, rates: tuple[float, ...], step_counts: tuple[int, ...], split: str, episodes: int,
         sample_seed: int, which: str, device: str, json_out: str | None) -> None:
    trained = load_trained(run, which)
    options = trained.config["method_options"]
    if trained.config["method"] != "maml" or options.get("learn_inner_lr"):
        raise click.ClickException(f"{run}: a maml run with a set inner_lr is needed (method {trained.config['method']}, "
                                   f"learn_inner_lr {options.get('learn_inner_lr', False)})")
    target = resolve_device(device, "--device")
    episode_shape = EpisodeShape.parse(shape)
    cells = []
    with FewShotData(trained.recipe.data) as data:
        for steps in step_counts:
            for rate in rates:
                method = with_method_options(trained.method, trained.config, f"--lr {rate} --steps {steps}",
                                             inner_lr=rate, test_inner_steps=steps).to(target)
                result = evaluate(method, data, split, episode_shape, episodes=episodes, sample_seed=sample_seed)
                cells.append({"inner_lr": rate, "steps": steps, "accuracy": result.accuracy, "ci95": result.ci95})
                marker = " (the recipe's)" if (rate, steps) == (options["inner_lr"], options["test_inner_steps"]) else ""
                click.echo(f"inner_lr {rate:g}, {steps} steps: {result.accuracy:.2f} ± {result.ci95:.2f}%{marker}")
    if json_out:
        payload = {"run": run, "checkpoint": which, "split": split, "shape": str(episode_shape), "episodes": episodes,
                   "sample_seed": sample_seed, "cells": cells}
        write_json(json_out, payload)


if __name__ == "__main__":
    main()
