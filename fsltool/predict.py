"""Classify new images from a handful of labelled examples, with an exported ONNX model (ONNX Runtime
only: this module never imports torch) or with a trained run (PyTorch, imported only then); or against classes
enrolled once (``fsltool enroll``), with ONNX Runtime alone and no support folder."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fsltool.confidence import Calibration, softmax
from fsltool.data.images import IMAGE_SUFFIXES, read_image_file
from fsltool.errors import FsltoolError

if TYPE_CHECKING:  # annotations only: importing either here would load torch or ONNX Runtime for every user
    from fsltool.methods import Method
    from fsltool.runtime import OnnxModel


ENROLLED_FILE = "enrolled.json"  # marks an enrolled folder (fsltool.enroll writes it beside classifier.onnx)


@dataclass
class Ranked:
    label: str
    score: float
    probability: float

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score, "probability": self.probability}


@dataclass
class Prediction:
    query: str
    nearest: str  # the best-scored class, whether or not the query passed the open-set threshold
    score: float  # the method's raw score of that class (higher is more likely)
    probability: float  # softmax of the scores over the support classes (divided by the model's temperature, if any)
    top: list[Ranked] = field(default_factory=list)  # the K best classes, best first, when K > 1 was asked for
    unknown: bool | None = None  # below the model's open-set threshold ("none of these"); None: the model has none

    @property
    def label(self) -> str | None:
        """The predicted class, or None for a query rejected as unknown: code that reads ``label`` cannot take a
        rejected query's nearest class for an answer by forgetting to look at ``unknown``."""
        return None if self.unknown else self.nearest

    def to_json(self) -> dict[str, Any]:
        """A rejected query's label is null, its best class is "nearest"; without a threshold neither key changes."""
        ranked = {"top": [r.to_json() for r in self.top]} if self.top else {}
        rejection = {} if self.unknown is None else {"unknown": self.unknown, "nearest": self.nearest}
        return {"query": self.query, "label": self.label, **rejection, "score": self.score, "probability": self.probability, **ranked}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def read_support(folder: str | Path, min_classes: int = 2) -> tuple[list[str], list[Path], np.ndarray]:
    """A support folder holds one sub-folder per class with a few images each: (class names, paths, labels).
    Enrolment takes a single class (``min_classes=1``): it adds to classes enrolled before."""
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
    if len(names) < min_classes:
        raise FsltoolError(f"{root}: a support folder needs at least {min_classes} class sub-folder{'s' * (min_classes > 1)}, found {len(names)}")
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


def image_options(contract: Mapping[str, Any]) -> dict[str, Any]:
    """How the contract converts an image (fsltool.data.images.convert_image's options): channels, square size, inversion."""
    if contract["input_height"] != contract["input_width"]:
        raise FsltoolError(f"non-square model input {contract['input_height']}x{contract['input_width']} is not supported")
    return {"channels": contract["input_channels"], "size": contract["input_height"], "invert": contract["invert"]}


def load_batch(paths: list[Path], contract: Mapping[str, Any]) -> np.ndarray:
    """Images converted exactly as the training data was: channels, LANCZOS size, inversion, then [0, 1]."""
    options = image_options(contract)
    return np.stack([read_image_file(str(p), **options) for p in paths]).astype(np.float32) / 255.0


def _predictions(names: list[str], queries: list[Path], scores: np.ndarray, top: int = 1,
                 calibration: Calibration | None = None) -> list[Prediction]:
    """The best class of each query and, with ``top`` > 1, its ``top`` best (at most every class), best first;
    probabilities at the ``calibration``'s temperature, and queries below its open-set threshold marked unknown."""
    if top < 1:
        raise FsltoolError(f"--top must be at least 1, got {top}")
    temperature = calibration.temperature if calibration is not None else 1.0
    probabilities = softmax(scores, temperature)
    threshold = calibration.open_set if calibration is not None else None
    unknown = [None] * len(scores) if threshold is None else (~threshold.accepted(scores, temperature)).tolist()
    order = np.argsort(-scores, axis=1, kind="stable")[:, : min(top, len(names))]
    predictions = []
    for query, row, ranks, probability, rejected in zip(queries, scores, order, probabilities, unknown):
        ranked = [Ranked(names[c], float(row[c]), float(probability[c])) for c in ranks]
        best = ranked[0]
        predictions.append(Prediction(str(query), best.label, best.score, best.probability, ranked if top > 1 else [], rejected))
    return predictions


