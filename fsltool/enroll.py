"""Enrolled classifiers: keep what a method keeps of a support set (ProtoNet's class prototypes, Matching Networks'
support embeddings, Relation Networks' class feature maps, SNAIL's and MANN's support embeddings; for MAML and
Reptile the class prototypes of the meta-learned body that ``fsltool export`` classifies with), once, and write one
graph ``images -> scores`` with that state as constants, so an application classifies a stream of images without
re-embedding its support set on every call (``fsltool predict ENROLLED_DIR QUERIES``, ONNX Runtime alone).

The state is kept per class in ``classes.safetensors`` (one tensor per class), so classes are added (``add``) or
removed (``remove``) without recomputing the others; every change rewrites the folder as a whole
(fsltool.atomic.atomic_directory). The graph scores queries with the method's own ``scores_from_embeddings``
against the kept state (MAML, Reptile: with export's prototype classifier), the items shown in the order
evaluation would show them; the tests check it against the method's forward (export's classifier) on the same
support set in that order.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save
from torch import nn

from fsltool.atomic import atomic_directory, atomic_write
from fsltool.calibration import calibration_left_out, carried_calibration
from fsltool.checkpoint import TrainedModel, load_trained, model_digest
from fsltool.errors import FsltoolError
from fsltool.evaluate import support_orders
from fsltool.export import export_onnx, export_torchscript, preprocessing_contract
from fsltool.methods.adaptation import AdaptiveMethod, PrototypeClassifier
from fsltool.methods.base import ExportGraph, Method
from fsltool.methods.protonet import class_prototypes
from fsltool.methods.relationnet import class_maps
from fsltool.methods.sequence import SequenceMethod
from fsltool.predict import ENROLLED_FILE, load_batch, read_support

FORMAT = "fsltool-enrolled-1"
STATE_FILE = "classes.safetensors"
GRAPH_FILES = ("classifier.onnx", "classifier.ts")
EMBED_CHUNK = 128  # images per backbone pass: fixed, so a class's state never depends on what is enrolled with it


def _single_class(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(embeddings), dtype=torch.int64)


def _prototype(embeddings: torch.Tensor) -> torch.Tensor:
    return class_prototypes(embeddings, _single_class(embeddings), 1)


# What an enrolled graph runs: ``embed`` on each image alone, then ``scores_from_embeddings`` against the kept items.
Scoring = Method | PrototypeClassifier


def _the_method(method: Method) -> Scoring:
    return method


def _exported_classifier(method: Method) -> Scoring:
    """MAML's and Reptile's ``fsltool export`` classifier: prototypes of the meta-learned body (no adaptation)."""
    assert isinstance(method, AdaptiveMethod)
    classifier = method.exported_classifier()
    assert isinstance(classifier, PrototypeClassifier)
    return classifier


def _label_slots(method: Method) -> int:
    """The sequence methods' one-hot label size (method_options.way, fixed by training): at most that many classes."""
    assert isinstance(method, SequenceMethod)
    return method.way


@dataclass(frozen=True)
class ClassState:
    """What a method keeps of one class's support embeddings (K, *F) -> (items, *F): the items its scoring's
    ``scores_from_embeddings`` then reads as a support set with one label per class.

    ``scoring``: what embeds and scores (the method, or what stands for it in ``fsltool export``: then the run's
    calibration is left out, see fsltool.calibration.carried_calibration); ``label_slots``: the most classes the
    scoring reads, when it has a fixed number."""

    kept: str
    of_class: Callable[[torch.Tensor], torch.Tensor]
    scoring: Callable[[Method], Scoring] = _the_method
    label_slots: Callable[[Method], int] | None = None


BODY_PROTOTYPE = ClassState(
    "class prototype of the meta-learned body (mean pooled embedding), as fsltool export's classifier", _prototype,
    _exported_classifier)
SUPPORT_SEQUENCE = ClassState("support embeddings, read as one sequence in a seeded order (support_order)", lambda e: e,
                              label_slots=_label_slots)

