"""Baseline and Baseline++ (Chen, Liu, Kira, Wang and Huang, "A Closer Look at Few-shot Classification", ICLR 2019):
a backbone from ordinary supervised pretraining, frozen; for each episode a NEW classifier head is fitted on the
support embeddings by SGD and scores the queries. ``baseline``: a linear head W x + b. ``baseline++``: a cosine head,
a scale times the cosine similarity of the feature to each class's weight vector, that vector under weight
normalisation (a direction and a learnable per-class norm).

The fine-tuning protocol, read from the authors' code (github.com/wyharveychen/CloserLookFewShot, commit e03aca8),
is the default here, every number an option:

- methods/baselinefinetune.py, ``BaselineFinetune.set_forward_adaptation``: the head is a fresh ``nn.Linear(D, way)``
  (baseline) or ``backbone.distLinear(D, way)`` (baseline++) per episode, trained with
  ``torch.optim.SGD(lr=0.01, momentum=0.9, dampening=0.9, weight_decay=0.001)`` on all its parameters and
  cross-entropy averaged over the mini-batch, for 100 epochs; each epoch is a fresh random permutation of the
  support set cut into mini-batches of 4 (the last one smaller). The features are the flattened embeddings.
- backbone.py, ``distLinear``: features divided by ``||x|| + 1e-5``; a bias-free ``nn.Linear`` under ``WeightNorm``
  with dim 0 (``w_c = g_c v_c / ||v_c||``, ``g_c`` starting at ``||v_c||``: "class_wise_learnable_norm", the repository's
  issues #4 and #8); scores are the cosines times a fixed scale factor of 2, or 10 when way > 200. Without weight
  normalisation the reference instead rescales the weights to ``w / (||w|| + 1e-5)`` before every forward pass.
- Heads start as torch initialises ``nn.Linear``: weights (and the linear head's bias) uniform in +-1/sqrt(D).

One deliberate difference: the reference draws the initial head and the mini-batch order from global RNGs; here both
come from ``torch.Generator().manual_seed(seed)`` and are the same for every episode of a call, so an evaluation is
reproducible and scoring many episodes at once equals scoring them one by one. Every episode's head is fitted in one
batched tensor program (heads (E, way, D)), with closed-form gradients and torch.optim.SGD's update written out as
tensor operations: no autograd, so it also runs inside evaluation's ``torch.inference_mode``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError
from fsltool.methods.base import (
    ExportGraph,
    Method,
    StepOutput,
    TaskShare,
    class_onehot,
    option_error,
    register_method,
    require_bool,
    require_number,
    require_positive_int,
)
from fsltool.models.backbones import Backbone

# The reference protocol (methods/baselinefinetune.py): the defaults of both methods' options.
LR = 0.01
MOMENTUM = 0.9
DAMPENING = 0.9
WEIGHT_DECAY = 0.001
EPOCHS = 100
BATCH_SIZE = 4
NORM_EPSILON = 1e-5  # backbone.py distLinear: x / (||x|| + 1e-5)

Params = list[torch.Tensor]  # a head's parameters, each batched over episodes: (E, ...)


def uniform_like_linear(shape: tuple[int, ...], dim: int, generator: torch.Generator) -> torch.Tensor:
    """torch's nn.Linear initialisation (kaiming_uniform with a=sqrt(5) for weights, the same bound for the bias):
    uniform in +-1/sqrt(in_features). The reference fine-tunes from it."""
    bound = 1 / math.sqrt(dim)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by (norm + 1e-5), as distLinear does to features (and to weights without weight norm)."""
    return x / (x.norm(dim=-1, keepdim=True) + NORM_EPSILON)


def cross_entropy_score_gradients(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d/d scores of each episode's mean cross-entropy over its N rows: (E, N, way) scores and one-hot targets."""
    return (scores.softmax(-1) - targets) / scores.shape[1]


class Head(ABC):
    """A classifier head fitted per episode. Its parameters are plain tensors batched over episodes, and it gives
    the gradient of its loss in closed form (no autograd: evaluation runs under inference_mode)."""

    def features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """What the head sees of (E, N, D) embeddings."""
        return embeddings

    @abstractmethod
    def initial(self, way: int, dim: int, generator: torch.Generator) -> Params:
        """One episode's starting parameters (unbatched, float32), drawn from ``generator``."""

    def project(self, params: Params) -> Params:
        """What happens to the parameters before every forward pass (nothing, unless a head says otherwise)."""
        return params

    @abstractmethod
    def scores(self, params: Params, features: torch.Tensor) -> torch.Tensor:
        """(E, N, D) features -> (E, N, way) scores."""

    @abstractmethod
    def gradients(self, params: Params, features: torch.Tensor, targets: torch.Tensor) -> Params:
        """d/d params of each episode's mean cross-entropy of ``scores(params, features)`` against (E, N, way)
        one-hot targets. Fresh tensors: the SGD update works on them in place."""


class LinearHead(Head):
    """baseline: scores W x + b."""

    def initial(self, way: int, dim: int, generator: torch.Generator) -> Params:
        return [uniform_like_linear((way, dim), dim, generator), uniform_like_linear((way,), dim, generator)]

    def scores(self, params: Params, features: torch.Tensor) -> torch.Tensor:
        weight, bias = params
        return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))

    def gradients(self, params: Params, features: torch.Tensor, targets: torch.Tensor) -> Params:
        score_gradients = cross_entropy_score_gradients(self.scores(params, features), targets)
        return [score_gradients.transpose(1, 2) @ features, score_gradients.sum(1)]


