"""What the methods that adapt a network to each episode by gradient descent share (MAML, Reptile): the backbone
plus a linear head written as a pure function of its parameters, run for several tasks at once, the two ways of
normalising query images, and the export of the meta-learned body as a prototype embedding.

The adapted network is the exported body (MetaLearnedBody: the backbone's own forward, its last feature maps
averaged over space or flattened, ``head_input``) followed by the linear head, with each task's parameters
substituted. Two exact ways to evaluate it for a meta-batch of T tasks, chosen on every call from the backbone's
structure:

- Grouped (fast), when the feature layers are provably a plain chain (see chain_layers: nested nn.Sequential of
  Conv2d, BatchNorm2d, ReLU, MaxPool2d and ZeroPad2d, no hooks, no module applied twice): the T tasks run as ONE network.
  The tasks' images are stacked along the channel axis ((T, N, C, H, W) -> (N, T*C, H, W)), every convolution is
  a grouped convolution with ``groups=T`` whose weight stacks the T tasks' weights, BatchNorm statistics are
  taken per channel (so per task: channel ``t*C + c`` is task t's channel c), and the head is a batched matrix
  product. Nothing mixes tasks, so the result is the per-task computation up to float rounding, and autograd
  (second order included: a grouped convolution's double backward is an ordinary convolution) gives each task
  its own gradient.
- Per task (any other backbone: residual blocks, other layers): the backbone's own forward, called once per task
  with that task's parameters (torch.func.functional_call). Not torch.func.vmap over the tasks: with BatchNorm it
  gave wrong second-order gradients (PLATFORM.md, "Correctness traps").

With T = 1 both are the plain network. Parameters are held task-major: a tensor of shape (T, *parameter shape).

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
embedding alone (an exported network in eval mode normalises with them). A pass may put stand-ins in place of the
BatchNorm layers (``norms``: MAML's per-step BatchNorm): their eps and running statistics are used instead. On the per-task path, batch statistics
are those of every nn.BatchNorm layer (other layers, such as dropout, keep the module's mode).
"""

from __future__ import annotations

import copy
import inspect
import math
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from fsltool.data.episodes import Episode
from fsltool.device import device_of, work_sizes
from fsltool.errors import FsltoolError
from fsltool.methods.base import (
    ExportGraph, Method, StepOutput, TaskShare, classifier_graph, embedding_graph, option_error, require_bool, require_choice,
    require_number, require_positive_int,
)
from fsltool.methods.protonet import class_prototypes, prototype_scores
from fsltool.models.backbones import Backbone

Params = list[torch.Tensor]  # task-major: each (T, *shape), in TaskNetwork.parameters order
# BatchNorm layers of the backbone -> stand-ins whose eps, momentum and running statistics a pass uses instead
# (MAML's per_step_bn: one set per inner step); their scale and shift still come from the parameter list.
NormOverride = Mapping[nn.Module, _BatchNorm]
# What the linear head reads of the last feature maps (C, H, W): ``mean``, their average over space (C inputs: MAML's
# Omniglot code, ``reduce_mean``), or ``flatten``, the maps flattened (C*H*W inputs: Reptile's code, whose Omniglot
# network flattens its 2x2 maps into 256 inputs, and MAML's miniImageNet network, 800 from 32x5x5).
HEAD_INPUTS = ("mean", "flatten")
# method_options.initial_head: the meta-learned head's starting weights (its bias starts at 0). zero: fsltool's
# default (AdaptiveMethod's docstring); glorot: Glorot uniform, Reptile's tf.layers.dense and MAML's miniImageNet
# head; normal: a standard normal, MAML's Omniglot head (tf.random_normal).
INITIAL_HEADS: dict[str, Callable[[torch.Tensor], object]] = {
    "zero": nn.init.zeros_, "glorot": nn.init.xavier_uniform_, "normal": nn.init.normal_,
}


def head_input(maps: torch.Tensor, flatten: bool) -> torch.Tensor:
    """(..., C, H, W) feature maps -> (..., D) the head's input: flattened (D = C*H*W) or averaged over space (D = C)."""
    return maps.flatten(-3) if flatten else maps.mean((-2, -1))


