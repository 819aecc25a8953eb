"""Checkpoints and run folders: atomic writes, safe loads (weights_only), and rebuilding a trained method."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fsltool import __version__
from fsltool.atomic import atomic_write
from fsltool.builtin_recipes import init_path
from fsltool.disk import write_error
from fsltool.errors import FsltoolError
from fsltool.methods import Method, build_method, get_method
from fsltool.models import build_backbone
from fsltool.models.backbones import Backbone
from fsltool.models.weights import load_feature_state
from fsltool.recipe import Recipe, recipe_from_dict
from fsltool.runs import RunFolder

CHECKPOINT_FORMAT = "fsltool-checkpoint-1"


class _KeepsWriteError:
    """A file for torch.save that keeps the OSError of a failed write: torch.save reports it as a RuntimeError
    with the reason lost (a full disk reads "unexpected pos ...")."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a failed write (a full disk: one line saying so) leaves the previous file and no partial one."""
    state = {"format": CHECKPOINT_FORMAT, "fsltool_version": __version__, **state}

    def write(file: BinaryIO) -> None:
        recorder = _KeepsWriteError(file)
        try:
            torch.save(state, recorder)  # type: ignore[arg-type]
        except RuntimeError:
            if recorder.error is None:
                raise
            raise recorder.error from None

    try:
        atomic_write(path, write)
    except OSError as error:
        raise write_error(path, "the checkpoint", error) from None


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load with ``weights_only=True``: nothing in a checkpoint is ever executed. ``mmap`` maps the tensors instead
    of reading them, for a caller that reads only the small entries (`fsltool info` over many runs)."""
    path = Path(path)
    if not path.is_file():
        raise FsltoolError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FsltoolError(f"{path}: not a readable fsltool checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FsltoolError(f"{path}: not an fsltool checkpoint (no '{CHECKPOINT_FORMAT}' format marker)")
    return state


def model_config(
    recipe: Recipe, image_shape: tuple[int, ...], mean: list[float], std: list[float], provenance: dict[str, Any]
) -> dict[str, Any]:
    """What it takes to rebuild the network, and to preprocess new images, without the data file."""
    return {
        "method": recipe.method,
        "method_options": dict(recipe.method_options),
        "backbone": recipe.backbone,
        "backbone_options": dict(recipe.backbone_options),
        "image_shape": list(image_shape),
        "mean": list(mean),
        "std": list(std),
        "preprocessing": {"resize": "lanczos", "invert": bool(provenance.get("invert", False)), "source": provenance.get("source")},
    }


def build_model(config: dict[str, Any]) -> Method:
    channels, size = config["image_shape"][0], config["image_shape"][-1]
    backbone = build_backbone(config["backbone"], channels, config["mean"], config["std"], image_size=size, **config["backbone_options"])
    return build_method(config["method"], backbone, config["method_options"])


@dataclass
class TrainedModel:
    method: Method
    recipe: Recipe
    config: dict[str, Any]
    state: dict[str, Any]
    path: Path


def checkpoint_path(run: str | Path, which: str = "best") -> Path:
    """A run folder resolves to its ``checkpoints/<which>.pt``; a file path is taken as it is."""
    run = Path(run)
    if run.is_dir():
        path = run / "checkpoints" / f"{which}.pt"
        if not path.is_file():
            raise FsltoolError(f"{run}: no {which} checkpoint in this run folder (expected {path})")
        return path
    if not run.exists():
        raise FsltoolError(f"{run}: no such run folder or checkpoint")
    return run


def best_validated_checkpoints(run: str | Path, size: int) -> list[tuple[Path, float]]:
    """The ``size`` numbered checkpoints of the run folder ``run`` with the highest validation accuracy, best
    first, with their accuracy (``evaluate --ensemble``); refused where the run kept fewer."""
    folder = Path(run)
    if not folder.exists():
        raise FsltoolError(f"{run}: no such run folder")
    if not folder.is_dir():
        raise FsltoolError(f"{run}: --ensemble takes a run folder (it scores the run's best-validated numbered checkpoints)")
    chosen = RunFolder(folder).best_validated(size)
    if len(chosen) < size:
        raise FsltoolError(f"{folder}: --ensemble {size} needs {size} numbered checkpoints with a validation score, the run "
                           f"kept {len(chosen)} (the recipe key train.keep_best_checkpoints keeps the best-validated ones)")
    return chosen


def load_trained(run: str | Path, which: str = "best") -> TrainedModel:
    """Rebuild a trained method in eval mode from a run folder or a checkpoint file."""
    path = checkpoint_path(run, which)
    state = load_checkpoint(path)
    try:
        config = state["model_config"]
        method = build_model(config)
        method.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        raise FsltoolError(f"{path}: checkpoint does not match its method ({str(error).splitlines()[0]})") from None
    except FsltoolError as error:  # a method or backbone that refuses the checkpoint's configuration
        raise FsltoolError(f"{path}: {error}") from None
    method.eval()
    return TrainedModel(method, recipe_from_dict(state["recipe"]), config, state, path)


def trained_on(state: dict[str, Any], machine: str) -> list[str]:
    """The machines a resumed run has trained on (``machine_description``), this one added: a run may continue
    elsewhere, and its budget's record names every machine that paid for it."""
    earlier = list(state.get("machines", []))  # empty for checkpoints written before fsltool 0.4
    return earlier if machine in earlier else [*earlier, machine]


