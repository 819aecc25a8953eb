"""PNG figures where people would rather look than read: a run's learning curves, and one stored episode laid
out as a grid (support, queries, and a trained model's predictions). Rendered off-screen with matplotlib."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fsltool.atomic import atomic_path  # noqa: E402
from fsltool.errors import FsltoolError  # noqa: E402
from fsltool.runs import RunFolder  # noqa: E402

CORRECT, WRONG = "#1a7f37", "#cf222e"


def read_metrics(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training and validation rows of a run's metrics.jsonl."""
    folder = RunFolder(run)
    path = folder.metrics
    if not path.is_file():
        raise FsltoolError(f"{path}: cannot read the run's metrics (no such file)")
    rows = folder.rows()
    train = [r for r in rows if r.get("phase") == "train"]
    val = [r for r in rows if r.get("phase") == "val"]
    if not train and not val:
        raise FsltoolError(f"{path}: no training or validation rows yet")
    return train, val


def _save(figure: plt.Figure, out: Path) -> Path:
    """Write atomically: an existing PNG is replaced only by a complete new one."""
    try:
        with atomic_path(out) as temporary:
            figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)
    return out


def _progress(row: dict[str, Any]) -> tuple[str, float]:
    """A row's place in its run: meta-training counts episodes (meta-steps), pretraining optimizer steps."""
    return ("episode", row["episode"]) if "episode" in row else ("step", row["step"])


def plot_learning_curves(run: str | Path, out: str | Path | None = None) -> Path:
    """Loss, training and validation accuracy (± 95% CI) against episodes (pretraining: steps), and validation
    accuracy against wall time: the three questions asked of a run (is it learning, is it overfitting, was it worth
    the time)."""
    run = Path(run)
    train, val = read_metrics(run)
    unit = _progress((train or val)[0])[0]
    figure, (loss_ax, acc_ax, time_ax) = plt.subplots(1, 3, figsize=(15, 4))
    figure.suptitle(f"{run}", fontsize=10)
    if train:
        steps = [_progress(r)[1] for r in train]
        loss_ax.plot(steps, [r["loss"] for r in train], color="#555")
        acc_ax.plot(steps, [r["accuracy"] for r in train], label=f"training {'episodes' if unit == 'episode' else 'batches'}", color="#999")
    loss_ax.set(xlabel=unit, ylabel="training loss", title="loss")
    if val:
        steps, accuracy = [_progress(r)[1] for r in val], np.array([r["accuracy"] for r in val])
        ci95 = np.array([r.get("ci95", 0.0) for r in val])
        acc_ax.plot(steps, accuracy, marker="o", label=f"validation ({val[-1].get('shape', '')})", color="#0969da")
        acc_ax.fill_between(steps, accuracy - ci95, accuracy + ci95, alpha=0.2, color="#0969da")
        minutes = [r["elapsed"] / 60 for r in val]
        time_ax.plot(minutes, accuracy, marker="o", color="#0969da")
        time_ax.fill_between(minutes, accuracy - ci95, accuracy + ci95, alpha=0.2, color="#0969da")
        best = int(accuracy.argmax())
        acc_ax.annotate(f"best {accuracy[best]:.2f}", (steps[best], accuracy[best]), textcoords="offset points", xytext=(0, -16), ha="center")
    acc_ax.set(xlabel=unit, ylabel="accuracy (%)", title="accuracy")
    acc_ax.legend(loc="lower right")
    time_ax.set(xlabel="wall time (min, incl. validation)", ylabel="validation accuracy (%)", title="accuracy against time")
    for ax in (loss_ax, acc_ax, time_ax):
        ax.grid(alpha=0.3)
    return _save(figure, Path(out) if out else run / "curves.png")


@dataclass
class TimeCurve:
    """A run's validation accuracy against wall-clock minutes since its campaign began: a run started from
    another (``init:``) begins when what it started from was made, and carries that run's curve as ``before``."""

    label: str
    minutes: np.ndarray
    accuracy: np.ndarray
    ci95: np.ndarray
    shape: str
    before: TimeCurve | None = None
    start: float = 0.0  # minutes spent before this run began


def _run_beside(path: Path, run: Path) -> Path | None:
    """The run folder ``path``, where it is or, for run folders moved together (committed evidence), the folder
    of that name beside ``run``; None if neither holds metrics."""
    for candidate in (path, run.parent / path.name):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def _started_from(run: Path) -> tuple[TimeCurve | None, float]:
    """What a run started from (its recipe's ``init``): that run's curve, if found, and the minutes it cost. A run
    folder counts whole (its best checkpoint is only known once it ends); a checkpoint file counts up to its own
    time, its run's curve cut there (the run named in the checkpoint's recipe, where that says or beside this
    one; not drawn if neither has it)."""
    import yaml

    from fsltool.builtin_recipes import init_path
    from fsltool.checkpoint import load_checkpoint

    recipe = run / "recipe.yaml"
    init = (yaml.safe_load(recipe.read_text()) or {}).get("init") if recipe.is_file() else None
    if not init:
        return None, 0.0
    folder = _run_beside(Path(init), run)
    if folder is not None:
        curve = time_curve(folder)
        return curve, float(curve.minutes[-1])
    path = init_path(init)
    if path.is_dir():
        raise FsltoolError(f"{run}: started from init run {init}, whose metrics.jsonl is in neither {init} nor {run.parent}")
    state = load_checkpoint(path, mmap=True)
    writer = _run_beside(Path(state["recipe"]["output"]), run)
    curve = _curve(writer, until=state["elapsed"]) if writer is not None else None  # None: no validation before it
    return curve, (curve.start if curve is not None else 0.0) + state["elapsed"] / 60


