"""Describe any file fsltool makes: a data file, a run folder or checkpoint, an exported model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from fsltool.errors import FsltoolError
from fsltool.folder_lock import lock_holder

RATE_WINDOW = 5  # logged training lines averaged for the current speed
TIME_LEFT_NOTE = " at that speed (validations not counted)"


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

    state = load_checkpoint(checkpoint_path(path), mmap=True)
    progress = ({"stage": "pretrain", "epochs_trained": state["epoch"], "steps_trained": state["step"]} if state.get("stage") == "pretrain"
                else {"stage": "meta-train", "episodes_trained": state["episode"]})
    return {"kind": "checkpoint", "path": str(path), "method": state["model_config"]["method"],
            "backbone": state["model_config"]["backbone"], **progress,
            "best_validation": state["best"] if math.isfinite(state["best"]["accuracy"]) else None,  # None before the first validation
            "training_seconds": round(state["elapsed"], 1),
            "machines": list(state.get("machines", [])),  # every kind it trained on (rounding differs between them)
            "fsltool_version": state["fsltool_version"],
            **({"branched_from": state["branched_from"]} if "branched_from" in state else {}), "recipe": state["recipe"]}


def logged_tail(metrics: Path, size: int = 65536) -> list[dict[str, Any]]:
    """The last records of a run's metrics log, skipping a line being written: its last ``size`` bytes, doubled
    until they hold a validation row or the whole log is read."""
    try:
        with open(metrics, "rb") as file:
            end = file.seek(0, 2)
            while True:
                start = max(0, end - size)
                file.seek(start)
                lines = file.read().decode(errors="replace").splitlines()[1 if start else 0:]  # the first may be cut
                records = [record for record in map(_json_or_none, lines) if record is not None]
                if start == 0 or any(record.get("phase") == "val" for record in records):
                    return records
                size *= 2
    except OSError:
        return []


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def run_progress(folder: Path, recipe: dict[str, Any], stage: str, trained: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a run folder's training stands now, for a run left going in the background: whether a process holds
    the folder, how long the recipe asks it to train (``trained``: episodes, pretraining epochs, checkpointed so
    far), and, from the metrics log's last ``records``, the latest logged step, its speed, the latest validation
    and (while running) the time left at that speed."""
    pretraining = stage == "pretrain"
    unit, rate_key = ("step", "steps_per_s") if pretraining else ("episode", "episodes_per_s")
    holder = lock_holder(folder)
    training = [r for r in records if r.get("phase") == "train" and unit in r]
    validations = [r for r in records if r.get("phase") == "val"]
    planned_key = "epochs_planned" if pretraining else "episodes_planned"
    planned_total = recipe["pretrain"]["epochs"] if pretraining else recipe["train"]["episodes"]
    if holder is not None:
        status = f"running (pid {holder or 'not yet written'})"
    else:
        status = "finished" if trained >= planned_total else "stopped"
    progress: dict[str, Any] = {"status": status, planned_key: planned_total}
    if not pretraining:  # a range of shots (20w1-5s2q) is only seen here, not in the validation rows
        progress["train_shape"] = str(recipe["train"]["shape"])
    if status == "stopped":  # the folder's recipe.yaml is the one its last start resolved
        progress["resume"] = f"fsltool {stage} {folder / 'recipe.yaml'} --resume"
    if training:
        latest = training[-1]
        rates = [r[rate_key] for r in training[-RATE_WINDOW:] if r.get(rate_key)]
        progress[f"latest_logged_{unit}"] = latest[unit]
        if rates:
            progress[rate_key] = round(sum(rates) / len(rates), 3)
        planned = progress[planned_key]
        if pretraining:
            planned = round(planned * latest["step"] / latest["epoch"]) if latest.get("epoch") else 0  # steps per epoch from the log
        if holder is not None and rates and planned:
            progress["time_left"] = duration(max(0, planned - latest[unit]) / progress[rate_key]) + TIME_LEFT_NOTE
    if validations:
        progress["latest_validation"] = {key: validations[-1][key] for key in (unit, "epoch", "accuracy", "ci95", "shape") if key in validations[-1]}
    return progress


