"""Describe any file fsltool makes: a data file, a run folder or checkpoint, an exported model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fsltool.errors import FsltoolError


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


def describe(target: str | Path) -> dict[str, Any]:
    path = Path(target)
    if not path.exists():
        raise FsltoolError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "model.json").is_file():
            return {"kind": "export folder", "path": str(path), **json.loads((path / "model.json").read_text()),
                    "files": sorted(p.name for p in path.iterdir())}
        if (path / "checkpoints").is_dir():
            # the last checkpoint knows how far training went and the best validation so far
            return {**describe_checkpoint(path / "checkpoints" / "last.pt"), "kind": "run folder", "path": str(path)}
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
