"""What the methods that adapt a network to each episode by gradient descent share (MAML, Reptile): the backbone
plus a linear head written as a pure function of its parameters, run for several tasks at once, the two ways of
normalising query images, and the export of the meta-learned body as a prototype embedding.

Tasks side by side. A meta-batch of T tasks with the same episode shape runs as ONE network: the tasks' images
are stacked along the channel axis ((T, N, C, H, W) -> (N, T*C, H, W)), every convolution is a grouped
convolution with ``groups=T`` whose weight stacks the T tasks' weights, BatchNorm statistics are taken per
channel (so per task: channel ``t*C + c`` is task t's channel c), and the head is a batched matrix product.
Nothing mixes tasks, so the result is the per-task computation up to float rounding, and autograd (second order
included: a grouped convolution's double backward is an ordinary convolution) gives each task its own gradient.
With T = 1 it is the plain network. Parameters are held task-major: a tensor of shape (T, *parameter shape).

BatchNorm never uses running statistics to classify:
- every support (training) pass normalises with the statistics of the images it sees, as the papers do;
- non-transductive (the default, honest): query images are normalised with the statistics of the support set,
  computed in the same pass, so a query's score depends on the support set and on itself alone, never on the
  other queries;
- non-transductive per query (Reptile's ``per_query_bn``): each query is normalised with the statistics of the
  support set plus itself, as Reptile's reference code evaluates without ``--transductive``;
- transductive (``transductive_bn``): queries are normalised with the statistics of the query batch, as MAML's
  and Reptile's reference code do (MAML always; Reptile with ``--transductive``): every query influences every
  other query's score, and such accuracies must be reported as transductive.
The running statistics are still tracked, at the meta-parameters on training support batches, for the exported
embedding alone (an exported network in eval mode normalises with them).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsltool.data.episodes import Episode, stack_episodes
from fsltool.errors import FsltoolError
from fsltool.methods.base import ExportGraph, Method, StepOutput, classifier_graph, embedding_graph, option_error, require_bool, require_positive_int
from fsltool.methods.protonet import prototype_scores
from fsltool.models.backbones import Backbone

Params = list[torch.Tensor]  # task-major: each (T, *shape), in TaskNetwork.parameters order


@dataclass(frozen=True)
class _Op:
    kind: str  # conv | bn | relu | pool
    module: nn.Module
    param: int = -1  # index of the conv weight / BN weight (BN bias follows it)


class TaskNetwork:
    """The backbone's layers (Conv2d, BatchNorm2d, ReLU, MaxPool2d), spatial mean pooling and the linear head, as
    a function of a task-major parameter list. MAML's Omniglot network averages its last feature maps into a
    vector before the head (Finn et al.'s code: ``reduce_mean`` over height and width), which is done here for
    every backbone: the head then has ``out_channels`` inputs whatever the image size.

    Feature maps are kept in NCHW whatever the backbone's own format: BatchNorm's backward and double backward
    on channels-last maps take over twice as long (scripts/benchmark_batchnorm_layouts.py).
    """

    def __init__(self, backbone: Backbone, head: nn.Linear, method: str) -> None:
        self.backbone = backbone
        self.head = head
        self.ops: list[_Op] = []
        count = 0
        for name, module in backbone.features.named_modules():
            if list(module.children()):
                continue
            if isinstance(module, nn.Conv2d):
                if module.bias is not None or module.dilation != (1, 1) or module.groups != 1 or module.padding_mode != "zeros":
                    raise FsltoolError(f"method {method!r}: backbone layer {name} is a convolution of a kind it cannot adapt")
                self.ops.append(_Op("conv", module, count))
                count += 1
            elif isinstance(module, nn.BatchNorm2d):
                if not module.affine:
                    raise FsltoolError(f"method {method!r}: backbone layer {name} is a BatchNorm without scale and shift")
                self.ops.append(_Op("bn", module, count))
                count += 2
            elif isinstance(module, nn.ReLU):
                self.ops.append(_Op("relu", module))
            elif isinstance(module, nn.MaxPool2d):
                self.ops.append(_Op("pool", module))
            else:
                raise FsltoolError(f"method {method!r}: cannot adapt backbone layer {name} ({type(module).__name__})")
        self.head_index = count

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The meta-parameters in the order the functional network indexes them (looked up on every call, so a
        module's ``.to()`` or ``.double()`` that replaces its parameters cannot leave stale references here)."""
        params: list[torch.Tensor] = []
        for op in self.ops:
            if op.kind == "conv":
                params.append(op.module.weight)
            elif op.kind == "bn":
                params += [op.module.weight, op.module.bias]
        return [*params, self.head.weight, self.head.bias]

    def meta_parameters(self, tasks: int, *, detach: bool = False) -> Params:
        """The meta-parameters repeated for ``tasks`` tasks: a view that sums the tasks' gradients back into
        them, or (``detach``) fresh leaf tensors for an inner loop that must not reach the meta-parameters."""
        if detach:
            return [p.detach().unsqueeze(0).repeat(tasks, *([1] * p.dim())).requires_grad_() for p in self.parameters]
        return [p.unsqueeze(0).expand(tasks, *p.shape) for p in self.parameters]

    def logits(
        self, params: Params, images: torch.Tensor, *, stats_rows: int | None = None, track: bool = False
    ) -> torch.Tensor:
        """(T, N, C, H, W) images -> (T, N, way) logits.

        BatchNorm normalises all N images of a task with the statistics of its first ``stats_rows`` images (all
        of them when None). ``track`` folds those statistics into the BatchNorm running averages, task by task
        in order, as T separate training passes would."""
        tasks, n = images.shape[:2]
        rows = n if stats_rows is None else stats_rows
        x = self.backbone.normalize(images.flatten(0, 1)).unflatten(0, (tasks, n))
        x = x.transpose(0, 1).flatten(1, 2).contiguous()  # (N, T*C, H, W), NCHW: see the class docstring
        for op in self.ops:
            if op.kind == "conv":
                conv = op.module
                assert isinstance(conv, nn.Conv2d)
                x = F.conv2d(x, params[op.param].flatten(0, 1), stride=conv.stride, padding=conv.padding, groups=tasks)
            elif op.kind == "bn":
                x = self._batch_norm(x, params[op.param], params[op.param + 1], op.module, rows, track)
            elif op.kind == "relu":
                x = F.relu(x)
            else:
                pool = op.module
                assert isinstance(pool, nn.MaxPool2d)
                x = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, ceil_mode=pool.ceil_mode)
        features = x.mean((-2, -1)).view(n, tasks, -1)  # (N, T, D)
        weight, bias = params[self.head_index], params[self.head_index + 1]  # (T, way, D), (T, way)
        return torch.einsum("ntd,tkd->tnk", features, weight) + bias.unsqueeze(1)

    @staticmethod
    def _batch_norm(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, module: nn.Module, rows: int, track: bool
    ) -> torch.Tensor:
        """F.batch_norm when the statistics are those of all rows; written out in elementary ops when they come
        from the first ``rows`` only (support-set statistics for queries), which F.batch_norm cannot do. The
        native op keeps fewer tensors for backward: measured on the 32-task second-order MAML step
        (scripts/benchmark_maml_libraries.py), less time and ~40% less peak memory than the elementary ops."""
        assert isinstance(module, nn.BatchNorm2d)
        whole = rows == x.shape[0]
        reference = x if whole else x[:rows]
        if track and module.track_running_stats and module.running_mean is not None and module.running_var is not None:
            with torch.no_grad():
                var, mean = torch.var_mean(reference, (0, 2, 3), correction=0)
                count = reference.numel() // reference.shape[1]
                unbiased = var * (count / max(count - 1, 1))
                momentum = module.momentum if module.momentum is not None else 0.1
                for task_mean, task_var in zip(mean.view(-1, module.num_features), unbiased.view(-1, module.num_features)):
                    module.running_mean.lerp_(task_mean.to(module.running_mean.dtype), momentum)
                    module.running_var.lerp_(task_var.to(module.running_var.dtype), momentum)
                    if module.num_batches_tracked is not None:
                        module.num_batches_tracked += 1
        if whole:
            return F.batch_norm(x, None, None, weight.flatten(), bias.flatten(), training=True, eps=module.eps)
        mean = reference.mean((0, 2, 3))
        var = (reference - mean[:, None, None]).pow(2).mean((0, 2, 3))  # biased, as BatchNorm normalises
        scale = torch.rsqrt(var + module.eps) * weight.flatten()
        return (x - mean[:, None, None]) * scale[:, None, None] + bias.flatten()[:, None, None]

    def query_logits(self, params: Params, support: torch.Tensor, query: torch.Tensor, transductive: bool) -> torch.Tensor:
        """(T, S, ...) support, (T, Q, ...) query -> (T, Q, way): query BatchNorm statistics from the support set
        (non-transductive) or from the query batch (transductive)."""
        if transductive:
            return self.logits(params, query)
        return self.logits(params, torch.cat([support, query], 1), stats_rows=support.shape[1])[:, support.shape[1] :]

    def per_query_logits(self, params: Params, support: torch.Tensor, query: torch.Tensor, tasks_per_pass: int = 128) -> torch.Tensor:
        """(T, S, ...) support, (T, Q, ...) query -> (T, Q, way), each query normalised with the BatchNorm statistics
        of the support set plus itself (Reptile's reference code without ``--transductive``): still
        non-transductive, since no query sees another. Each (task, query) pair is a grouped task of S+1 images,
        ``tasks_per_pass`` pairs per pass (each pass holds that many copies of the parameters)."""
        tasks, count = query.shape[:2]
        task_of = torch.arange(tasks).repeat_interleave(count)  # pair -> its task
        queries = query.flatten(0, 1)
        logits = []
        for start in range(0, tasks * count, tasks_per_pass):
            pairs = task_of[start : start + tasks_per_pass]
            images = torch.cat([support[pairs], queries[start : start + tasks_per_pass].unsqueeze(1)], 1)
            logits.append(self.logits([p[pairs] for p in params], images)[:, -1])
        return torch.cat(logits).view(tasks, count, -1)