def batch_norm_layers(module: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``module``, in named_modules order (the order their stand-ins are listed in)."""
    return [layer for _, layer in module.named_modules() if isinstance(layer, _BatchNorm)]


@dataclass(frozen=True)
class ChainLayer:
    module: nn.Module
    # its parameters' positions in the feature layers' named_parameters (conv: weight; BN: weight, bias, the weight
    # None where the scale is fixed: backbone_options.bn_scale false)
    params: tuple[int | None, ...]


def groupable(module: nn.Module) -> bool:
    """Whether the grouped network computes this layer exactly. Exact types only: a subclass may override forward."""
    kind = type(module)
    if kind is nn.Conv2d:
        return module.bias is None and module.dilation == (1, 1) and module.groups == 1 and module.padding_mode == "zeros"
    if kind is nn.BatchNorm2d:
        return bool(module.affine) and module.momentum is not None  # momentum None (cumulative mean): per-task path
    if kind is nn.MaxPool2d:
        return not module.return_indices
    return kind in (nn.ReLU, nn.ZeroPad2d)


def has_hooks(module: nn.Module) -> bool:
    """Forward or backward hooks change what the module computes, which the grouped network would not do."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def chain_layers(features: nn.Module) -> list[ChainLayer] | None:
    """The layers of ``features`` in the order its forward applies them, when the module tree alone proves that
    order: plain nn.Sequential containers (not subclasses, which may override forward) around groupable layers,
    no hooks, no module or parameter used twice. None otherwise, and the per-task path runs the module's forward."""
    index = {name: i for i, (name, _) in enumerate(features.named_parameters())}
    modules = list(features.named_modules(remove_duplicate=False))
    if len({id(module) for _, module in modules}) < len(modules):
        return None
    layers = []
    for name, module in modules:
        if has_hooks(module):
            return None
        if type(module) is nn.Sequential:
            continue
        names = [f"{name}.{local}" if name else local for local, _ in module.named_parameters(recurse=False)]
        if not groupable(module) or any(n not in index for n in names):  # not in index: shared with another layer
            return None
        positions: tuple[int | None, ...] = tuple(index[n] for n in names)
        if isinstance(module, nn.BatchNorm2d) and len(positions) == 1:  # its scale fixed (bn_scale: false), a buffer
            positions = (None, *positions)
        layers.append(ChainLayer(module, positions))
    return layers


def normalized_by_rows(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, rows: int, eps: float) -> torch.Tensor:
    """Batch normalisation of every image with the statistics of the first ``rows`` (support-set statistics for
    queries), which F.batch_norm cannot do: written in elementary ops."""
    dims = [0, *range(2, x.dim())]
    reference = x[:rows]
    mean = reference.mean(dims, keepdim=True)
    var = (reference - mean).pow(2).mean(dims, keepdim=True)  # biased, as BatchNorm normalises
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.view(mean.shape)
    normalized = (x - mean) * scale
    return normalized if bias is None else normalized + bias.view(mean.shape)


def normalized_by_groups(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float) -> torch.Tensor:
    """Batch normalisation of ``groups`` sets of images, each with its own batch statistics, the sets interleaved
    (image i * groups + g belongs to set g): one native F.batch_norm over the (N / groups, groups * C, ...) view,
    in which set g's channel c is channel g * C + c. groups = 1 is plain batch normalisation."""
    shape = x.shape
    grouped = x.reshape(shape[0] // groups, groups * shape[1], *shape[2:])
    weight, bias = (None if p is None else p.repeat(groups) for p in (weight, bias))
    return F.batch_norm(grouped, None, None, weight, bias, training=True, eps=eps).reshape(shape)


def normalized(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, rows: int | None, groups: int, eps: float) -> torch.Tensor:
    """Batch normalisation with the statistics of the first ``rows`` images, or (None) of each of ``groups`` sets."""
    if rows is None:
        return normalized_by_groups(x, weight, bias, groups, eps)
    return normalized_by_rows(x, weight, bias, rows, eps)


BATCH_NORM = inspect.signature(F.batch_norm)


class BatchStatistics(TorchFunctionMode):
    """While active, every F.batch_norm (the forward of every nn.BatchNorm layer) normalises its whole input with
    the statistics of its first ``rows`` images, or (rows None) of each of its ``groups`` interleaved sets of
    images (``normalized``), and leaves the running statistics alone."""

    def __init__(self, rows: int | None, groups: int) -> None:
        super().__init__()
        self.rows, self.groups = rows, groups

    def __torch_function__(
        self, func: Callable[..., Any], types: object, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func is not F.batch_norm:
            return func(*args, **(kwargs or {}))
        call = BATCH_NORM.bind(*args, **(kwargs or {}))
        call.apply_defaults()
        arguments = call.arguments
        return normalized(arguments["input"], arguments["weight"], arguments["bias"], self.rows, self.groups, arguments["eps"])


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Every BatchNorm layer of ``module`` in training mode for the duration, so it normalises with the statistics
    of the images it sees, never the running ones; other layers keep their mode (dropout stays off in eval)."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in layers]
    try:
        for layer in layers:
            layer.training = True
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode


class TaskNetwork:
    """The adapted network, MetaLearnedBody then the linear head, as a function of a task-major parameter list, for
    T tasks at once: grouped when the backbone is a provable chain, else one functional call per task (module
    docstring). The head reads the last feature maps averaged over space, or with ``flatten`` the maps flattened
    (HEAD_INPUTS).

    The grouped path's feature maps are channels-last on the CPU, where oneDNN's grouped convolutions then run
    without reordering them (a first-order MAML or Reptile meta-step 1.06-1.30x faster), and NCHW on a pass that
    will be differentiated twice (``twice_differentiated``: BatchNorm's double backward on channels-last maps takes
    over twice as long, scripts/benchmark_batchnorm_layouts.py), on a pass of several statistics sets (``stat_groups``:
    their one BatchNorm call needs an NCHW view) and on other devices (docs/speed.md, "The grouped network's
    memory layout").
    """

    # The grouped network's layout by device type where the class docstring allows one, NCHW on the types not listed
    # (scripts/benchmark_grouped_layout.py sets it to compare the two on a device).
    layouts: Mapping[str, torch.memory_format] = {"cpu": torch.channels_last}

    def __init__(self, backbone: Backbone, head: nn.Linear, flatten: bool = False) -> None:
        self.backbone = backbone
        self.head = head
        self.flatten = flatten

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The meta-parameters: the feature layers' in named_parameters order, then the head's weight and bias
        (looked up on every call, so a module's ``.to()`` or ``.double()`` that replaces its parameters cannot
        leave stale references here)."""
        return [*self.backbone.features.parameters(), self.head.weight, self.head.bias]

    def meta_parameters(self, tasks: int, *, detach: bool = False) -> Params:
        """The meta-parameters repeated for ``tasks`` tasks: a view that sums the tasks' gradients back into
        them, or (``detach``) fresh leaf tensors for an inner loop that must not reach the meta-parameters."""
        if detach:
            return [p.detach().unsqueeze(0).repeat(tasks, *([1] * p.dim())).requires_grad_() for p in self.parameters]
        return [p.unsqueeze(0).expand(tasks, *p.shape) for p in self.parameters]

    def logits(
        self, params: Params, images: torch.Tensor, *, stats_rows: int | None = None, stat_groups: int = 1,
        track: bool = False, norms: NormOverride | None = None, twice_differentiated: bool = False,
    ) -> torch.Tensor:
        """(T, N, C, H, W) images -> (T, N, way) logits: ``features`` (the same options) through the head."""
        *body, weight, bias = params
        features = self.features(body, images, stats_rows=stats_rows, stat_groups=stat_groups, track=track, norms=norms,
                                 twice_differentiated=twice_differentiated)
        return head_logits(features, weight, bias)

    def features(
        self, body: Params, images: torch.Tensor, *, stats_rows: int | None = None, stat_groups: int = 1,
        track: bool = False, norms: NormOverride | None = None, twice_differentiated: bool = False,
    ) -> torch.Tensor:
        """(T, N, C, H, W) images -> (T, N, D) the head's input under ``body`` (the parameters without the head's).

        BatchNorm normalises all N images of a task with the statistics of its first ``stats_rows`` images, or
        (None) each of ``stat_groups`` interleaved sets of them with the set's own statistics (image i *
        stat_groups + g is in set g; 1: all N images together). ``track`` folds those statistics into the
        BatchNorm running averages, task by task in order, as T separate training passes would (only on passes
        normalised with all their images): those of the layers' stand-ins in ``norms`` where given, the layers'
        own otherwise. ``twice_differentiated``: the pass's gradient will itself be differentiated (MAML's second
        order), which chooses the grouped network's memory layout (class docstring)."""
        if track and (stats_rows is not None or stat_groups > 1):
            raise ValueError("BatchNorm running statistics are tracked on passes normalised with all their images only")
        tasks, n = images.shape[:2]
        x = self.backbone.normalize(images.flatten(0, 1)).unflatten(0, (tasks, n))
        layers = chain_layers(self.backbone.features)
        if layers is None:
            return self._per_task_features(body, x, stats_rows, stat_groups, track, norms or {})
        free = not twice_differentiated and stat_groups == 1
        layout = self.layouts.get(x.device.type, torch.contiguous_format) if free else torch.contiguous_format
        return self._grouped_features(layers, body, x, stats_rows, stat_groups, track, norms or {}, layout)

    def _grouped_features(
        self, layers: list[ChainLayer], params: Params, x: torch.Tensor, rows: int | None, groups: int, track: bool,
        norms: NormOverride, layout: torch.memory_format,
    ) -> torch.Tensor:
        """(T, N, C, H, W) -> (T, N, D) the head's input, the T tasks as one grouped network (module docstring), its
        maps in ``layout`` (class docstring)."""
        tasks, n = x.shape[:2]
        x = x.transpose(0, 1).flatten(1, 2).contiguous(memory_format=layout)  # (N, T*C, H, W)
        for layer in layers:
            module = norms.get(layer.module, layer.module)
            if isinstance(module, nn.Conv2d):
                x = F.conv2d(x, params[layer.params[0]].flatten(0, 1), stride=module.stride, padding=module.padding, groups=tasks)
            elif isinstance(module, nn.BatchNorm2d):
                # a fixed scale (a buffer) as a tensor, not None: batch_norm's double backward needs one
                weight, bias = (module.weight.repeat(tasks) if i is None else params[i].flatten() for i in layer.params)
                if track:
                    track_grouped_statistics(x, module)
                # Without rows, native F.batch_norm: it keeps fewer tensors for backward (on the 32-task second-order
                # MAML step, less time and ~40% less peak memory than elementary ops, scripts/benchmark_maml_libraries.py)
                x = normalized(x, weight, bias, rows, groups, module.eps)
            elif isinstance(module, nn.ReLU):
                x = F.relu(x)
            elif isinstance(module, nn.ZeroPad2d):
                x = F.pad(x, module.padding)
            else:
                assert isinstance(module, nn.MaxPool2d)
                x = F.max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation, ceil_mode=module.ceil_mode)
        return head_input(x.view(n, tasks, -1, *x.shape[-2:]), self.flatten).transpose(0, 1)

    def _per_task_features(
        self, params: Params, x: torch.Tensor, rows: int | None, groups: int, track: bool, norms: NormOverride
    ) -> torch.Tensor:
        """(T, N, C, H, W) -> (T, N, D) the head's input: the feature layers' own forward once per task, with that
        task's parameters, BatchNorm on batch statistics (of the first ``rows`` images or of each of ``groups``
        sets, with a BatchStatistics mode).
        The stand-ins' buffers replace those of the layers in ``norms`` (a tracked pass updates them in place).
        A pass that does not ``track`` runs on copies of the buffers, so it leaves the running statistics alone."""
        features = self.backbone.features
        names = [name for name, _ in features.named_parameters()]
        stand_in_buffers = {
            f"{prefix}.{name}": buffer
            for prefix, layer in features.named_modules() if layer in norms
            for name, buffer in norms[layer].named_buffers(recurse=False)
        }
        inputs = []
        with batch_statistics(features), (BatchStatistics(rows, groups) if rows is not None or groups > 1 else nullcontext()):
            for task in range(x.shape[0]):
                state = {name: p[task] for name, p in zip(names, params)}
                state.update(stand_in_buffers)
                if not track:
                    state.update((name, b.clone()) for name, b in {**dict(features.named_buffers()), **stand_in_buffers}.items())
                inputs.append(head_input(functional_call(features, state, (x[task],)), self.flatten))
        return torch.stack(inputs)

    def query_logits(
        self, params: Params, support: torch.Tensor, query: torch.Tensor, transductive: bool, norms: NormOverride | None = None
    ) -> torch.Tensor:
        """(T, S, ...) support, (T, Q, ...) query -> (T, Q, way): query BatchNorm statistics from the support set
        (non-transductive) or from the query batch (transductive)."""
        if transductive:
            return self.logits(params, query, norms=norms)
        return self.logits(params, torch.cat([support, query], 1), stats_rows=support.shape[1], norms=norms)[:, support.shape[1] :]

    def per_query_logits(self, params: Params, support: torch.Tensor, query: torch.Tensor, images_per_pass: int) -> torch.Tensor:
        """(T, S, ...) support, (T, Q, ...) query -> (T, Q, way), each query normalised with the BatchNorm statistics
        of the support set plus itself (Reptile's reference code without ``--transductive``): still
        non-transductive, since no query sees another.

        Each (task, query) pair is a set of S+1 images with statistics of its own. A task's pairs run in one batch
        with the task's parameters, interleaved (the S support images, each repeated once per pair, then the
        pairs' queries: ``stat_groups`` = pairs), so that each BatchNorm layer is one native call; passes of at
        most ``images_per_pass`` images (whole tasks side by side, or one task's queries in chunks)."""
        tasks, count, shots = query.shape[0], query.shape[1], support.shape[1]
        pairs = max(1, images_per_pass // (shots + 1))
        tasks_per_pass, queries_per_pass = max(1, pairs // count), min(count, pairs)

        def pass_logits(rows: slice, first: int) -> torch.Tensor:
            queries = query[rows, first : first + queries_per_pass]
            images = torch.cat([support[rows].repeat_interleave(queries.shape[1], 1), queries], 1)
            return self.logits([p[rows] for p in params], images, stat_groups=queries.shape[1])[:, -queries.shape[1] :]

        return torch.cat([torch.cat([pass_logits(slice(start, start + tasks_per_pass), first) for first in range(0, count, queries_per_pass)], 1)
                          for start in range(0, tasks, tasks_per_pass)])


def track_grouped_statistics(x: torch.Tensor, module: nn.BatchNorm2d) -> None:
    """Fold the batch statistics of grouped maps (N, T*C, H, W) into ``module``'s running averages, task by task
    in order, as T separate training passes would."""
    if not module.track_running_stats or module.running_mean is None or module.running_var is None:
        return
    with torch.no_grad():
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
        count = x.numel() // x.shape[1]
        unbiased = var * (count / max(count - 1, 1))
        for task_mean, task_var in zip(mean.view(-1, module.num_features), unbiased.view(-1, module.num_features)):
            module.running_mean.lerp_(task_mean.to(module.running_mean.dtype), module.momentum)
            module.running_var.lerp_(task_var.to(module.running_var.dtype), module.momentum)
            if module.num_batches_tracked is not None:
                module.num_batches_tracked += 1


def head_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(T, N, D) features, (T, way, D) weights, (T, way) biases -> (T, N, way): each task's linear head."""
    return torch.einsum("tnd,tkd->tnk", features, weight) + bias.unsqueeze(1)


def prototype_head(features: torch.Tensor, labels: torch.Tensor, way: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, S, D) support features, (T, S) labels -> the linear head (T, way, D), (T, way) whose logits are
    ProtoNet's: 2 c_k.f - |c_k|^2 = |f|^2 - |f - c_k|^2, the same softmax as the negative squared Euclidean
    distance to each class mean c_k (Proto-MAML, Triantafillou et al. 2020)."""
    prototypes = class_prototypes(features, labels, way)
    return 2 * prototypes, -prototypes.pow(2).sum(-1)


def task_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(T, N, way), (T, N) -> (T,) mean cross-entropy per task."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(1)


class MetaLearnedBody(nn.Module):
    """The meta-learned body: the backbone's last feature maps averaged over space or flattened (``flatten``), the
    head's input (eval mode: BatchNorm with the running statistics tracked during meta-training)."""

    def __init__(self, backbone: Backbone, flatten: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.flatten = flatten

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone
        return head_input(backbone.features(backbone.normalize(images).contiguous(memory_format=backbone.memory_format)), self.flatten)


class PrototypeClassifier(nn.Module):
    """Prototype classification (Snell et al.) on the body's embeddings: the exported "classifier" graph. It embeds
    each image alone, so it offers ``embed`` and ``scores_from_embeddings`` as a Method does: ``fsltool enroll``
    keeps class prototypes of the body with them and scores as this forward does."""

    embeds_independently = True

    def __init__(self, body: MetaLearnedBody) -> None:
        super().__init__()
        self.body = body

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.scores_from_embeddings(self.embed(support), support_labels, self.embed(query), support_labels.max() + 1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor
    ) -> torch.Tensor:
        """(..., S, D), (..., S), (..., Q, D) -> (..., Q, way)."""
        return prototype_scores(support, support_labels, query, way)


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
    the head before every outer step; fsltool starts from zero, or, with MAML's ``head_init: prototypes``, from the
    support set's class means: fsltool.methods.maml.)
    """

    embeds_independently = False
    exported_scores = "prototype scores of the meta-learned body, not the scores of the network adapted to each support set"
    images_per_pass: int | None = None  # images adapted side by side per pass (None: the device's work_sizes().adapt_images)

    @property
    def episodes_per_call(self) -> int:  # type: ignore[override]
        """Evaluation hands over this many episodes; they adapt side by side (TaskNetwork), as many as the device takes."""
        return work_sizes(device_of(self)).adapt_episodes

    def __init__(self, backbone: Backbone, way: int, transductive_bn: bool, head_input: str = "mean", initial_head: str = "zero") -> None:
        super().__init__(backbone)
        require_choice(self.name, "head_input", head_input, HEAD_INPUTS)
        require_choice(self.name, "initial_head", initial_head, tuple(INITIAL_HEADS))
        require_positive_int(self.name, "way", way)
        if way < 2:
            raise option_error(self.name, "way", f"must be at least 2 (the episodes' way), got {way}")
        require_bool(self.name, "transductive_bn", transductive_bn)
        if backbone.frozen_statistics:
            raise FsltoolError(f"method {self.name!r} normalises with batch statistics in its inner loop (transductive_bn and "
                               "per-query options choose which): backbone_options.freeze_statistics does not apply to it")
        self.way = way
        self.transductive = transductive_bn  # read by evaluation to label its results
        self.flatten = head_input == "flatten"
        self.head = nn.Linear(math.prod(backbone.map_shape) if self.flatten else backbone.out_channels, way)
        INITIAL_HEADS[initial_head](self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.network = TaskNetwork(backbone, self.head, self.flatten)

    def transductive_copy(self) -> AdaptiveMethod:
        """A copy with ``transductive_bn``: the MAML and Reptile papers' evaluation, the queries normalised with the
        query batch's statistics after the inner loop."""
        twin = copy.deepcopy(self)
        twin.transductive = True
        return twin

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
        Reptile episodes: 234.5 -> 81.1 s, scripts/benchmark_methods.py, docs/speed.md)."""
        self.episode_way(support_labels)
        per_pass = max(1, self.pass_images(support.device) // (support.shape[1] + query.shape[1]))
        with self.grad_context(False):
            support, support_labels, query = inputs_for_autograd((support, support_labels, query))
            return torch.cat([self.adapted_scores(support[i : i + per_pass], support_labels[i : i + per_pass], query[i : i + per_pass])
                              for i in range(0, support.shape[0], per_pass)])

    def pass_images(self, device: torch.device) -> int:
        """Images per evaluation pass, which bounds the activations: ``images_per_pass``, or the device's."""
        return self.images_per_pass or work_sizes(device).adapt_images

    @abstractmethod
    def adapted_scores(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """(T, S, ...), (T, S), (T, Q, ...) -> (T, Q, way), detached: each task adapted on its own support set
        (autograd is on, outside inference mode, for the inner loop), then its queries scored."""

    def episode_way(self, support_labels: torch.Tensor) -> int:
        way = int(support_labels.max()) + 1
        self.check_way(way)
        return way

    @staticmethod
    def same_shape(episodes: Sequence[Episode]) -> bool:
        """Whether the episodes stack into one tensor per field (one grouped pass)."""
        return len({(e.support.shape, e.query.shape) for e in episodes}) == 1

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

    def meta_step(self, episodes: Sequence[Episode], share: TaskShare | None = None) -> list[StepOutput]:
        """A meta-batch's tasks together (TaskNetwork calls for all of them) when the episodes share a shape (and
        ``group_tasks``), else episode by episode; the training loop averages the losses and backpropagates."""
        for episode in episodes:
            self.check_way(episode.shape.way)
        if self.group_tasks and self.same_shape(episodes):
            return self._steps(episodes, share)
        return [self._steps([episode], share)[0] for episode in episodes]

    @abstractmethod
    def _steps(self, episodes: Sequence[Episode], share: TaskShare | None) -> list[StepOutput]:
        """The method's losses for episodes of one shape (stacked where the method needs them: stack_episodes);
        ``share`` as in Method.meta_step."""

    def exported_classifier(self) -> nn.Module:
        """The PyTorch module the exported "classifier" graph computes: prototype classification on the body's
        embeddings, which is not ``self(...)`` (that adapts the whole network to the support set first)."""
        return PrototypeClassifier(MetaLearnedBody(self.backbone, self.flatten))

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        """The meta-learned body as an embedding for prototype classification, and that classifier."""
        classifier = self.exported_classifier()
        assert isinstance(classifier, PrototypeClassifier)
        return {
            "embedding": embedding_graph(classifier.body, example),
            "classifier": classifier_graph(classifier, example),
        }


def require_positive_float(method: str, key: str, value: object) -> float:
    require_number(method, key, value, lambda v: v > 0, "a positive number")
    return float(value)
