"""Classify new images from a handful of labelled examples, with an exported ONNX model (ONNX Runtime
only: this module never imports torch) or with a trained run (PyTorch, imported only then)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsltool.data.images import IMAGE_SUFFIXES, read_image_file
from fsltool.errors import FsltoolError


@dataclass
class Prediction:
    query: str
    label: str
    score: float  # the method's raw score of the predicted class (higher is more likely)
    probability: float  # softmax of the scores over the support classes

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query, "label": self.label, "score": self.score, "probability": self.probability}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def read_support(folder: str | Path) -> tuple[list[str], list[Path], np.ndarray]:
    """A support folder holds one sub-folder per class with a few images each: (class names, paths, labels)."""
    root = Path(folder)
    if not root.is_dir():
        raise FsltoolError(f"{root}: support folder not found")
    names, paths, labels = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _images_in(class_dir)
        if not images:
            raise FsltoolError(f"{class_dir}: class folder has no images")
        labels += [len(names)] * len(images)
        names.append(class_dir.name)
        paths += images
    if len(names) < 2:
        raise FsltoolError(f"{root}: a support folder needs at least 2 class sub-folders, found {len(names)}")
    return names, paths, np.array(labels, dtype=np.int64)


def read_queries(items: list[str]) -> list[Path]:
    """Query images: files, or folders whose images are all taken."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += _images_in(path)
        elif path.is_file():
            paths.append(path)
        else:
            raise FsltoolError(f"{path}: query image or folder not found")
    if not paths:
        raise FsltoolError("no query images given")
    return paths


def load_batch(paths: list[Path], contract: dict[str, Any]) -> np.ndarray:
    """Images converted exactly as the training data was: channels, LANCZOS size, inversion, then [0, 1]."""
    if contract["input_height"] != contract["input_width"]:
        raise FsltoolError(f"non-square model input {contract['input_height']}x{contract['input_width']} is not supported")
    arrays = [
        read_image_file(str(p), channels=contract["input_channels"], size=contract["input_height"], invert=contract["invert"])
        for p in paths
    ]
    return np.stack(arrays).astype(np.float32) / 255.0


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _predictions(names: list[str], queries: list[Path], scores: np.ndarray) -> list[Prediction]:
    probabilities = _softmax(scores.astype(np.float64))
    best = scores.argmax(axis=1)
    return [Prediction(str(q), names[b], float(scores[i, b]), float(probabilities[i, b])) for i, (q, b) in enumerate(zip(queries, best))]


def predict_onnx(export_dir: str | Path, support: str, queries: list[str], device: str = "auto") -> tuple[list[Prediction], str]:
    """With an export folder (model.json + classifier.onnx): returns the predictions and the provider that ran."""
    from fsltool.runtime import OnnxModel

    folder = Path(export_dir)
    try:
        contract = json.loads((folder / "model.json").read_text())
    except (OSError, ValueError) as error:
        raise FsltoolError(f"{folder / 'model.json'}: cannot read the model contract ({error})") from None
    names, support_paths, labels = read_support(support)
    query_paths = read_queries(queries)
    try:
        model = OnnxModel(str(folder / "classifier.onnx"), device)
    except Exception as error:  # ORT raises its own exception types for missing or foreign files
        raise FsltoolError(f"{folder / 'classifier.onnx'}: not a loadable ONNX model ({str(error).splitlines()[0]})") from None
    scores = model.run({"support": load_batch(support_paths, contract), "support_labels": labels, "query": load_batch(query_paths, contract)})[0]
    return _predictions(names, query_paths, scores), model.provider


def predict_torch(run: str | Path, support: str, queries: list[str], which: str = "best") -> list[Prediction]:
    """With a run folder or checkpoint (PyTorch)."""
    import torch

    from fsltool.checkpoint import load_trained
    from fsltool.export import preprocessing_contract

    trained = load_trained(run, which)
    contract = preprocessing_contract(trained)
    names, support_paths, labels = read_support(support)
    query_paths = read_queries(queries)
    with torch.inference_mode():
        scores = trained.method(torch.from_numpy(load_batch(support_paths, contract)), torch.from_numpy(labels),
                                torch.from_numpy(load_batch(query_paths, contract))).numpy()
    return _predictions(names, query_paths, scores)
