"""A run's accuracy on the stored Omniglot episodes that hold two rotations of one character, and on the others.

With rotations as classes (the Vinyals protocol, `prepare omniglot`'s default) an episode may draw, say,
``Tengwar/character05/rot000`` and ``Tengwar/character05/rot180`` as two of its classes; for a character that is
symmetric under that rotation the two classes are the same images, and no method can tell them apart. The
reference code of the Relation Network (a whole episode rotated at once) and Reptile (upright test characters)
never draws such pairs, so this split of the stored episodes shows how much of a gap to their numbers such
episodes account for.

    .venv/bin/python scripts/omniglot_rotation_siblings.py runs/omniglot/relationnet-5w1s-trainval-20k --checkpoint last --shape 20w1s
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from fsltool.atomic import write_json
from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.evaluate import EvalResult, episode_indices, evaluate
from fsltool.platform_tuning import tune_allocator


def with_rotation_siblings(data: FewShotData, support: np.ndarray, way: int) -> np.ndarray:
    """(E,) bool: the episode's classes include two rotations of one character (class names ``A/charNN/rotDDD``)."""
    classes = np.searchsorted(data.class_start, support, side="right") - 1
    characters = [{data.class_names[c].rsplit("/", 1)[0] for c in row} for row in classes]
    return np.array([len(chars) < way for chars in characters])


def summary(result: EvalResult, episodes: np.ndarray) -> dict[str, float]:
    """Mean accuracy and 95% CI (as ``evaluate`` reports them) over the chosen episodes of ``result``."""
    part = replace(result, accuracies=result.accuracies[episodes])
    return {"episodes": int(episodes.sum()), "accuracy": round(part.accuracy, 2), "ci95": round(part.ci95, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best")
    parser.add_argument("--shape", default=None, help="stored test shape (default: the run's test_shape)")
    parser.add_argument("--transductive", action="store_true")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    tune_allocator()  # as the CLI
    trained = load_trained(args.run, args.checkpoint)
    shape = EpisodeShape.parse(args.shape or trained.recipe.test_shape)
    with FewShotData(trained.recipe.data) as data:
        support, _, _ = episode_indices(data, "test", shape, None, None)
        siblings = with_rotation_siblings(data, support, shape.way)
        result = evaluate(trained.method, data, "test", shape, query_batch_statistics=args.transductive)
    figures = {
        "run": args.run, "checkpoint": args.checkpoint, "shape": str(shape), "transductive": result.transductive,
        "all": summary(result, np.ones_like(siblings)),
        "with_rotation_siblings": summary(result, siblings),
        "without": summary(result, ~siblings),
    }
    write_json("-", figures)
    if args.json_out:
        write_json(args.json_out, figures)


if __name__ == "__main__":
    main()
