"""`evaluate --workers N` against one process: the wall-clock time of scoring stored test episodes with a method
that adapts to each episode (Reptile, MAML), in one process with PyTorch's intra-op threads or in N processes of
one thread each, the settings alternating round by round; and the largest score difference between them.

    .venv/bin/python scripts/benchmark_evaluation_workers.py --recipe omniglot/reptile-5w1s --data data/omniglot-random.h5 \\
        --episodes 128 --workers 2 --rounds 2 --json results/benchmark_evaluation_workers.json

The network is ``--run``'s best checkpoint or, with ``--recipe``, the recipe's method as initialised (the weights do
not change the speed). Each measurement includes the workers' start (a spawned interpreter importing torch).
"""

from __future__ import annotations

import argparse
import time

import torch

from fsltool.atomic import write_json
from fsltool.builtin_recipes import find_recipe
from fsltool.checkpoint import build_model, load_trained, model_config
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.device import machine_description
from fsltool.evaluate import episode_scores
from fsltool.methods import Method
from fsltool.platform_tuning import tune_allocator
from fsltool.recipe import load_recipe


def method_of(args: argparse.Namespace, data: FewShotData) -> tuple[Method, str]:
    """The method to time and its test shape."""
    if args.run:
        trained = load_trained(args.run)
        return trained.method, trained.recipe.test_shape
    recipe = load_recipe(find_recipe(args.recipe).path)
    torch.manual_seed(recipe.seed)
    return build_model(model_config(recipe, data.image_shape, data.mean, data.std, data.provenance)), recipe.test_shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run")
    source.add_argument("--recipe")
    parser.add_argument("--data", required=True)
    parser.add_argument("--episodes", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    tune_allocator()  # as the CLI
    with FewShotData(args.data) as data:
        method, test_shape = method_of(args, data)
        shape = EpisodeShape.parse(test_shape)
        support, query = data.stored_episodes("test", shape)
        support, query = support[: args.episodes], query[: args.episodes]
        seconds: dict[str, list[float]] = {"one process": [], f"{args.workers} workers": []}
        scores: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):
            for name, workers in (("one process", 1), (f"{args.workers} workers", args.workers)):
                start = time.perf_counter()
                scores[name] = episode_scores(method, data, shape, support, query, workers=workers)
                seconds[name].append(round(time.perf_counter() - start, 2))
    difference = float((scores["one process"] - scores[f"{args.workers} workers"]).abs().max())
    figures = {
        "command": "scripts/benchmark_evaluation_workers.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": machine_description(torch.device("cpu")), "threads_of_one_process": torch.get_num_threads(), "shape": str(shape),
        "episodes": len(support), "seconds": seconds, "max_score_difference": difference,
        "speed_up_per_round": [round(a / b, 2) for a, b in zip(*seconds.values())],
    }
    for name, values in seconds.items():
        print(f"{name}: {values} s for {len(support)} episodes of {shape}")
    print(f"speed-up per round: {figures['speed_up_per_round']}; largest score difference {difference:.2e}")
    if args.json_out:
        write_json(args.json_out, figures)


if __name__ == "__main__":
    main()