def describe_run_folder(path: Path) -> dict[str, Any]:
    """The last checkpoint (how far training went, the best validation so far), the folder's recipe.yaml (what its
    last start asked for: a resumed run may have raised ``train.episodes``) and the log (what came since); a run
    before its first checkpoint is described from its recipe.yaml and log alone."""
    try:
        recipe = yaml.safe_load((path / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        recipe = None
    records = logged_tail(path / "metrics.jsonl")
    last = path / "checkpoints" / "last.pt"
    if last.exists():
        checkpoint = {key: value for key, value in describe_checkpoint(last).items() if key not in ("kind", "path")}
        trained = checkpoint["epochs_trained"] if checkpoint["stage"] == "pretrain" else checkpoint["episodes_trained"]
        progress = run_progress(path, recipe if isinstance(recipe, dict) else checkpoint["recipe"], checkpoint["stage"], trained, records)
        return {"kind": "run folder", "path": str(path), **progress, **checkpoint}
    if not isinstance(recipe, dict):
        raise FsltoolError(f"{path}: a run folder with neither a checkpoint nor a readable recipe.yaml")
    logged_steps = any("step" in record for record in records)
    stage = "pretrain" if logged_steps or recipe.get("pretrain", {}).get("epochs", 0) > 0 else "meta-train"
    return {"kind": "run folder", "path": str(path), **run_progress(path, recipe, stage, 0, records), "stage": stage,
            "checkpoint": "none yet", "method": recipe.get("method"), "backbone": recipe.get("backbone"), "recipe": recipe}


def run_folders_under(root: Path, depth: int = 3) -> list[Path]:
    """The run folders (those with a checkpoints/ folder) at most ``depth`` levels below ``root``, sorted by path;
    nothing is looked for inside a run folder, nor in a folder that cannot be read."""
    found, level = [], [root]
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for child in children:
                (found if (child / "checkpoints").is_dir() else below).append(child)
        level = below
    return sorted(found)


def describe_runs(root: Path) -> dict[str, Any]:
    """Where every run folder under ``root`` stands (a folder of background runs, at a glance); a folder that
    cannot be read is listed with its error instead of stopping the listing."""
    runs = []
    for folder in run_folders_under(root):
        try:
            details = describe_run_folder(folder)
        except FsltoolError as error:
            runs.append({"path": str(folder), "error": str(error)})
            continue
        pretraining = details.get("stage") == "pretrain"
        unit = "epoch" if pretraining else "episode"
        runs.append({"path": str(folder), "stage": details.get("stage"), "method": details.get("method"), "status": details["status"],
                     f"{unit}s_trained": details.get(f"{unit}s_trained", 0), f"{unit}s_planned": details[f"{unit}s_planned"],
                     **{key: details[key] for key in ("latest_logged_episode", "best_validation", "latest_validation", "time_left")
                        if key in details}})
    return {"kind": "run folders", "path": str(root), "runs": runs}


def describe(target: str | Path) -> dict[str, Any]:
    path = Path(target)
    if not path.exists():
        from fsltool.builtin_recipes import shipped_starting_point

        path = shipped_starting_point(str(target))  # a recipe's ``init: NAME.pt`` names a shipped checkpoint this way
        if path is None:
            raise FsltoolError(f"{target}: no such file or folder")
    if path.is_dir():
        if (path / "model.json").is_file():
            return {"kind": "export folder", "path": str(path), **json.loads((path / "model.json").read_text()),
                    "files": sorted(p.name for p in path.iterdir())}
        if (path / "checkpoints").is_dir():
            return describe_run_folder(path)
        if run_folders_under(path):
            return describe_runs(path)
        raise FsltoolError(f"{path}: neither a run folder, an export folder nor a folder of run folders")
    with open(path, "rb") as file:
        magic = file.read(8)
    if magic.startswith(b"\x89HDF"):
        from fsltool.data.store import FewShotData

        with FewShotData(path, in_memory_limit=0) as data:
            return {"kind": "data file", **data.describe()}
    if path.suffix == ".onnx":
        return describe_onnx(path)
    return describe_checkpoint(path)