def _curve(run: Path, until: float | None = None) -> TimeCurve | None:
    """``run``'s curve (``until``: its validations up to that many seconds of its own training); None without any."""
    val = [row for row in read_metrics(run)[1] if until is None or row["elapsed"] <= until]
    if not val:
        return None
    before, start = _started_from(run)
    return TimeCurve(str(run), start + np.array([r["elapsed"] / 60 for r in val]), np.array([r["accuracy"] for r in val]),
                     np.array([r.get("ci95", 0.0) for r in val]), str(val[-1].get("shape", "")), before, start)


def time_curve(run: str | Path) -> TimeCurve:
    run = Path(run)
    curve = _curve(run)
    if curve is None:
        raise FsltoolError(f"{run / 'metrics.jsonl'}: no validation rows to plot")
    return curve


def plot_time_to_accuracy(runs: list[str | Path], out: str | Path) -> Path:
    """Validation accuracy (± 95% CI) against wall-clock minutes for several runs on one axis: which approach
    reaches an accuracy first. A run started from another is drawn after it, the earlier run dashed."""
    curves = [time_curve(run) for run in runs]
    shapes = {curve.shape for curve in curves}
    if len(shapes) > 1:
        raise FsltoolError(f"runs validate on different episode shapes ({', '.join(sorted(shapes))}): their accuracies do not compare")
    figure, ax = plt.subplots(figsize=(8, 5))
    for curve in curves:
        line = ax.plot(curve.minutes, curve.accuracy, marker="o", markersize=3, label=curve.label)[0]
        ax.fill_between(curve.minutes, curve.accuracy - curve.ci95, curve.accuracy + curve.ci95, alpha=0.15, color=line.get_color())
        earlier = curve.before
        while earlier is not None:
            other_shape = f", {earlier.shape}" if earlier.shape != curve.shape else ""
            ax.plot(earlier.minutes, earlier.accuracy, linestyle="--", color=line.get_color(), alpha=0.7,
                    label=f"{earlier.label} (before{other_shape})")
            earlier = earlier.before
    ax.set(xlabel="wall-clock minutes (training and validation)", ylabel=f"validation accuracy (%), {shapes.pop()}",
           title="time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(figure, Path(out))


@dataclass
class EpisodeView:
    """What the grid shows: images (N, C, H, W) in [0, 1], class by class, and optional predictions."""

    support: np.ndarray
    query: np.ndarray
    way: int
    shot: int
    predictions: np.ndarray | None  # (way*query,) predicted class per query, or None
    title: str


def _as_picture(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    return (image[0], "gray") if image.shape[0] == 1 else (image.transpose(1, 2, 0), None)


def plot_episode_grid(view: EpisodeView, out: str | Path) -> Path:
    """One row per class: its support images, a gap, then its queries framed green (right) or red (wrong)
    with the predicted class written under a wrong one."""
    queries = len(view.query) // view.way
    columns = view.shot + 1 + queries
    figure, axes = plt.subplots(view.way, columns, figsize=(0.6 * columns + 0.6, 0.65 * view.way + 0.6), squeeze=False)
    for row in range(view.way):
        for column in range(columns):
            ax = axes[row, column]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if column == view.shot:  # the gap between support and queries
                continue
            if column < view.shot:
                picture, cmap = _as_picture(view.support[row * view.shot + column])
            else:
                index = row * queries + column - view.shot - 1
                picture, cmap = _as_picture(view.query[index])
                if view.predictions is not None:
                    right = int(view.predictions[index]) == row
                    for spine in ax.spines.values():
                        spine.set_visible(True)
                        spine.set_color(CORRECT if right else WRONG)
                        spine.set_linewidth(2.5)
                    if not right:
                        ax.set_xlabel(f"→{int(view.predictions[index])}", color=WRONG, fontsize=7, labelpad=1)
            ax.imshow(picture, cmap=cmap, vmin=0, vmax=1)
        axes[row, 0].set_ylabel(str(row), rotation=0, labelpad=10, va="center")
    axes[0, 0].set_title("support", fontsize=8, loc="left")
    axes[0, view.shot + 1].set_title("queries", fontsize=8, loc="left")
    figure.suptitle(view.title, fontsize=9)
    return _save(figure, Path(out))


def stored_episode_view(data_path: str | Path, split: str, shape_text: str, index: int, trained: Any = None) -> EpisodeView:
    """Stored episode ``index`` of ``split`` and ``shape_text``; with a trained model (checkpoint.TrainedModel),
    its predictions too, computed as evaluation computes them (eval mode, no gradients unless it adapts)."""
    import torch

    from fsltool.data.episodes import EpisodeShape
    from fsltool.data.store import FewShotData

    shape = EpisodeShape.parse(shape_text)
    with FewShotData(data_path) as data:
        support, query = data.stored_episodes(split, shape)
        if not 0 <= index < len(support):
            raise FsltoolError(f"{data.path}: --index {index} is out of range ({len(support)} stored {split} {shape} episodes)")
        episode = data.episode(support[index], query[index], shape)
    title = f"{Path(data_path).name}: {split} episode {index} ({shape})"
    predictions = None
    if trained is not None:
        with torch.no_grad():
            scores = trained.method(episode.support, episode.support_labels, episode.query)
        predicted = scores.argmax(-1)
        predictions = predicted.numpy()
        accuracy = 100 * (predicted == episode.query_labels).float().mean().item()
        title += f" — {trained.config['method']} ({trained.path}): {accuracy:.1f}% correct"
    return EpisodeView(episode.support.numpy(), episode.query.numpy(), shape.way, shape.shot, predictions, title)
