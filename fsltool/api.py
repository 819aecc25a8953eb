"""The Python API behind ``import fsltool``: load a trained or pretraining run, an export folder or an enrolled folder
(``fsltool.load``), embed images given as numpy arrays, PIL images or files, enrol classes in memory and save them
as ``fsltool enroll`` does, and predict with probabilities and the top-k classes.

It wraps the objects the command line uses (fsltool.checkpoint, enroll, predict, runtime), so an answer here is
the CLI's answer. Only a run (and classes enrolled from it) imports torch, and only when it is loaded: a service
that predicts with an enrolled or exported model runs on ONNX Runtime and numpy alone.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fsltool.data.images import convert_image
from fsltool.errors import FsltoolError
from fsltool.predict import (
    ENROLLED_FILE,
    Prediction,
    _predictions,
    enrolled_metadata,
    image_options,
    load_batch,
    metadata_calibration,
    open_onnx,
    read_contract,
    read_queries,
    torch_scores,
)

if TYPE_CHECKING:  # annotations only: a run's types would import torch
    from fsltool.checkpoint import TrainedModel
    from fsltool.confidence import Calibration
    from fsltool.enroll import EnrolReport
    from fsltool.runtime import OnnxModel

# One image or several: a file or folder path, a PIL image, an HxW, HxWxC or NxHxWxC array, or a list of these.
Images = str | Path | Image.Image | np.ndarray | Sequence[str | Path | Image.Image | np.ndarray]

ARRAY_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: the last axis of an HxWxC or NxHxWxC array
AS_BATCH = {2: (None, ..., None), 3: (None,), 4: ()}  # the index that makes an HxW, HxWxC or NxHxWxC array NxHxWxC


@functools.singledispatch
def _convert(item: object, contract: Mapping[str, Any], origin: str) -> tuple[np.ndarray, list[str] | None]:
    """One item as (n, C, H, W) float32 by the contract, and its images' names (None: named by position)."""
    raise FsltoolError(f"{origin}: cannot read a {type(item).__name__} as images (give paths, PIL images or numpy arrays)")


@_convert.register(str)
@_convert.register(Path)
def _paths(item: str | Path, contract: Mapping[str, Any], origin: str) -> tuple[np.ndarray, list[str] | None]:
    paths = read_queries([str(item)])  # a folder gives all its images, sorted
    return load_batch(paths, contract), [str(p) for p in paths]


def _pil(image: Image.Image, contract: Mapping[str, Any], origin: str) -> np.ndarray:
    """(C, H, W) uint8, converted exactly as an image file is (fsltool.predict.load_batch)."""
    try:
        return convert_image(image, **image_options(contract))
    except ValueError as error:  # 16-bit or floating-point modes
        raise FsltoolError(f"{origin}: {error}") from None


@_convert.register(Image.Image)
def _pil_image(item: Image.Image, contract: Mapping[str, Any], origin: str) -> tuple[np.ndarray, list[str] | None]:
    return _pil(item, contract, origin)[None].astype(np.float32) / 255.0, None


@_convert.register(np.ndarray)
def _array(item: np.ndarray, contract: Mapping[str, Any], origin: str) -> tuple[np.ndarray, list[str] | None]:
    """HxW, HxWxC or NxHxWxC, uint8 (0..255) or float (0..1, rounded to 8 bits as the contract's pixels are), then
    converted image by image exactly as a file's pixels are: channels, LANCZOS size, inversion."""
    batch = item[AS_BATCH[item.ndim]] if item.ndim in AS_BATCH else None
    if batch is None or batch.shape[-1] not in ARRAY_CHANNELS or 0 in batch.shape:
        raise FsltoolError(f"{origin}: an array of shape {item.shape} is not HxW, HxWxC or NxHxWxC with C in "
                           f"{ARRAY_CHANNELS} (grey images stacked as NxHxW need a last axis: images[..., None])")
    if np.issubdtype(batch.dtype, np.floating):
        if not np.isfinite(batch).all() or batch.min() < 0 or batch.max() > 1:
            raise FsltoolError(f"{origin}: float pixels must lie in [0, 1], got {batch.min()}..{batch.max()}")
        batch = np.rint(batch * 255).astype(np.uint8)
    elif batch.dtype != np.uint8:
        raise FsltoolError(f"{origin}: pixels of type {batch.dtype}; give uint8 (0..255) or float (0..1)")
    pixels = [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in batch]
    return np.stack([_pil(image, contract, origin) for image in pixels]).astype(np.float32) / 255.0, None