# The methods that score queries against a fixed support set from per-image embeddings, and the rule each applies to
# a class (the same helper its forward uses). A new method of that kind is enrolled by adding it here.
CLASS_STATES: dict[str, ClassState] = {
    "protonet": ClassState("class prototype (mean support embedding)", _prototype),
    "matchingnet": ClassState("support embeddings", lambda e: e),
    "relationnet": ClassState("class feature map (sum of the support maps)", lambda e: class_maps(e, _single_class(e), 1)),
    "maml": BODY_PROTOTYPE,
    "reptile": BODY_PROTOTYPE,
    "snail": SUPPORT_SEQUENCE,
    "mann": SUPPORT_SEQUENCE,
}

# Why the other built-in methods keep nothing that outlives one support set.
NOT_ENROLLABLE: dict[str, str] = {
    "baseline": "it fits a new classifier head on each support set",
    "baseline++": "it fits a new classifier head on each support set",
    "logistic": "it fits a logistic regression on each whole support set, every class's weights depending on all classes",
    "ridge": "it solves a ridge regression on each whole support set, every class's weights depending on all classes",
    "svm": "it fits a multi-class SVM on each whole support set, every class's weights depending on all classes",
}


@dataclass
class Enrolment:
    """The per-class state of an enrolled folder: class name -> kept items (items, *F), and images enrolled per class."""

    states: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """Sorted, like a support folder's sub-folders: enrolling in several steps gives the classes (and the
        score columns) of enrolling them all at once."""
        return sorted(self.states)

    def add(self, states: Mapping[str, np.ndarray], images: Mapping[str, int], source: str) -> None:
        """Add classes' kept states and image counts; a name that matches an enrolled one, or another new one, but
        for case or Unicode form is refused (``source`` names where they came from)."""
        _check_distinct(list(states), self.classes, source)
        self.states.update(states)
        self.images.update(images)

    def remove(self, name: str) -> None:
        if name not in self.states:
            raise FsltoolError(f"--remove {name!r}: no such enrolled class (enrolled: {', '.join(self.classes)})")
        del self.states[name], self.images[name]


@dataclass
class EnrolReport:
    out_dir: Path
    classes: list[str]
    added: list[str]
    removed: list[str]
    files: list[Path]
    kept: str  # what is stored per class
    calibration_left_out: str | None  # why the run's calibration is not carried, when it is not


