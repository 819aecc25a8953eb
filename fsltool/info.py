"""Describe any file fsltool makes: a data file, a run folder or checkpoint, an exported model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fsltool.errors import FsltoolError
from fsltool.folder_lock import lock_holder

RATE_WINDOW = 5  # logged training lines averaged for the current speed


def describe_onnx(path: Path) -> dict[str, Any]:
    """Inputs, outputs and metadata of an ONNX model, read with ONNX Runtime alone."""
    from fsltool.runtime import create_session

    try:
        session = create_session(str(path), "cpu")
    except Exception as error:  # ORT's own exception types
        raise FsltoolError(f"{path}: not a loadable ONNX model ({str(error).splitlines()[0][:200]})") from None
    def io(args: list[Any]) -> list[dict[str, Any]]:
        return [{"name": a.name, "type": a.type, "shape": a.shape} for a in args]

    return {"kind": "onnx model", "path": str(path), "inputs": io(session.get_inputs()), "outputs": io(session.get_outputs()),
            "metadata": session.get_modelmeta().custom_metadata_map}


def describe_checkpoint(path: Path) -> dict[str, Any]:
    from fsltool.checkpoint import checkpoint_path, load_checkpoint

    state = load_checkpoint(checkpoint_path(path))
    progress = ({"stage": "pretrain", "epochs_trained": state["epoch"], "steps_trained": state["step"]} if state.get("stage") == "pretrain"
                else {"stage": "meta-train", "episodes_trained": state["episode"]})
    return {"kind": "checkpoint", "path": str(path), "method": state["model_config"]["method"],
            "backbone": state["model_config"]["backbone"], **progress,
            "best_validation": state["best"], "training_seconds": round(state["elapsed"], 1),
            "fsltool_version": state["fsltool_version"], "recipe": state["recipe"]}


def logged_tail(metrics: Path, size: int = 65536) -> list[dict[str, Any]]:
    """The last records of a run's metrics log (its last ``size`` bytes), skipping a line being written."""
    try:
        with open(metrics, "rb") as file:
            file.seek(max(0, file.seek(0, 2) - size))
            lines = file.read().decode(errors="replace").splitlines()[1:]  # the first may be cut
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def run_progress(folder: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Where a run folder's training stands now, for a run left going in the background: whether a process holds
    the folder, how long the recipe asks it to train, and, from the metrics log, the latest logged step, its speed,
    the latest validation and (while running) the time left at that speed."""
    pretraining = state.get("stage") == "pretrain"
    unit, rate_key = ("step", "steps_per_s") if pretraining else ("episode", "episodes_per_s")
    holder = lock_holder(folder)
    records = logged_tail(folder / "metrics.jsonl")
    training = [r for r in records if r.get("phase") == "train" and unit in r]
    validations = [r for r in records if r.get("phase") == "val"]
    progress: dict[str, Any] = {"status": "stopped" if holder is None else f"running (pid {holder or 'not yet written'})"}
    if pretraining:
        progress["epochs_planned"] = state["recipe"]["pretrain"]["epochs"]
        unfinished = state["epochs_trained"] < progress["epochs_planned"]
    else:
        progress["episodes_planned"] = state["recipe"]["train"]["episodes"]
        unfinished = state["episodes_trained"] < progress["episodes_planned"]
    if holder is None and unfinished:  # the folder's recipe.yaml is the one its last start resolved
        progress["resume"] = f"fsltool {'pretrain' if pretraining else 'meta-train'} {folder / 'recipe.yaml'} --resume"
    if training:
        latest = training[-1]
        rates = [r[rate_key] for r in training[-RATE_WINDOW:] if r.get(rate_key)]
        progress[f"latest_logged_{unit}"] = latest[unit]
        if rates:
            progress[rate_key] = round(sum(rates) / len(rates), 3)
        planned = progress.get("episodes_planned")
        if pretraining and latest.get("epoch"):
            planned = round(progress["epochs_planned"] * latest["step"] / latest["epoch"])  # steps per epoch from the log
        if holder is not None and rates and planned:
            progress["time_left"] = duration(max(0, planned - latest[unit]) / progress[rate_key]) + " at that speed (validations not counted)"
    if validations:
        progress["latest_validation"] = {key: validations[-1][key] for key in (unit, "epoch", "accuracy", "ci95", "shape") if key in validations[-1]}
    return progress


def describe(target: str | Path) -> dict[str, Any]:
    path = Path(target)
    if not path.exists():
        raise FsltoolError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "model.json").is_file():
            return {"kind": "export folder", "path": str(path), **json.loads((path / "model.json").read_text()),
                    "files": sorted(p.name for p in path.iterdir())}
        if (path / "checkpoints").is_dir():
            # the last checkpoint knows how far training went and the best validation so far; the log, what came since
            checkpoint = {key: value for key, value in describe_checkpoint(path / "checkpoints" / "last.pt").items()
                          if key not in ("kind", "path")}
            return {"kind": "run folder", "path": str(path), **run_progress(path, checkpoint), **checkpoint}
        raise FsltoolError(f"{path}: neither a run folder nor an export folder")
    with open(path, "rb") as file:
        magic = file.read(8)
    if magic.startswith(b"\x89HDF"):
        from fsltool.data.store import FewShotData

        with FewShotData(path, in_memory_limit=0) as data:
            return {"kind": "data file", **data.describe()}
    if path.suffix == ".onnx":
        return describe_onnx(path)
    return describe_checkpoint(path)