def preprocess(images: Images, contract: Mapping[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Images as the model's graphs take them, (N, C, H, W) float32 in [0, 1] by ``contract``, and a name for each
    (its file's path, or its position among ``images``)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    batches, names = [], []
    for index, item in enumerate(items):
        batch, paths = _convert(item, contract, f"images[{index}]" if isinstance(images, (list, tuple)) else "images")
        names += paths or [str(len(names) + i) for i in range(len(batch))]
        batches.append(batch)
    if not batches:
        raise FsltoolError("no images given")
    return np.concatenate(batches), names


def class_images(classes: Mapping[str, Images], contract: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Each class's images preprocessed by ``contract``, (K, C, H, W); class names must be non-empty strings."""
    converted = {}
    for name, images in classes.items():
        if not isinstance(name, str) or not name:
            raise FsltoolError(f"class name {name!r}: must be a non-empty string")
        try:
            converted[name] = preprocess(images, contract)[0]
        except FsltoolError as error:
            raise FsltoolError(f"class {name!r}: {error}") from None
    return converted


class Model:
    """What every loaded model has: its preprocessing contract, the images it is given, and the calibration
    (``fsltool calibrate``: a softmax temperature, an open-set threshold) its predictions apply, if it has one."""

    contract: dict[str, Any]
    calibration: Calibration | None

    def preprocess(self, images: Images) -> np.ndarray:
        """(N, C, H, W) float32 in [0, 1], exactly what the model's graphs take."""
        return preprocess(images, self.contract)[0]


class SupportSetModel(Model, ABC):
    """A model that classifies queries against a support set given with each call (a run or an export folder)."""

    def predict(self, support: Mapping[str, Images], queries: Images, top: int = 1) -> list[Prediction]:
        """Classify ``queries`` among the classes of ``support`` (class name -> its images), best class first; with
        ``top`` > 1 each prediction also lists its ``top`` best classes."""
        if len(support) < 2:
            raise FsltoolError(f"a support set needs at least 2 classes, got {len(support)}")
        images = class_images(support, self.contract)
        labels = np.concatenate([np.full(len(batch), c, dtype=np.int64) for c, batch in enumerate(images.values())])
        query, names = preprocess(queries, self.contract)
        scores = self._scores(np.concatenate(list(images.values())), labels, query)
        return _predictions(list(images), names, scores, top, self.calibration)

    @abstractmethod
    def _scores(self, support: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Scores (queries, classes) for a preprocessed support set and queries."""


class RunModel(SupportSetModel):
    """A trained run, a pretraining run or a checkpoint file, in PyTorch on the CPU: ``trained`` is the CLI's
    fsltool.checkpoint.TrainedModel."""

    def __init__(self, trained: TrainedModel) -> None:
        from fsltool.calibration import load_calibration
        from fsltool.export import preprocessing_contract

        self.trained = trained
        self.contract = preprocessing_contract(trained)
        self.calibration = load_calibration(trained)

    def embed(self, images: Images) -> np.ndarray:
        """The method's embedding of each image (N, *F): what its classifier compares."""
        import torch

        if not self.trained.method.embeds_independently:
            raise FsltoolError(f"{self.trained.path}: method {self.contract['method']!r} does not embed an image on its own "
                               "(its embedding depends on the support set)")
        with torch.inference_mode():
            return self.trained.method.embed(torch.from_numpy(self.preprocess(images))).numpy()

    def enroll(self, classes: Mapping[str, Images]) -> EnrolledClasses:
        """Enrol ``classes`` (class name -> its images) in memory, as ``fsltool enroll`` does from a folder."""
        enrolled = EnrolledClasses(self)
        enrolled.add(classes)
        return enrolled

    def _scores(self, support: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
        return torch_scores(self.trained.method, support, labels, query)


class ExportedModel(SupportSetModel):
    """An export folder (``fsltool export``), run with ONNX Runtime: no torch."""

    def __init__(self, folder: str | Path, device: str = "auto") -> None:
        self.folder = Path(folder)
        self.device = device
        self.contract = read_contract(self.folder)
        self.calibration = metadata_calibration(self.contract.get("calibration"), str(self.folder / "model.json"))

    @functools.cached_property
    def _classifier(self) -> OnnxModel:
        return open_onnx(self.folder / "classifier.onnx", self.device)

    @functools.cached_property
    def _embedding(self) -> OnnxModel:
        if "embedding" not in self.contract.get("graphs", {}):
            raise FsltoolError(f"{self.folder}: no embedding graph in this export (method {self.contract['method']!r} "
                               "does not embed an image on its own)")
        return open_onnx(self.folder / "embedding.onnx", self.device)

    def embed(self, images: Images) -> np.ndarray:
        """The exported embedding graph's output for each image (N, *F)."""
        return self._embedding.run({"images": self.preprocess(images)})[0]

    def _scores(self, support: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
        return self._classifier.run({"support": support, "support_labels": labels, "query": query})[0]


class EnrolledModel(Model):
    """An enrolled folder (``fsltool enroll``, or ``EnrolledClasses.save``), run with ONNX Runtime: no torch.
    ``classes`` and the preprocessing ``contract`` come from the graph's own metadata."""

    def __init__(self, folder: str | Path, device: str = "auto") -> None:
        self.folder = Path(folder)
        path = self.folder / "classifier.onnx"
        self._model = open_onnx(path, device)
        self.classes, self.contract = enrolled_metadata(self._model, path)
        self.calibration = metadata_calibration(self._model.session.get_modelmeta().custom_metadata_map.get("calibration"), str(path))
        self.provider = self._model.provider

    def predict(self, queries: Images, top: int = 1) -> list[Prediction]:
        """Classify ``queries`` among the enrolled classes, best class first (``top`` > 1: also the ``top`` best)."""
        query, names = preprocess(queries, self.contract)
        return _predictions(self.classes, names, self._model.run({"images": query})[0], top, self.calibration)


class EnrolledClasses:
    """Classes enrolled in memory with a run (``RunModel.enroll``): what its method keeps of each class, scored in
    PyTorch; ``save`` writes them as ``fsltool enroll`` does, for ``fsltool predict`` or ``EnrolledModel``."""

    def __init__(self, run: RunModel) -> None:
        from fsltool.enroll import Enrolment, class_state_rule

        class_state_rule(run.trained)  # a method that keeps nothing of a class is refused before any image is read
        self.run = run
        self._enrolment = Enrolment()
        # as the saved graph: the run's calibration only where these are the scores it was fitted on (not MAML's, Reptile's)
        self.calibration = run.calibration if run.trained.method.exported_scores is None else None

    @property
    def classes(self) -> list[str]:
        """Sorted, as in an enrolled folder: the score columns."""
        return self._enrolment.classes

    def add(self, classes: Mapping[str, Images]) -> None:
        """Enrol more classes (class name -> its images); those already enrolled are not recomputed."""
        from fsltool.enroll import class_states

        images = class_images(classes, self.run.contract)
        counts = {name: len(batch) for name, batch in images.items()}
        self._enrolment.add(class_states(self.run.trained, images), counts, "enrolled classes")

    def remove(self, name: str) -> None:
        self._enrolment.remove(name)

    def predict(self, queries: Images, top: int = 1) -> list[Prediction]:
        """Classify ``queries`` among the enrolled classes, best class first (``top`` > 1: also the ``top`` best)."""
        import torch

        from fsltool.enroll import enrolled_classifier

        if not self.classes:
            raise FsltoolError("no class is enrolled")
        query, names = preprocess(queries, self.run.contract)
        with torch.inference_mode():
            scores = enrolled_classifier(self.run.trained, self._enrolment)(torch.from_numpy(query)).numpy()
        return _predictions(self.classes, names, scores, top, self.calibration)

    def save(self, folder: str | Path, *, add: bool = False, force: bool = False) -> EnrolReport:
        """Write an enrolled folder (ONNX + TorchScript graph, class states, manifest), as ``fsltool enroll``: a new
        one, or with ``add`` these classes added to the enrolment there (same weights only), or with ``force`` a
        replacement of it. Nothing in ``folder`` changes unless all of it succeeds."""
        from fsltool.enroll import save_enrolment

        return save_enrolment(self.run.trained, self._enrolment, folder, add=add, force=force)


# What a folder holds, recognised by its marker file in this order; anything else is a run folder or a checkpoint.
FOLDER_KINDS: tuple[tuple[str, type[EnrolledModel] | type[ExportedModel]], ...] = (
    (ENROLLED_FILE, EnrolledModel),
    ("model.json", ExportedModel),
)


def load(path: str | Path, *, which: str = "best", device: str = "auto") -> RunModel | ExportedModel | EnrolledModel:
    """The model at ``path``: an enrolled folder (``fsltool enroll``) or an export folder (``fsltool export``), both
    run by ONNX Runtime on ``device`` (auto, cpu or cuda); or a run folder (its ``which`` checkpoint: best or last),
    a pretraining run or a checkpoint file, in PyTorch."""
    folder = Path(path)
    for marker, kind in FOLDER_KINDS:
        if (folder / marker).is_file():
            return kind(folder, device)
    from fsltool.checkpoint import load_trained

    return RunModel(load_trained(folder, which))