def task_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(T, N, way), (T, N) -> (T,) mean cross-entropy per task."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(1)


class PooledBody(nn.Module):
    """The meta-learned body: backbone feature maps averaged over space, the head's input (eval mode: BatchNorm
    with the running statistics tracked during meta-training)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone
        return backbone.features(backbone.normalize(images).contiguous(memory_format=backbone.memory_format)).mean((-2, -1))


class PrototypeClassifier(nn.Module):
    """Prototype classification (Snell et al.) on the body's embeddings: the exported "classifier" graph."""

    def __init__(self, body: PooledBody) -> None:
        super().__init__()
        self.body = body

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return prototype_scores(self.body(support), support_labels, self.body(query), support_labels.max() + 1)


def inputs_for_autograd(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors made under inference_mode cannot be saved for backward: copy those (outside inference_mode)."""
    return [t.clone() if t.is_inference() else t for t in tensors]


class AdaptiveMethod(Method):
    """Backbone + linear head of ``way`` outputs, adapted to each episode by an inner loop.

    The head is zero-initialised. Labels are assigned to classes afresh in every episode, so an initial head's
    class-specific rows carry nothing that transfers; a random head only adds a label-permutation-dependent bias
    to the first scores. From a zero head the first SGD step on the support cross-entropy makes row c equal to
    lr/N * (sum of class c's features - 1/way * sum of all features): a centred class-mean (prototype-like)
    classifier on the body's features. (Kao et al. 2022, "MAML is a noisy contrastive learner", go further and zero
    the head before every outer step; fsltool only starts from zero.)
    """

    embeds_independently = False
    episodes_per_call = 64  # evaluation hands over this many episodes; they adapt side by side, as grouped networks
    images_per_pass = 4096  # ... of at most this many images each (support + queries), which bounds the activations

    def __init__(self, backbone: Backbone, way: int, transductive_bn: bool) -> None:
        super().__init__(backbone)
        require_positive_int(self.name, "way", way)
        if way < 2:
            raise option_error(self.name, "way", f"must be at least 2 (the episodes' way), got {way}")
        require_bool(self.name, "transductive_bn", transductive_bn)
        self.way = way
        self.transductive = transductive_bn  # read by evaluation to label its results
        self.head = nn.Linear(backbone.out_channels, way)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.network = TaskNetwork(backbone, self.head, self.name)

    def check_way(self, way: int) -> None:
        if way != self.way:
            raise FsltoolError(
                f"method {self.name!r}: the head has method_options.way = {self.way} outputs, but the episode is "
                f"{way}-way; train and evaluate at the way the model was built for (or set method_options.way)"
            )

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Adapt a copy to the support set (the training or the test inner loop, as the mode says), then score the
        queries; no gradient reaches the meta-parameters (MAML's differentiable forward overrides this)."""
        return self.score_episodes(support[None], support_labels[None], query[None])[0]

    def score_episodes(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Episodes adapted side by side in groups of at most ``images_per_pass`` images (evaluating 600 stored
        Reptile episodes: 234.5 -> 81.1 s, scripts/benchmark_methods.py, README)."""
        self.episode_way(support_labels)
        per_pass = max(1, self.images_per_pass // (support.shape[1] + query.shape[1]))
        with self.grad_context(False):
            support, support_labels, query = inputs_for_autograd((support, support_labels, query))
            return torch.cat([self.adapted_scores(support[i : i + per_pass], support_labels[i : i + per_pass], query[i : i + per_pass])
                              for i in range(0, support.shape[0], per_pass)])

    @abstractmethod
    def adapted_scores(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """(T, S, ...), (T, S), (T, Q, ...) -> (T, Q, way), detached: each task adapted on its own support set
        (autograd is on, outside inference mode, for the inner loop), then its queries scored."""

    def episode_way(self, support_labels: torch.Tensor) -> int:
        way = int(support_labels.max()) + 1
        self.check_way(way)
        return way

    @staticmethod
    def stack(episodes: Sequence[Episode]) -> tuple[torch.Tensor, ...] | None:
        """(support, support labels, query, query labels) stacked over episodes of one shape, or None."""
        if len({(e.support.shape, e.query.shape) for e in episodes}) != 1:
            return None
        return stack_episodes(episodes)

    @staticmethod
    def grad_context(differentiable: bool) -> ExitStack:
        """Autograd on for an inner loop, even inside evaluation's no_grad or export's inference_mode."""
        stack = ExitStack()
        if not differentiable:
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        return stack

    def step(self, episode: Episode) -> StepOutput:
        return self.meta_step([episode])[0]

    def meta_step(self, episodes: Sequence[Episode]) -> list[StepOutput]:
        """A meta-batch as one grouped network when the episodes share a shape (and ``group_tasks``), else
        episode by episode; the training loop averages the losses and backpropagates."""
        for episode in episodes:
            self.check_way(episode.shape.way)
        stacked = self.stack(episodes) if self.group_tasks else None
        if stacked is not None:
            return self._steps(*stacked)
        return [self._steps(*self.stack([episode]))[0] for episode in episodes]  # type: ignore[misc]  (one episode stacks)

    @abstractmethod
    def _steps(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor
    ) -> list[StepOutput]:
        """The method's losses for stacked tasks (T, ...) of one shape."""

    def exported_classifier(self) -> nn.Module:
        """The PyTorch module the exported "classifier" graph computes: prototype classification on the body's
        embeddings, which is not ``self(...)`` (that adapts the whole network to the support set first)."""
        return PrototypeClassifier(PooledBody(self.backbone))

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        """The meta-learned body as an embedding for prototype classification, and that classifier."""
        classifier = self.exported_classifier()
        assert isinstance(classifier, PrototypeClassifier)
        return {
            "embedding": embedding_graph(classifier.body, example),
            "classifier": classifier_graph(classifier, example),
        }


def require_positive_float(method: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise option_error(method, key, f"must be a positive number, got {value!r}")
    return float(value)