class CosineHead(Head):
    """baseline++ (distLinear): scale * g_c * cos(v_c, x) under weight norm (parameters v, g), else scale * cos(w_c, x)
    with w renormalised before every forward pass (parameter w)."""

    def __init__(self, scale: float, weight_norm: bool) -> None:
        self.scale = scale
        self.weight_norm = weight_norm

    def features(self, embeddings: torch.Tensor) -> torch.Tensor:
        return unit_rows(embeddings)

    def initial(self, way: int, dim: int, generator: torch.Generator) -> Params:
        direction = uniform_like_linear((way, dim), dim, generator)
        return [direction, direction.norm(dim=-1)] if self.weight_norm else [direction]

    def project(self, params: Params) -> Params:
        return params if self.weight_norm else [unit_rows(params[0])]

    def scores(self, params: Params, features: torch.Tensor) -> torch.Tensor:
        if not self.weight_norm:
            return self.scale * features @ params[0].transpose(1, 2)
        return self.scale * params[1].unsqueeze(1) * self.cosines(params[0], features)

    @staticmethod
    def cosines(direction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(E, N, way) cosines of unit-length features to the directions: scaled after the matmul, where it is small."""
        return features @ direction.transpose(1, 2) / direction.norm(dim=-1).unsqueeze(1)

    def gradients(self, params: Params, features: torch.Tensor, targets: torch.Tensor) -> Params:
        if not self.weight_norm:
            score_gradients = cross_entropy_score_gradients(self.scores(params, features), targets)
            return [self.scale * score_gradients.transpose(1, 2) @ features]
        # z_c = s g_c cos_c, cos_c = (v_c . x) / |v_c|:
        #   dz_c/dg_c = s cos_c,   dz_c/dv_c = s g_c / |v_c| (x - cos_c v_c / |v_c|)
        # The per-class factors scale the small (E, N, way) score gradients before the matmul, not (E, way, D).
        direction, gain = params
        norms = direction.norm(dim=-1)  # (E, way)
        cosines = features @ direction.transpose(1, 2) / norms.unsqueeze(1)
        score_gradients = cross_entropy_score_gradients(self.scale * gain.unsqueeze(1) * cosines, targets)
        along_cosines = (score_gradients * cosines).sum(1)  # (E, way): sum_n dL/dz_nc cos_nc
        factor = self.scale * gain / norms
        direction_gradient = (score_gradients * factor.unsqueeze(1)).transpose(1, 2) @ features
        direction_gradient.addcmul_(direction, (-factor * along_cosines / norms).unsqueeze(-1))
        return [direction_gradient, self.scale * along_cosines]


def epoch_orders(support_size: int, epochs: int, generator: torch.Generator) -> torch.Tensor:
    """(epochs, support_size): each epoch a fresh permutation of the support set, as the reference loops; each
    is cut into mini-batches in order."""
    return torch.stack([torch.randperm(support_size, generator=generator) for _ in range(epochs)])


class EpisodeHeadMethod(Method):
    """A frozen embedding and a head fitted on each episode's support set by SGD (the Baseline protocol).

    Options (defaults: the reference's): ``lr``, ``momentum``, ``dampening``, ``weight_decay`` of the SGD update
    (torch.optim.SGD's definition); ``epochs`` over the support set in mini-batches of ``batch_size``; ``seed`` of
    the initial head and the mini-batch order."""

    embeds_independently = True
    takes_support_copies = True
    meta_trainable = False

    def __init__(
        self,
        backbone: Backbone,
        lr: float = LR,
        momentum: float = MOMENTUM,
        dampening: float = DAMPENING,
        weight_decay: float = WEIGHT_DECAY,
        epochs: int = EPOCHS,
        batch_size: int = BATCH_SIZE,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone)
        require_number(self.name, "lr", lr, lambda v: v > 0, "a positive number")
        require_number(self.name, "momentum", momentum, lambda v: 0 <= v < 1, "a number in [0, 1)")
        require_number(self.name, "dampening", dampening, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        require_number(self.name, "weight_decay", weight_decay, lambda v: v >= 0, "a non-negative number")
        require_positive_int(self.name, "epochs", epochs)
        require_positive_int(self.name, "batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise option_error(self.name, "seed", f"must be a non-negative integer, got {seed!r}")
        self.lr, self.momentum, self.dampening, self.weight_decay = lr, momentum, dampening, weight_decay
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed

    @abstractmethod
    def head(self, way: int) -> Head:
        """The head this method fits on a ``way``-way episode."""

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor
    ) -> torch.Tensor:
        way = int(way)
        head = self.head(way)
        params = self.fit(head, head.features(support.flatten(2)), class_onehot(support_labels, way, support.dtype))
        return head.scores(head.project(params), head.features(query.flatten(2)))

    def fit(self, head: Head, features: torch.Tensor, targets: torch.Tensor) -> Params:
        """SGD on the mean cross-entropy of each mini-batch, all episodes' heads at once: (E, S, D) features and
        (E, S, way) one-hot targets -> the fitted parameters. The head is an inner fit on frozen features, not a
        function anything backpropagates through: no graph is recorded."""
        episodes, support_size, dim = features.shape
        generator = torch.Generator().manual_seed(self.seed)
        start = head.initial(targets.shape[-1], dim, generator)  # drawn before the order, from the same generator
        orders = epoch_orders(support_size, self.epochs, generator).to(features.device)
        with torch.no_grad():
            params = [p.to(features).expand(episodes, *p.shape).clone() for p in start]
            velocities: Params = []
            for order in orders:
                # One gather per epoch; its mini-batches are then slices (views), not gathers.
                epoch_features, epoch_targets = features.index_select(1, order), targets.index_select(1, order)
                for first in range(0, support_size, self.batch_size):
                    batch = slice(first, first + self.batch_size)
                    params = head.project(params)
                    gradients = head.gradients(params, epoch_features[:, batch], epoch_targets[:, batch])
                    params, velocities = self.sgd_step(params, gradients, velocities)
        return params

    def sgd_step(self, params: Params, gradients: Params, velocities: Params) -> tuple[Params, Params]:
        """torch.optim.SGD's update (no nesterov), in place on batched tensors: the parameters and momentum buffers
        after one step (no buffers before the first step, whose buffer is the gradient itself, undampened)."""
        for gradient, param in zip(gradients, params):
            gradient.add_(param, alpha=self.weight_decay)
        if self.momentum:
            if velocities:
                for velocity, gradient in zip(velocities, gradients):
                    velocity.mul_(self.momentum).add_(gradient, alpha=1 - self.dampening)
            else:
                velocities = gradients
            gradients = velocities
        for param, gradient in zip(params, gradients):
            param.add_(gradient, alpha=-self.lr)
        return params, velocities

    def step(self, episode: Episode) -> StepOutput:
        raise self.not_meta_trained()

    def meta_step(self, episodes: list[Episode], share: TaskShare | None = None) -> list[StepOutput]:
        raise self.not_meta_trained()

    def not_meta_trained(self) -> FsltoolError:
        return FsltoolError(
            f"method {self.name!r} is not meta-trained: its backbone comes from `fsltool pretrain` (or a run given "
            "as init:); meta-train protonet instead"
        )

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        raise FsltoolError(
            f"method {self.name!r} cannot be exported: it fits a new classifier head on each episode's support set "
            f"({self.epochs} epochs of SGD), which is not one fixed graph; export the backbone under protonet "
            "instead (a protonet run with this run as init:)"
        )


@register_method("baseline")
class Baseline(EpisodeHeadMethod):
    """A linear head W x + b fitted per episode (Chen et al. 2019's Baseline)."""

    def head(self, way: int) -> Head:
        return LinearHead()


@register_method("baseline++")
class BaselinePlusPlus(EpisodeHeadMethod):
    """A cosine head fitted per episode (Chen et al. 2019's Baseline++). ``scale`` multiplies the cosines (default:
    the reference's 2, or 10 above 200 classes); ``weight_norm`` gives each class weight a learned norm (the
    reference's default) rather than unit length."""

    def __init__(
        self,
        backbone: Backbone,
        scale: float | None = None,
        weight_norm: bool = True,
        lr: float = LR,
        momentum: float = MOMENTUM,
        dampening: float = DAMPENING,
        weight_decay: float = WEIGHT_DECAY,
        epochs: int = EPOCHS,
        batch_size: int = BATCH_SIZE,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, lr, momentum, dampening, weight_decay, epochs, batch_size, seed)
        if scale is not None:
            require_number(self.name, "scale", scale, lambda v: v > 0, "a positive number (or null: 2, 10 above 200-way)")
        require_bool(self.name, "weight_norm", weight_norm)
        self.scale = scale
        self.weight_norm = weight_norm

    def head(self, way: int) -> Head:
        scale = self.scale if self.scale is not None else (2.0 if way <= 200 else 10.0)
        return CosineHead(scale, self.weight_norm)