class EnrolledClassifier(nn.Module):
    """images -> scores (N, classes): the scoring's embedding network, then its scoring against the kept items as
    a fixed support set (buffers, so they become constants of the exported graphs)."""

    def __init__(self, scoring: Scoring, items: torch.Tensor, item_labels: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.scoring = scoring
        self.register_buffer("items", items)
        self.register_buffer("item_labels", item_labels)
        self.classes = classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        queries = self.scoring.embed(images)
        return self.scoring.scores_from_embeddings(self.items[None], self.item_labels[None], queries[None], self.classes)[0]


def class_state_rule(trained: TrainedModel) -> ClassState:
    """The method's per-class rule, or a one-line error saying why it cannot be enrolled."""
    name = trained.config["method"]
    if name not in CLASS_STATES:
        reason = NOT_ENROLLABLE.get(name, "fsltool.enroll has no per-class state for it")
        raise FsltoolError(f"method {name!r} cannot be enrolled: {reason} (enrollable: {', '.join(sorted(CLASS_STATES))})")
    rule = CLASS_STATES[name]
    if not rule.scoring(trained.method).embeds_independently:
        raise FsltoolError(f"method {name!r} cannot be enrolled with its method_options: an image's embedding depends on the "
                           "whole support set (matchingnet's fce), so no class can be kept on its own")
    return rule


def class_states(trained: TrainedModel, class_images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The kept state of each class from its images (K, C, H, W) float32 in [0, 1], preprocessed by the contract.
    Each class is embedded on its own, in fixed chunks, so its state is the same whatever else is enrolled."""
    rule = class_state_rule(trained)
    scoring = rule.scoring(trained.method)
    expected = tuple(trained.config["image_shape"])
    states = {}
    with torch.inference_mode():
        for name, images in class_images.items():
            if images.ndim != 4 or images.shape[1:] != expected or len(images) == 0:
                raise FsltoolError(f"class {name!r}: images of shape {tuple(images.shape)}, expected (K, {', '.join(map(str, expected))}) with K >= 1")
            batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
            embeddings = torch.cat([scoring.embed(chunk) for chunk in batch.split(EMBED_CHUNK)])
            states[name] = rule.of_class(embeddings).numpy()
    return states


def item_order(method: Method, count: int) -> np.ndarray:
    """The order in which ``count`` enrolled items, laid out class by class (classes sorted by name, each class's
    items in enrolment order), are shown to the scoring: as laid out, or for an ``order_sensitive`` method (SNAIL,
    MANN: trained on shuffled support sequences, which would read the layout as a cue) the seeded order evaluation
    shows stored episode 0 of that length (fsltool.evaluate.support_orders). It depends on the count alone, so
    enrolling in steps gives the sequence of enrolling at once."""
    return support_orders(np.zeros(1, dtype=np.int64), count)[0] if method.order_sensitive else np.arange(count)


def check_label_slots(trained: TrainedModel, rule: ClassState, classes: int) -> None:
    """A sequence method reads at most method_options.way classes (its one-hot label size, fixed by training)."""
    if rule.label_slots is not None and classes > (slots := rule.label_slots(trained.method)):
        raise FsltoolError(f"{classes} classes to enrol, but method {trained.config['method']!r} reads at most "
                           f"method_options.way = {slots} (its label slots, fixed by training): enrol at most {slots}")


def enrolled_classifier(trained: TrainedModel, enrolment: Enrolment) -> EnrolledClassifier:
    """The enrolled classes' states stacked as one support set (items labelled by class, in sorted class order),
    shown in ``item_order``."""
    rule = class_state_rule(trained)
    classes = enrolment.classes
    check_label_slots(trained, rule, len(classes))
    items = torch.cat([torch.from_numpy(enrolment.states[name]) for name in classes])
    labels = torch.cat([torch.full((len(enrolment.states[name]),), c, dtype=torch.int64) for c, name in enumerate(classes)])
    order = torch.from_numpy(item_order(trained.method, len(labels)))
    return EnrolledClassifier(rule.scoring(trained.method), items[order], labels[order], len(classes)).eval()


def support_order(trained: TrainedModel, enrolment: Enrolment) -> dict[str, list[tuple[str, int]]]:
    """For an order-sensitive method, the sequence the graph reads: (class, index of its image), in order."""
    if not trained.method.order_sensitive:
        return {}
    items = [(name, i) for name in enrolment.classes for i in range(len(enrolment.states[name]))]
    return {"support_order": [items[j] for j in item_order(trained.method, len(items))]}


def _class_key(name: str) -> str:
    """Names a user cannot tell apart (case, Unicode composition) are the same class."""
    return unicodedata.normalize("NFC", name).casefold()


def _check_distinct(names: Sequence[str], enrolled: Sequence[str], source: str) -> None:
    """Refuse a class whose name matches an enrolled one, or another new one, but for case or Unicode form."""
    enrolled_keys = {_class_key(name): name for name in enrolled}
    new_keys: dict[str, str] = {}
    for name in names:
        key = _class_key(name)
        if key in enrolled_keys:
            raise FsltoolError(f"{source}: class {name!r} is already enrolled (as {enrolled_keys[key]!r}); --remove it first to enrol it again")
        if key in new_keys:
            raise FsltoolError(f"{source}: classes {new_keys[key]!r} and {name!r} differ only in case or Unicode form")
        new_keys[key] = name


def read_class_images(support: str | Path, trained: TrainedModel) -> dict[str, np.ndarray]:
    """A support folder's classes (one sub-folder of images each) preprocessed exactly as ``predict`` does: converted
    to the model's channels and resized to its input size by the contract, unreadable images refused by name."""
    names, paths, labels = read_support(support, min_classes=1)
    _check_distinct(names, [], str(support))
    contract = preprocessing_contract(trained)
    return {name: load_batch([p for p, label in zip(paths, labels) if label == c], contract) for c, name in enumerate(names)}


def read_enrolment(out: Path, trained: TrainedModel) -> Enrolment:
    """The classes already enrolled in ``out``, checked to belong to ``trained``'s weights."""
    try:
        manifest = json.loads((out / ENROLLED_FILE).read_text())
    except FileNotFoundError:
        raise FsltoolError(f"{out}: no enrolment here to change (no {ENROLLED_FILE}); enrol a support folder first") from None
    except (OSError, ValueError) as error:
        raise FsltoolError(f"{out / ENROLLED_FILE}: unreadable ({error})") from None
    if manifest.get("format") != FORMAT:
        raise FsltoolError(f"{out / ENROLLED_FILE}: not an fsltool enrolment (format {manifest.get('format')!r}, expected {FORMAT!r})")
    enrolled_with, digest = manifest.get("model", {}), model_digest(trained)
    if enrolled_with.get("digest") != digest:
        raise FsltoolError(f"{out}: enrolled with other weights ({enrolled_with.get('checkpoint')}, digest {str(enrolled_with.get('digest'))[:12]}) "
                           f"than {trained.path} holds now (digest {digest[:12]}); classes embedded by different weights cannot "
                           "be mixed: enrol every class again with --force")
    try:
        states = load_file(str(out / STATE_FILE))
    except (OSError, SafetensorError) as error:
        raise FsltoolError(f"{out / STATE_FILE}: unreadable class states ({error})") from None
    if sorted(states) != sorted(manifest["classes"]):
        raise FsltoolError(f"{out / STATE_FILE}: its classes differ from {ENROLLED_FILE}'s")
    return Enrolment(states, dict(manifest["class_images"]))


def write_enrolment(trained: TrainedModel, enrolment: Enrolment, out: Path) -> list[Path]:
    """Export the enrolled classifier (ONNX, checked under ONNX Runtime at another batch size; TorchScript) with the
    class names and the preprocessing contract in its metadata, the state file and the manifest, all at once."""
    if not enrolment.states:
        raise FsltoolError(f"{out}: no class would be left enrolled")
    rule = class_state_rule(trained)
    classes = enrolment.classes
    module = enrolled_classifier(trained, enrolment)
    image_shape = trained.config["image_shape"]
    generator = torch.Generator().manual_seed(0)
    graph, check = (ExportGraph(module, (torch.rand(batch, *image_shape, generator=generator),), ["images"], ["scores"],
                                {"images": {0: "batch"}}) for batch in (3, 5))
    contract = preprocessing_contract(trained)
    metadata = {**contract, **carried_calibration(trained), "graph": "enrolled classifier", "inputs": ["images"],
                "outputs": ["scores"], "classes": classes, "class_state": rule.kept, **support_order(trained, enrolment)}
    manifest = {**metadata, "format": FORMAT, "class_images": {name: enrolment.images[name] for name in classes},
                "state_file": STATE_FILE, "model": {"checkpoint": str(trained.path), "digest": model_digest(trained)}}
    names = [*GRAPH_FILES, STATE_FILE, ENROLLED_FILE]
    with atomic_directory(out) as staging:
        export_onnx(graph, check, staging / GRAPH_FILES[0], metadata)
        export_torchscript(graph, staging / GRAPH_FILES[1], metadata)
        state_bytes = save({name: enrolment.states[name] for name in classes}, metadata={"format": FORMAT, "method": contract["method"]})
        atomic_write(staging / STATE_FILE, lambda file: file.write(state_bytes))
        atomic_write(staging / ENROLLED_FILE, lambda file: file.write(json.dumps(manifest, indent=2).encode()))
    return [out / name for name in names]


def enrolment_in(out: Path, trained: TrainedModel, *, change: bool, force: bool) -> Enrolment:
    """The enrolment ``out`` starts from: the one it holds when ``change`` (to add or remove classes), else a new
    one, refusing to replace an enrolment without ``force`` and ever to write into a folder that is not one."""
    if force and change:
        raise FsltoolError("--force starts a new enrolment; it does not go with --add or --remove")
    holds_enrolment = (out / ENROLLED_FILE).is_file()
    if out.exists() and not holds_enrolment and (not out.is_dir() or any(out.iterdir())):
        raise FsltoolError(f"{out}: exists and is not an enrolled folder; choose a new or empty folder")  # --force never deletes it
    if change:
        return read_enrolment(out, trained)
    if holds_enrolment and not force:
        raise FsltoolError(f"{out}: already holds an enrolment (--add or --remove changes its classes, --force replaces it)")
    return Enrolment()


def save_enrolment(
    trained: TrainedModel, new: Enrolment, out_dir: str | Path, *, add: bool = False, remove: Sequence[str] = (), force: bool = False
) -> EnrolReport:
    """Write the classes of ``new`` (states computed with ``trained``) into ``out_dir``: a new enrolment, or with
    ``add``/``remove`` a change to the one there (its other classes are read back, not recomputed). Nothing in
    ``out_dir`` changes unless all of it succeeds."""
    out = Path(out_dir)
    enrolment = enrolment_in(out, trained, change=add or bool(remove), force=force)
    for name in remove:
        enrolment.remove(name)
    enrolment.add(new.states, new.images, str(out))
    files = write_enrolment(trained, enrolment, out)
    rule = class_state_rule(trained)
    return EnrolReport(out, enrolment.classes, new.classes, list(remove), files, rule.kept, calibration_left_out(trained))


def enroll_images(
    model: str | Path | TrainedModel,
    class_images: Mapping[str, np.ndarray],
    out_dir: str | Path,
    *,
    add: bool = False,
    remove: Sequence[str] = (),
    force: bool = False,
    which: str = "best",
) -> EnrolReport:
    """Enrol classes given as arrays (name -> (K, C, H, W) float32 in [0, 1], already preprocessed) into
    ``out_dir`` (see ``save_enrolment``)."""
    trained = model if isinstance(model, TrainedModel) else load_trained(model, which)
    new = Enrolment(class_states(trained, class_images), {name: len(images) for name, images in class_images.items()})
    return save_enrolment(trained, new, out_dir, add=add, remove=remove, force=force)


def enroll(
    model: str | Path,
    support: str | Path | None,
    out_dir: str | Path,
    *,
    add: bool = False,
    remove: Sequence[str] = (),
    force: bool = False,
    which: str = "best",
) -> EnrolReport:
    """Enrol the classes of a ``support`` folder (one sub-folder of images per class, as ``predict`` takes) with
    a trained run or checkpoint ``model`` into ``out_dir``; ``add`` adds them to the classes enrolled there,
    ``remove`` drops classes by name (``support`` may then be None).

    Example (a notebook)::

        enroll("runs/omniglot/protonet-5w1s", "my_classes/", "enrolled/")
        enroll("runs/omniglot/protonet-5w1s", "more_classes/", "enrolled/", add=True)
        predictions, provider = fsltool.predict.predict_enrolled("enrolled/", ["query.png"], top=3)
    """
    if support is None and not remove:
        raise FsltoolError("give a SUPPORT folder of classes to enrol (or --remove NAME)")
    if support is not None and remove and not add:
        raise FsltoolError(f"{support}: --remove with a SUPPORT folder also enrols its classes only with --add")
    if add and support is None:
        raise FsltoolError("--add needs a SUPPORT folder of classes to add")
    trained = load_trained(model, which)
    class_state_rule(trained)
    class_images = read_class_images(support, trained) if support is not None else {}
    return enroll_images(trained, class_images, out_dir, add=add, remove=remove, force=force)

