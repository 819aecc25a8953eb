"""The one interface every meta-learning method implements, and the registry that maps recipe names to it."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError
from fsltool.models.backbones import Backbone


@dataclass
class StepOutput:
    loss: torch.Tensor
    scores: torch.Tensor  # (queries, way): higher is more likely
    labels: torch.Tensor | None = None  # the scored queries' labels where a method scores only some (None: all, in order)


@dataclass(frozen=True)
class TaskShare:
    """Where the episodes a meta_step computes sit in their meta-batch: ``total`` tasks, of which those from ``start``
    on (a data-parallel process's slice, handed in by the training loop; see fsltool.distributed)."""

    start: int
    total: int


@dataclass
class ExportGraph:
    """A module to export with example inputs and which input dimensions are dynamic."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


class Method(nn.Module):
    """A few-shot classifier: a support set (images + labels) and query images in, query scores out.

    Methods whose embedding of an image does not depend on the episode set ``embeds_independently`` and
    implement ``embed`` and ``scores_from_embeddings``: evaluation then embeds each image once, not once
    per episode, and export can ship the embedding network alone.
    """

    name: ClassVar[str]
    embeds_independently: bool = False  # a class attribute, or per instance when options decide it (MatchingNet's fce)
    # Reads the support set as a sequence (MANN, SNAIL) and is trained on shuffled orders: evaluation then shows it
    # a seeded shuffled order (fsltool.evaluate.support_orders), not the stored class-by-class layout.
    order_sensitive: ClassVar[bool] = False
    # What `fsltool export`'s classifier scores when it is not the method's own forward (MAML, Reptile), else None:
    # a calibration fitted on the method's scores is then not carried into the exported or enrolled graphs.
    exported_scores: ClassVar[str | None] = None
    episodes_per_call: int = 1  # episodes evaluation hands to score_episodes at once
    meta_trainable: ClassVar[bool] = True  # False: the backbone comes from supervised pretraining; train refuses the method
    label_smoothing: float = 0.0  # the training loss's (torch's definition); methods that offer it set it from an option
    # Options under which the method classifies from a backbone alone, with nothing of its own to train: what
    # ``evaluate --method`` builds it with over another run's backbone (ridge, svm: their score scale fixed at 1).
    classifier_only_options: ClassVar[dict[str, Any]] = {}
    # Classifies from any number of support embeddings per class (a mean, an attention, a classifier fitted on them),
    # so `evaluate --support-copies` may hand it several augmented copies of each support image (RFS's evaluation).
    takes_support_copies: ClassVar[bool] = False

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Scores (queries, way), with way = support_labels.max() + 1. By default, for methods that classify from
        embeddings: the episode embedded in one pass, then scored by ``scores_from_embeddings`` as a batch of one
        episode; methods that do not, override it."""
        support_embeddings, query_embeddings = self.backbone_on_episode(support, query)
        way = support_labels.max() + 1
        return self.scores_from_embeddings(support_embeddings[None], support_labels[None], query_embeddings[None], way)[0]

    def backbone_loaded(self) -> None:
        """The backbone has just taken its starting weights (a run's ``init`` or ``backbone_options.weights``),
        after this method was built: state the method copied from the backbone when it was built is refreshed
        here, so that it starts from the loaded weights too."""

    def transductive_copy(self) -> Method | None:
        """A copy that normalises each episode's query batch with its own BatchNorm statistics, for a method whose
        BatchNorm mode is its own option (``evaluate --transductive``); None where evaluation sets the mode itself
        (methods that embed each image on their own) or the method has no such mode."""
        return None

    def score_episodes(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Evaluation, batched over episodes of one shape: (E, S, ...), (E, S), (E, Q, ...) -> (E, Q, way), the same
        scores as ``forward`` on each episode. Methods that can score several episodes at once set
        ``episodes_per_call`` and override this; evaluation hands them that many episodes per call."""
        return torch.stack([self(s, labels, q) for s, labels, q in zip(support, support_labels, query)])

    def backbone_on_episode(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query through the backbone in one pass: one set of BatchNorm batch statistics per episode."""
        features = self.backbone(torch.cat([support, query]))
        return features[: support.shape[0]], features[support.shape[0] :]

    def step(self, episode: Episode) -> StepOutput:
        """The training objective on one episode (cross-entropy over the scores unless overridden)."""
        scores = self(episode.support, episode.support_labels, episode.query)
        return StepOutput(F.cross_entropy(scores, episode.query_labels, label_smoothing=self.label_smoothing), scores)

    def meta_step(self, episodes: list[Episode], share: TaskShare | None = None) -> list[StepOutput]:
        """One meta-update's worth of episodes (recipe ``train.meta_batch``); the loop backpropagates the mean
        loss. Methods that can process a meta-batch faster than episode by episode override this.

        ``share``: the episodes are a data-parallel process's part of a larger meta-batch (None: the whole of it).
        A method that draws random numbers per task draws them for the whole meta-batch and keeps its share's, so
        the global RNG advances as in one process."""
        return [self.step(episode) for episode in episodes]

    def embedding_network(self) -> nn.Module:
        """The module that ``embed`` applies (the backbone unless a method says otherwise): evaluation compiles
        a frozen inference copy of it, export writes it as the embedding graph."""
        return self.backbone

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if not self.embeds_independently:
            raise NotImplementedError(f"{self.name} does not embed images independently of the episode")
        return self.embedding_network()(images)

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int
    ) -> torch.Tensor:
        """Batched over episodes: (E, S, *F), (E, S), (E, Q, *F) -> (E, Q, way), F the embedding's shape."""
        raise NotImplementedError(f"{self.name} does not classify from embeddings")

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        """The graphs `fsltool export` writes, keyed by file stem."""
        raise NotImplementedError(f"{self.name} cannot be exported")


def class_onehot(labels: torch.Tensor, way: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(...,) labels -> (..., way) one-hot, by comparison with arange(way) rather than F.one_hot, so ``way`` may
    be a tensor computed from the labels: the exported graph then has dynamic way, shot and query."""
    return (labels.unsqueeze(-1) == torch.arange(way, device=labels.device)).to(dtype)


def embedding_graph(backbone: nn.Module, example: Episode) -> ExportGraph:
    """The embedding network alone, dynamic in batch (for methods whose ``embed`` is their backbone)."""
    return ExportGraph(backbone, (example.query,), ["images"], ["embeddings"], {"images": {0: "batch"}})


def classifier_graph(classifier: nn.Module, example: Episode) -> ExportGraph:
    """A classifier (support set and queries to scores; usually the whole method), dynamic in way, shot and query."""
    return ExportGraph(
        classifier,
        (example.support, example.support_labels, example.query),
        ["support", "support_labels", "query"],
        ["scores"],
        {"support": {0: "support"}, "support_labels": {0: "support"}, "query": {0: "query"}},
    )


def full_precision(device: torch.device) -> torch.autocast:
    """Autocast off: a per-episode solve (a linear system, an interior-point iteration) in the dtype it was given,
    not bfloat16 products under a bf16 recipe (they cost a ridge regression's or an SVM's scores about 1%)."""
    return torch.autocast(device.type, enabled=False)


def option_error(method: str, key: str, problem: str) -> FsltoolError:
    """A bad value in a recipe's ``method_options``, named the way the recipe spells it."""
    return FsltoolError(f"method {method!r}: method_options.{key} {problem}")


def require_bool(method: str, key: str, value: object) -> None:
    """YAML's ``yes``/``1``/``"true"`` are not booleans to the method: refuse them rather than guess."""
    if not isinstance(value, bool):
        raise option_error(method, key, f"must be true or false, got {value!r}")


def require_number(method: str, key: str, value: object, accept: Callable[[float], bool], description: str) -> None:
    """A finite real option that ``accept`` allows; YAML booleans and strings are refused, not coerced."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not accept(value):
        raise option_error(method, key, f"must be {description}, got {value!r}")


def add_learned_scale(method: Method, scale: object, learn_scale: object) -> None:
    """``method.scale``, the factor its scores are multiplied by: a parameter starting at ``scale`` (the number itself,
    as MetaOptNet's ClassificationHead) when ``learn_scale``, else a fixed buffer; both options checked."""
    require_number(method.name, "scale", scale, lambda v: v > 0, "a positive number")
    require_bool(method.name, "learn_scale", learn_scale)
    if learn_scale:
        method.scale = nn.Parameter(torch.tensor(float(scale)))  # type: ignore[arg-type]
    else:
        method.register_buffer("scale", torch.tensor(float(scale)))  # type: ignore[arg-type]


def require_choice(method: str, key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise option_error(method, key, f"must be one of {', '.join(choices)}, got {value!r}")


def require_positive_int(method: str, key: str, value: object) -> None:
    """Recipe values arrive as parsed YAML, unchecked: a string or a bool must not reach a layer size."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise option_error(method, key, f"must be a positive integer, got {value!r}")


M = TypeVar("M", bound=type[Method])
METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make a method available to recipes under ``name``."""

    def register(cls: M) -> M:
        cls.name = name
        METHODS[name] = cls
        return cls

    return register


def method_options(name: str) -> dict[str, inspect.Parameter]:
    """The recipe options a method accepts: its constructor's keyword parameters after the backbone."""
    cls = get_method(name)
    parameters = inspect.signature(cls.__init__).parameters
    return {key: p for key, p in parameters.items() if key not in ("self", "backbone")}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise FsltoolError(f"unknown method {name!r} (available: {', '.join(sorted(METHODS))})") from None


def build_method(name: str, backbone: Backbone, options: dict[str, Any]) -> Method:
    return get_method(name)(backbone, **options)
