"""Recipes: a typed schema, YAML loading (safe loader, optional ``base:`` file), ``key=value`` overrides,
and validation whose errors name the key and suggest the nearest valid one."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsltool.data.augment import AugmentConfig, check_augment
from fsltool.data.episodes import EpisodeShape, TrainingShape
from fsltool.device import DEVICE_NAME
from fsltool.errors import FsltoolError


@dataclass
class OptimConfig:
    """The optimisation keys meta-training (``train``) and pretraining (``pretrain``) share. The schedule counts
    meta-steps in ``train`` and epochs in ``pretrain``: ``lr_step`` and ``warmup`` are in those units."""

    optimizer: str = "adam"  # adam | adamw (decoupled weight decay) | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0  # as the optimizer defines it: L2 in the gradient (adam, sgd), decoupled (adamw)
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    # step: lr_step / lr_gamma below | multistep: lr_gamma at each of lr_milestones | linear: lr * (1 - done / total),
    # to 0 at the end | cosine: lr * (1 + cos(pi * done / total)) / 2
    lr_schedule: str = "step"
    warmup: int = 0  # linear warm-up from lr / warmup to lr over this many units, before the schedule's own factor applies
    clip_grad_norm: float = 0.0  # clip the gradient's global norm to this (0: off)
    clip_grad_value: float = 0.0  # then clip every gradient element to [-this, this] (0: off; MAML's miniImageNet code: 10)
    lr_step: int = 2000  # step schedule: multiply lr by lr_gamma every lr_step units (0: constant)
    lr_gamma: float = 0.5
    lr_milestones: list[int] = field(default_factory=list)  # multistep schedule: multiply lr by lr_gamma at each
    # multistep: the lr's factor from each milestone on, instead of powers of lr_gamma (MetaOptNet: [0.06, 0.012, 0.0024])
    lr_factors: list[float] = field(default_factory=list)
    log_every: int = 50  # optimizer steps between log rows
    keep_checkpoints: int = 3  # numbered checkpoints kept beside last.pt and best.pt (0: none)
    keep_best_checkpoints: int = 0  # also keep this many best-validated numbered ones (evaluate --ensemble reads them)
    # Also write last.pt between validations once this many minutes have passed since the last checkpoint (meta-training:
    # after a meta-step; pretraining: at an epoch's end), so a process killed without warning loses at most that much (0: off)
    checkpoint_minutes: float = 10.0
    on_nonfinite: str = "stop"  # a NaN or infinite loss: stop (exit 2) | skip (drop that step and count it)
    prefetch: bool = True  # assemble the next batch on a background thread during the step
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training images only (fsltool.data.augment)


@dataclass
class TrainConfig(OptimConfig):
    shape: str = "60w5s5q"  # training episode shape
    episodes: int = 10000  # meta-updates (each uses meta_batch episodes)
    meta_batch: int = 1  # episodes averaged into one meta-update
    splits: list[str] = field(default_factory=lambda: ["train"])  # classes episodes are drawn from (e.g. [train, val])


@dataclass
class PretrainConfig(OptimConfig):
    """``fsltool pretrain``: supervised classification over every class of ``splits`` in mini-batches of images,
    then the backbone is scored as a few-shot classifier (the recipe's ``method``) on stored validation episodes
    every ``validation.every`` epochs; the best checkpoint is chosen by that accuracy."""

    epochs: int = 0  # passes over the training images (required by fsltool pretrain)
    batch_size: int = 128
    micro_batches: int = 1  # the batch is forwarded in this many parts, each with its own BatchNorm statistics
    head: str = "linear"  # linear | cosine (cosine similarity to class weights times a learned scale)
    head_scale: float = 10.0  # cosine head: the scale's initial value
    rotation_weight: float = 0.0  # > 0: add the loss of predicting 0/90/180/270-degree rotations (Gidaris et al. 2019)
    splits: list[str] = field(default_factory=lambda: ["train"])  # classes to pretrain on
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    lr_step: int = 0
    lr_gamma: float = 0.1
    log_every: int = 20


@dataclass
class ValidationConfig:
    shape: str = "5w1s15q"  # a shape stored in the data file for the val split
    every: int = 500  # meta-steps (pretraining: epochs) between validations and checkpoints
    episodes: int = 200  # the first N stored validation episodes


@dataclass
class Recipe:
    data: str = ""
    output: str = ""
    method: str = "protonet"
    method_options: dict[str, Any] = field(default_factory=dict)
    backbone: str = "conv4"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # fsltool pretrain only
    init: str = ""  # a run folder (e.g. a pretraining run) whose best checkpoint's backbone training starts from
    init_scope: str = "backbone"  # backbone | model: init's feature layers only, or every layer of a run of the same method
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    test_shape: str = "5w1s15q"  # what `fsltool evaluate` runs by default
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (fsltool.device)
    data_on_device: str | bool = "auto"  # auto | true | false: the whole image array in the device's memory (fsltool.data.store.keeps_on_device)
    precision: str = "fp32"  # fp32 | bf16: training steps and validation under torch.autocast (fsltool.loop.autocast_for)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("step", "multistep", "linear", "cosine")
NONFINITE_POLICIES = ("stop", "skip")
PRECISIONS = ("fp32", "bf16")
INIT_SCOPES = ("backbone", "model")
DATA_ON_DEVICE = ("auto", True, False)
PRETRAIN_HEADS = ("linear", "cosine")
# Keys a resumed run may change: they never change the parameters a run ends with (on_nonfinite only where a
# loss is not finite, which is why one resumes with it changed). The length key (episodes, epochs) is the first.
RESUMABLE_KEYS = {section: (length, "keep_checkpoints", "keep_best_checkpoints", "checkpoint_minutes", "on_nonfinite", "prefetch")
                  for section, length in (("train", "episodes"), ("pretrain", "epochs"))}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_type(key: str, value: Any, expected: Any) -> Any:
    """Return ``value`` converted to ``expected`` where lossless (int -> float), else raise naming the key."""
    origin = typing.get_origin(expected)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list) or not all(type(item) is item_type for item in value):
            kind = "names" if item_type is str else "whole numbers"
            raise FsltoolError(f"recipe key {key!r}: expected a list of {kind}, got {value!r}")
        return value
    if origin is types.UnionType:
        if type(value) not in typing.get_args(expected):
            kinds = " or ".join(kind.__name__ for kind in typing.get_args(expected))
            raise FsltoolError(f"recipe key {key!r}: expected {kinds}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise FsltoolError(f"recipe key {key!r}: expected a mapping, got {value!r}")
        for option, option_value in value.items():
            if isinstance(option_value, float) and not math.isfinite(option_value):
                raise FsltoolError(f"recipe key '{key}.{option}': {option_value} is not a finite number")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise FsltoolError(f"recipe key {key!r}: {value} is not a finite number")
    if expected in (int, float, str, bool) and (type(value) is not expected):
        raise FsltoolError(f"recipe key {key!r}: expected {expected.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise FsltoolError(f"recipe key {prefix.rstrip('.') or '<top>'!r}: expected a mapping, got {raw!r}")
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in types_:
            close = difflib.get_close_matches(str(key), list(types_), n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else f" (valid: {', '.join(types_)})"
            raise FsltoolError(f"unknown recipe key {prefix + str(key)!r}{hint}")
        expected = types_[key]
        if dataclasses.is_dataclass(expected):
            values[key] = _build(expected, value, f"{prefix}{key}.")
        else:
            values[key] = _check_type(prefix + key, value, expected)
    return cls(**values)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base`` key by key, but a method's or backbone's options whole: they are one set, and a child
    recipe mixing its base's options with its own would run a method nobody wrote down."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in ("method_options", "backbone_options"):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise yaml.YAMLError(f"key {key!r} is given twice (lines {first_line[key]} and {line})")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise FsltoolError(f"{path}: recipe 'base' chain loops back on itself")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise FsltoolError(f"{path}: cannot read recipe ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise FsltoolError(f"{path}: recipe is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as error:
        raise FsltoolError(f"{path}: invalid YAML ({' '.join(str(error).split())})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FsltoolError(f"{path}: a recipe must be a YAML mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise FsltoolError(f"{path}: recipe key 'base' must be a file path")
    return _merge(_read_yaml((path.parent / base).resolve(), (*seen, path)), raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.01`` -> (["train", "lr"], 0.01); the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise FsltoolError(f"override {text!r} is not of the form key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FsltoolError(f"override {'.'.join(path)!r}: {part!r} is not a section")
    node[path[-1]] = value


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read, merge ``base`` files, apply overrides, and validate everything that can be checked statically."""
    path = Path(path)
    raw = _read_yaml(path.resolve())
    for text in overrides:
        _apply_override(raw, *parse_override(text))
    recipe = _build(Recipe, raw, "")
    validate(recipe, where=str(path))
    return recipe


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Rebuild a recipe saved in a run folder or checkpoint."""
    return _build(Recipe, raw, "")


def validate(recipe: Recipe, where: str = "recipe") -> None:
    """Checks that need no data file: required keys, shapes, ranges, method and backbone names and options."""
    for key in ("data", "output"):
        if not getattr(recipe, key):
            raise FsltoolError(f"{where}: recipe key {key!r} is required")
    for key, text, parse in (("train.shape", recipe.train.shape, TrainingShape.parse),
                             ("validation.shape", recipe.validation.shape, EpisodeShape.parse),
                             ("test_shape", recipe.test_shape, EpisodeShape.parse)):
        try:
            parse(text)
        except FsltoolError as error:
            raise FsltoolError(f"{where}: recipe key {key!r}: {error}") from None
    positive = {
        "train.episodes": recipe.train.episodes,
        "train.meta_batch": recipe.train.meta_batch,
        "validation.every": recipe.validation.every,
        "validation.episodes": recipe.validation.episodes,
        "pretrain.batch_size": recipe.pretrain.batch_size,
        "pretrain.micro_batches": recipe.pretrain.micro_batches,
        "pretrain.head_scale": recipe.pretrain.head_scale,
    }
    for key, value in positive.items():
        if value <= 0:
            raise FsltoolError(f"{where}: recipe key {key!r} must be positive, got {value}")
    _validate_pretrain(recipe.pretrain, where)
    for section in ("train", "pretrain"):
        _validate_optimisation(section, getattr(recipe, section), where)
        if not getattr(recipe, section).splits:
            raise FsltoolError(f"{where}: recipe key '{section}.splits' must name at least one split")
    if not DEVICE_NAME.fullmatch(recipe.device):
        raise FsltoolError(f"{where}: recipe key 'device': {recipe.device!r} is not one of auto, cpu, cuda, cuda:N")
    if recipe.data_on_device not in DATA_ON_DEVICE:
        raise FsltoolError(f"{where}: recipe key 'data_on_device': {recipe.data_on_device!r} is not one of auto, true, false")
    if recipe.precision not in PRECISIONS:
        raise FsltoolError(f"{where}: recipe key 'precision': {recipe.precision!r} is not one of {', '.join(PRECISIONS)}")
    if recipe.init_scope not in INIT_SCOPES:
        raise FsltoolError(f"{where}: recipe key 'init_scope': {recipe.init_scope!r} is not one of {', '.join(INIT_SCOPES)}")
    if recipe.init_scope == "model" and not recipe.init:
        raise FsltoolError(f"{where}: recipe key 'init_scope' is model but 'init' names no run to take the model from")
    _validate_names(recipe, where)

def _validate_pretrain(config: PretrainConfig, where: str) -> None:
    """The ``pretrain`` keys beyond the optimisation ones."""
    for key in ("epochs", "rotation_weight"):
        if getattr(config, key) < 0:
            raise FsltoolError(f"{where}: recipe key 'pretrain.{key}' must be >= 0, got {getattr(config, key)}")
    if config.batch_size % config.micro_batches:
        raise FsltoolError(f"{where}: recipe key 'pretrain.micro_batches': {config.micro_batches} does not divide "
                           f"pretrain.batch_size {config.batch_size}")
    if config.head not in PRETRAIN_HEADS:
        raise FsltoolError(f"{where}: recipe key 'pretrain.head': {config.head!r} is not one of {', '.join(PRETRAIN_HEADS)}")


def _validate_names(recipe: Recipe, where: str) -> None:
    """The method, its option names and the backbone, with the closest known name for a misspelt one."""
    from fsltool.methods import get_method, method_options
    from fsltool.models import BACKBONES

    get_method(recipe.method)
    accepted = method_options(recipe.method)
    for key in recipe.method_options:
        if key not in accepted:
            close = difflib.get_close_matches(key, list(accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (accepted: {', '.join(accepted) or 'none'})"
            raise FsltoolError(f"{where}: method {recipe.method!r} has no option {key!r}{hint}")
    if recipe.backbone not in BACKBONES:
        close = difflib.get_close_matches(recipe.backbone, list(BACKBONES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (available: {', '.join(BACKBONES)})"
        raise FsltoolError(f"{where}: unknown backbone {recipe.backbone!r}{hint}")


def _validate_optimisation(section: str, config: OptimConfig, where: str) -> None:
    """The optimisation keys of ``train`` or ``pretrain``, named with their section."""
    for key in ("lr", "log_every"):
        if getattr(config, key) <= 0:
            raise FsltoolError(f"{where}: recipe key '{section}.{key}' must be positive, got {getattr(config, key)}")
    for key in ("lr_step", "weight_decay", "warmup", "clip_grad_norm", "clip_grad_value", "keep_checkpoints", "keep_best_checkpoints",
                "checkpoint_minutes"):
        if getattr(config, key) < 0:
            raise FsltoolError(f"{where}: recipe key '{section}.{key}' must be >= 0, got {getattr(config, key)}")
    choices = {"on_nonfinite": NONFINITE_POLICIES, "lr_schedule": LR_SCHEDULES, "optimizer": OPTIMIZERS}
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise FsltoolError(f"{where}: recipe key '{section}.{key}': {getattr(config, key)!r} is not one of {', '.join(allowed)}")
    milestones = config.lr_milestones
    if config.lr_schedule == "multistep" and (not milestones or milestones != sorted(set(milestones)) or milestones[0] < 1):
        raise FsltoolError(f"{where}: recipe key '{section}.lr_milestones' must list increasing positive counts for "
                           f"lr_schedule multistep, got {milestones}")
    factors = config.lr_factors
    if factors and (config.lr_schedule != "multistep" or len(factors) != len(milestones)
                    or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < math.inf for f in factors)):
        raise FsltoolError(f"{where}: recipe key '{section}.lr_factors' must list one positive factor per lr_milestones entry "
                           f"with lr_schedule multistep, got {factors}")
    if config.nesterov and (config.optimizer != "sgd" or config.momentum <= 0):
        raise FsltoolError(f"{where}: recipe key '{section}.nesterov' needs optimizer sgd with momentum > 0")
    check_augment(config.augment, where, section)


def check_data(recipe: Recipe, stage: str = "meta-train") -> None:
    """The checks that need the data file: it opens, and holds what the recipe's ``stage`` needs (meta-train: enough
    classes and images for the training episodes, and the model builds on its images: the method and backbone
    options and their pairing, and its starting weights load; pretrain: the splits to pretrain on), and the stored
    validation and test episodes of the recipe's shapes."""
    import torch

    from fsltool.checkpoint import build_model, model_config
    from fsltool.data.store import FewShotData
    from fsltool.train import start_weights

    with FewShotData(recipe.data) as data:
        if stage == "pretrain":
            data.classes_of(recipe.pretrain.splits)
        else:
            data.sampler(recipe.train.splits, TrainingShape.parse(recipe.train.shape).largest, torch.Generator())
            method = build_model(model_config(recipe, data.image_shape, data.mean, data.std, data.provenance))
            start_weights(method, recipe, data.image_shape)
        data.stored_episodes("val", EpisodeShape.parse(recipe.validation.shape))
        data.stored_episodes("test", EpisodeShape.parse(recipe.test_shape))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)