def training_budget(trained: TrainedModel) -> dict[str, Any]:
    """What the checkpoint's training cost, for a result's JSON: steps, their size, the classes trained on, the
    training seconds up to this checkpoint, the machines, and the run it started from and what it took from it
    (whose own budget is its own checkpoint's)."""
    state, recipe = trained.state, trained.recipe
    common = {"seconds": round(float(state["elapsed"]), 1), "machines": list(state.get("machines", [])), "init": recipe.init or None,
              "init_scope": recipe.init_scope if recipe.init else None}
    if state.get("stage") == "pretrain":
        return {"stage": "pretrain", "epochs": state["epoch"], "steps": state["step"], "batch_size": recipe.pretrain.batch_size,
                "splits": list(recipe.pretrain.splits), **common}
    return {"stage": "meta-train", "episodes": state["episode"], "meta_batch": recipe.train.meta_batch, "shape": recipe.train.shape,
            "splits": list(recipe.train.splits), **common}


def model_digest(trained: TrainedModel) -> str:
    """SHA-256 of the model's configuration and weights: what an enrolment or a calibration was made with, so that
    classes embedded by other weights are not mixed, nor a temperature fitted to other weights applied."""
    digest = hashlib.sha256(json.dumps(trained.config, sort_keys=True).encode())
    for key, tensor in sorted(trained.method.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def untrained_like(trained: TrainedModel) -> Method:
    """The same network freshly initialised as its run began (recipe seed): the baseline that shows what
    meta-training bought."""
    torch.manual_seed(trained.recipe.seed)
    return build_model(trained.config).eval()


# Backbone options that do not change the feature network's parameters (how a run starts or trains, and how its
# maps become an embedding): they may differ from an init run's, e.g. Relation Networks' unflattened maps.
_NON_STRUCTURAL = ("weights", "freeze", "freeze_statistics", "flatten", "pool", "channels_last")


def _init_checkpoint(recipe: Recipe, image_shape: tuple[int, ...]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``recipe.init`` names (a run's best checkpoint, a checkpoint file, or one that ships with
    fsltool), checked to hold the same backbone, options and image shape as the recipe, else a one-line error
    naming both."""
    path = checkpoint_path(init_path(recipe.init), "best")
    state = load_checkpoint(path)
    theirs = state["model_config"]
    mine = {"backbone": recipe.backbone, "backbone_options": recipe.backbone_options, "image_shape": list(image_shape)}

    def structure(config: dict[str, Any]) -> tuple[str, dict[str, Any], list[int]]:
        options = {k: v for k, v in config["backbone_options"].items() if k not in _NON_STRUCTURAL}
        return config["backbone"], options, list(config["image_shape"])
    if structure(theirs) != structure(mine):
        name, options, shape = structure(theirs)
        my_name, my_options, my_shape = structure(mine)
        raise FsltoolError(f"init: {recipe.init} has backbone {name!r} {options} on {shape} images; this recipe has "
                           f"{my_name!r} {my_options} on {my_shape} images")
    return path, state


def load_init_backbone(backbone: Backbone, recipe: Recipe, image_shape: tuple[int, ...]) -> Path:
    """Start ``backbone`` from the feature network of the checkpoint ``recipe.init`` names. Only the feature
    layers are taken: the normalisation is the data file's, and heads are the new method's own. Returns the
    checkpoint read."""
    path, state = _init_checkpoint(recipe, image_shape)
    prefix = "backbone.features."
    features = {key[len(prefix):]: value for key, value in state["model"].items() if key.startswith(prefix)}
    load_feature_state(backbone, recipe.backbone, features, str(path))
    return path


def load_init_model(method: Method, recipe: Recipe, image_shape: tuple[int, ...]) -> Path:
    """Start every parameter and buffer of ``method`` (backbone, heads, learned rates, BatchNorm statistics) from
    the meta-training checkpoint ``recipe.init`` names (``init_scope: model``): a trained model trained on with
    options that a branch may not change, e.g. BatchNorm statistics unfrozen. It must be the same method with
    parameters of the same names and shapes, else a one-line error names the first difference. Returns the
    checkpoint read."""
    path, state = _init_checkpoint(recipe, image_shape)
    if state.get("stage") == "pretrain" or state["model_config"]["method"] != recipe.method:
        theirs = "a pretraining run" if state.get("stage") == "pretrain" else f"method {state['model_config']['method']!r}"
        raise FsltoolError(f"init: {recipe.init} holds {theirs}; init_scope: model takes every layer of a run of this "
                           f"recipe's method {recipe.method!r} (init_scope: backbone takes the feature layers of any run)")
    mine, theirs = method.state_dict(), state["model"]
    for key in sorted(mine.keys() | theirs.keys()):
        if key not in mine or key not in theirs:
            where = "this recipe's model" if key not in mine else "the init checkpoint"
            raise FsltoolError(f"init: {recipe.init}: {key!r} is not in {where}; init_scope: model needs the same layers "
                               "(method options that add or shape layers must match)")
        if mine[key].shape != theirs[key].shape:
            raise FsltoolError(f"init: {recipe.init}: {key!r} has shape {tuple(theirs[key].shape)} there and "
                               f"{tuple(mine[key].shape)} in this recipe's model")
    method.load_state_dict(theirs)
    return path


def with_adapt_steps(method: Method, config: dict[str, Any], steps: int) -> Method:
    """``method`` (built from ``config``) with ``steps`` fine-tuning steps on each support set at evaluation instead
    of its recipe's ``test_inner_steps``: MAML's reference code, for one, tests after 10 steps whatever it trained
    with. Rebuilt from the configuration, so the method's own checks apply (MAML++'s per-step layers exist only for
    the steps it trained)."""
    if not hasattr(method, "test_inner_steps"):
        raise FsltoolError(f"--adapt-steps: method '{config['method']}' does not fine-tune on the support set at evaluation "
                           "(maml and reptile do)")
    return with_method_options(method, config, f"--adapt-steps {steps}", test_inner_steps=steps)


def with_method_options(method: Method, config: dict[str, Any], origin: str, **options: Any) -> Method:
    """``method``'s trained weights in the method rebuilt from ``config`` with ``options`` changed (its own checks
    apply; an error names ``origin``): how a trained model is evaluated under other test-time settings."""
    try:
        rebuilt = build_model({**config, "method_options": {**config["method_options"], **options}})
    except FsltoolError as error:
        raise FsltoolError(f"{origin}: {error}") from None
    rebuilt.load_state_dict(method.state_dict())
    return rebuilt.eval()


def with_classifier(method: Method, name: str) -> Method:
    """``method``'s trained backbone under another few-shot classifier (default options, or those that make it
    classify from the backbone alone: ``Method.classifier_only_options``), e.g. a pretraining run scored by baseline++
    or an SVM rather than prototypes. A method with trained layers of its own (a relation module, FCE, a learned
    scale) is refused: they would be untrained."""
    other = build_method(name, method.backbone, dict(get_method(name).classifier_only_options))
    own = [key for key, _ in other.named_parameters() if not key.startswith("backbone.")]
    if own:
        raise FsltoolError(f"--method {name}: it has trained layers of its own ({own[0]}, ...) that this run never trained; "
                           "use a method that classifies from the backbone alone (e.g. protonet, baseline, baseline++)")
    return other.eval()