def metadata_calibration(entry: str | Mapping[str, Any] | None, source: str) -> Calibration | None:
    """The calibration an export or enrolment carries (ONNX metadata holds it as a JSON string, model.json as an
    object), or None for a model exported without one."""
    if entry is None:
        return None
    try:
        payload = json.loads(entry) if isinstance(entry, str) else entry
    except ValueError as error:
        raise FsltoolError(f"{source}: unreadable calibration metadata ({error})") from None
    return Calibration.from_json(payload, source)


def is_enrolled(folder: str | Path) -> bool:
    """An enrolled folder classifies queries alone; an export folder needs a support folder."""
    return (Path(folder) / ENROLLED_FILE).is_file()


def open_onnx(path: Path, device: str = "auto") -> OnnxModel:
    """An ONNX Runtime model for ``path``, or a one-line error naming the file."""
    from fsltool.runtime import OnnxModel

    try:
        return OnnxModel(str(path), device)
    except Exception as error:  # ORT raises its own exception types for missing or foreign files
        raise FsltoolError(f"{path}: not a loadable ONNX model ({str(error).splitlines()[0]})") from None


def enrolled_metadata(model: OnnxModel, path: Path) -> tuple[list[str], dict[str, Any]]:
    """The class names and the preprocessing contract in an enrolled graph's own metadata, so they always belong
    to the graph that scores."""
    metadata = model.session.get_modelmeta().custom_metadata_map
    try:
        names = json.loads(metadata["classes"])
        contract = {key: json.loads(metadata[key]) for key in ("input_channels", "input_height", "input_width", "invert")}
    except (KeyError, ValueError) as error:
        raise FsltoolError(f"{path}: not an enrolled classifier (metadata {error} missing or unreadable)") from None
    return names, contract


def read_contract(export_dir: str | Path) -> dict[str, Any]:
    """An export folder's preprocessing contract and graphs (its model.json)."""
    path = Path(export_dir) / "model.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FsltoolError(f"{path}: cannot read the model contract ({error})") from None


def predict_enrolled(enrolled_dir: str | Path, queries: list[str], device: str = "auto", top: int = 1) -> tuple[list[Prediction], str]:
    """Classify ``queries`` against the classes enrolled in ``enrolled_dir`` (ONNX Runtime only, no torch): the
    predictions and the provider that ran.

    Example (a notebook): ``predictions, _ = predict_enrolled("enrolled/", ["query.png"], top=3)``
    """
    path = Path(enrolled_dir) / "classifier.onnx"
    query_paths = read_queries(queries)
    model = open_onnx(path, device)
    names, contract = enrolled_metadata(model, path)
    scores = model.run({"images": load_batch(query_paths, contract)})[0]
    calibration = metadata_calibration(model.session.get_modelmeta().custom_metadata_map.get("calibration"), str(path))
    return _predictions(names, query_paths, scores, top, calibration), model.provider


def predict_onnx(export_dir: str | Path, support: str, queries: list[str], device: str = "auto", top: int = 1) -> tuple[list[Prediction], str]:
    """With an export folder (model.json + classifier.onnx): returns the predictions and the provider that ran."""
    folder = Path(export_dir)
    contract = read_contract(folder)
    names, support_paths, labels = read_support(support)
    query_paths = read_queries(queries)
    model = open_onnx(folder / "classifier.onnx", device)
    scores = model.run({"support": load_batch(support_paths, contract), "support_labels": labels, "query": load_batch(query_paths, contract)})[0]
    calibration = metadata_calibration(contract.get("calibration"), str(folder / "model.json"))
    return _predictions(names, query_paths, scores, top, calibration), model.provider


def torch_scores(method: Method, support: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
    """A method's scores (queries, classes) for a support set and queries already preprocessed by its contract."""
    import torch

    with torch.inference_mode():
        return method(torch.from_numpy(support), torch.from_numpy(labels), torch.from_numpy(query)).numpy()


def predict_torch(run: str | Path, support: str, queries: list[str], which: str = "best", top: int = 1) -> list[Prediction]:
    """With a run folder or checkpoint (PyTorch), and the run's calibration when it has one (fsltool calibrate)."""
    from fsltool.calibration import load_calibration
    from fsltool.checkpoint import load_trained
    from fsltool.export import preprocessing_contract

    trained = load_trained(run, which)
    contract = preprocessing_contract(trained)
    names, support_paths, labels = read_support(support)
    query_paths = read_queries(queries)
    scores = torch_scores(trained.method, load_batch(support_paths, contract), labels, load_batch(query_paths, contract))
    return _predictions(names, query_paths, scores, top, load_calibration(trained))
