"""The network MAML and Reptile adapt is the backbone's own forward (then spatial pooling and the head) with each
task's parameters, whatever the backbone: residual blocks run per task through torch.func.functional_call, plain
chains as one grouped network, and the two paths give the same results."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError
from fsltool.methods.adaptation import AdaptiveMethod, MetaLearnedBody, TaskNetwork, chain_layers
from fsltool.models import build_backbone
from fsltool.models.backbones import Backbone, Normalize, conv_block, resnet12
from tests.conftest import assert_queries_independent
from tests.methods.test_maml import finite_difference_error, meta_gradient, tiny_episodes, tiny_maml
from tests.methods.test_reptile import tiny_reptile


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut, then ReLU: the identity, or a strided 1x1 conv + BN where the shape
    changes. ``skip=False`` drops the shortcut: the plain chain of the same layers."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, skip: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.project = None
        if stride != 1 or in_channels != out_channels:
            self.project = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.skip:
            out = out + (x if self.project is None else self.project(x))
        return self.relu(out)


class Opaque(nn.Sequential):
    """The same layers as a plain Sequential; chain_layers cannot prove a subclass a chain (it may override forward)."""


def residual_backbone(shortcut: str = "identity", width: int = 4) -> Backbone:
    """28x28 -> a strided conv block -> a residual block with an ``identity`` shortcut, or one with a 1x1
    ``projection`` shortcut (twice the width, stride 2)."""
    torch.manual_seed(0)
    block = Residual(width, width) if shortcut == "identity" else Residual(width, 2 * width, stride=2)
    return Backbone(Normalize([0.1], [0.3]), nn.Sequential(conv_block(1, width, stride=2, pool=False), block))


def without_skips(backbone: Backbone) -> Backbone:
    plain = copy.deepcopy(backbone)
    for module in plain.modules():
        if isinstance(module, Residual):
            module.skip = False
    return plain


def opaque_conv4() -> Backbone:
    """conv4-strided (4 filters) whose feature layers the per-task path runs: the same network as tiny_maml's."""
    backbone = conv4_strided()
    backbone.features = Opaque(*backbone.features)
    return backbone


def conv4_strided() -> Backbone:
    torch.manual_seed(0)
    return build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=4)


def conv4_strided_tf_eps() -> Backbone:
    """conv4-strided with TensorFlow's BatchNorm epsilon (``bn_eps: 0.001``), which the grouped path must use."""
    torch.manual_seed(0)
    return build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=4, bn_eps=1e-3)


def conv4_strided_tf_same() -> Backbone:
    """conv4-strided with TensorFlow's 'SAME' padding (zero-pad layers before three of its convolutions)."""
    torch.manual_seed(0)
    return build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=4, tf_same_padding=True)


def conv4_strided_fixed_scale(opaque: bool = False) -> Backbone:
    """conv4-strided with BatchNorm's scale fixed at 1 (``bn_scale: false``, MAML's code), whose grouped path passes
    the fixed scale as a tensor; ``opaque``: its feature layers run by the per-task path."""
    torch.manual_seed(0)
    backbone = build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=4, bn_scale=False)
    if opaque:
        backbone.features = Opaque(*backbone.features)
    return backbone


BACKBONES = {
    "conv4-strided": conv4_strided,
    "conv4-strided-bn-eps": conv4_strided_tf_eps,
    "conv4-strided-tf-same": conv4_strided_tf_same,
    "conv4-strided-fixed-bn-scale": conv4_strided_fixed_scale,
    "identity-residual": lambda: residual_backbone("identity"),
    "projection-residual": lambda: residual_backbone("projection"),
}


def test_the_grouped_path_is_taken_only_for_provable_chains() -> None:
    for name, count in (("conv4", 16), ("conv4-strided", 12), ("conv4-relation", 14)):  # 4 x (conv, BN, ReLU[, pool])
        layers = chain_layers(build_backbone(name, 1, [0.1], [0.3], hidden=4).features)
        assert layers is not None and len(layers) == count, name
    assert len(chain_layers(conv4_strided_tf_same().features) or []) == 15  # and a zero pad before the 28, 14 and 4 px convs
    assert chain_layers(residual_backbone().features) is None
    assert chain_layers(opaque_conv4().features) is None
    relu = nn.ReLU()
    assert chain_layers(nn.Sequential(nn.Conv2d(1, 2, 3), relu, nn.Conv2d(2, 2, 3), relu)) is None  # a module applied twice
    first, second = nn.Conv2d(2, 2, 3, bias=False), nn.Conv2d(2, 2, 3, bias=False)
    second.weight = first.weight
    assert chain_layers(nn.Sequential(first, second)) is None  # a parameter used twice
    assert chain_layers(nn.Sequential(nn.Conv2d(1, 2, 3))) is None  # a bias the grouped convolution leaves out
    assert chain_layers(nn.Sequential(nn.BatchNorm2d(2, momentum=None))) is None  # cumulative running averages
    hooked = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU())
    hooked[1].register_forward_hook(lambda module, inputs, output: -output)
    assert chain_layers(hooked) is None


def own_logits(method: AdaptiveMethod, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """The head on ``backbone``'s own forward (MetaLearnedBody, the exported body), BatchNorm on batch statistics."""
    return method.head(MetaLearnedBody(backbone, method.flatten).train()(images))


@pytest.mark.parametrize("head_input", ["mean", "flatten"])
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_the_unadapted_network_is_the_backbones_own_forward(kind: str, head_input: str) -> None:
    """conv4-strided (grouped path) and two residual modules (per-task path) are computed as their own forward
    (assert_unadapted_is_own_forward). Without their skip connections the residual modules compute another
    function, which the adapted network does not: the chain-walking TaskNetwork this replaced ran the layers of the
    identity-shortcut block one after the other (a different network) and failed on the projection shortcut."""
    method = tiny_maml(BACKBONES[kind](), head_input=head_input)
    images = torch.rand(2, 6, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = assert_unadapted_is_own_forward(method, images)
    if kind.endswith("residual"):
        plain = without_skips(method.backbone)
        with torch.no_grad():
            assert not torch.allclose(got, torch.stack([own_logits(method, plain, task) for task in images]), atol=1e-3)


def test_the_unadapted_resnet12_is_its_own_forward() -> None:
    torch.manual_seed(0)
    method = tiny_maml(resnet12(3, [0.5, 0.4, 0.3], [0.25, 0.25, 0.25], widths=(8, 16, 24, 32), image_size=32))
    assert chain_layers(method.backbone.features) is None
    assert_unadapted_is_own_forward(method, torch.rand(2, 6, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))


def assert_unadapted_is_own_forward(method: AdaptiveMethod, images: torch.Tensor) -> torch.Tensor:
    """Two tasks with the meta-parameters: each task's logits are the module's own train-mode output on its images,
    in train or eval mode (BatchNorm never classifies with running statistics, unlike the module's own eval-mode
    forward); a tracked pass updates the running statistics as the module's own two training passes do, an
    untracked one leaves them alone. Returns the logits."""
    reference = copy.deepcopy(method.backbone)
    with torch.no_grad():
        expected = torch.stack([own_logits(method, reference, task) for task in images])
        for mode in ("train", "eval"):
            method.train(mode == "train")
            buffers = [b.clone() for b in method.buffers()]
            got = method.network.logits(method.network.meta_parameters(2), images)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
            assert all(torch.equal(a, b) for a, b in zip(buffers, method.buffers()))
        assert not torch.allclose(got[0], method.head(MetaLearnedBody(method.backbone, method.flatten).eval()(images[0])))
        method.network.logits(method.network.meta_parameters(2), images, track=True)
        for tracked, own in zip(method.backbone.buffers(), reference.buffers(), strict=True):
            torch.testing.assert_close(tracked, own, rtol=1e-12, atol=1e-12)
    return got


@pytest.mark.parametrize("transductive_bn", [False, True], ids=["support-bn", "transductive-bn"])
@pytest.mark.parametrize("grouped", [True, False], ids=["meta-batch", "task-by-task"])
def test_residual_second_order_meta_gradient_matches_finite_differences(grouped: bool, transductive_bn: bool) -> None:
    """float64 residual network with a projection shortcut, BatchNorm in every branch, 2 inner steps, 2 tasks:
    the autograd meta-gradient is the central finite difference of the outer loss at the largest-gradient entry
    of every parameter tensor (relative 1e-4 or better)."""
    method = tiny_maml(residual_backbone("projection"), transductive_bn=transductive_bn)
    method.group_tasks = grouped
    episodes = tiny_episodes(2)
    grads = meta_gradient(method, episodes)
    entries = [(i, tuple(int(k) for k in torch.unravel_index(g.abs().argmax(), g.shape))) for i, g in enumerate(grads)]
    assert len(entries) == 14  # conv block 3, residual branch 6, projection shortcut 3, head 2
    worst = finite_difference_error(method, episodes, grads, entries)
    assert worst < 1e-4, worst


def meta_step_results(method: AdaptiveMethod, episodes: list[Episode]) -> list[list[torch.Tensor]]:
    """Losses, scores, meta-gradients and buffers after one meta-step (minibatch orders from a fixed seed)."""
    torch.manual_seed(7)
    outputs = method.meta_step(episodes)
    method.zero_grad()
    torch.stack([o.loss for o in outputs]).mean().backward()
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert len(grads) == len(list(method.parameters()))
    return [[o.loss.detach() for o in outputs], [o.scores for o in outputs], grads, [b.clone() for b in method.buffers()]]


def assert_same_results(first: list[list[torch.Tensor]], second: list[list[torch.Tensor]]) -> None:
    for a_values, b_values in zip(first, second, strict=True):
        for a, b in zip(a_values, b_values, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def evaluation_scores(method: AdaptiveMethod) -> torch.Tensor:
    """Eval-mode scores of 3 episodes adapted side by side."""
    episodes = tiny_episodes(3)
    support, labels, query = (torch.stack(parts) for parts in zip(*[(e.support, e.support_labels, e.query) for e in episodes]))
    method.eval()
    with torch.no_grad():
        return method.score_episodes(support, labels, query)


# The grouped network's map layouts on the CPU: channels-last (the default) and NCHW (what other devices run).
LAYOUTS = pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels-last", "nchw"])


@pytest.fixture
def grouped_layout(layout: torch.memory_format, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskNetwork, "layouts", {"cpu": layout})


@LAYOUTS
@pytest.mark.parametrize("head_input", ["mean", "flatten"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("transductive_bn", [False, True], ids=["support-bn", "transductive-bn"])
@pytest.mark.usefixtures("grouped_layout")
def test_maml_per_task_path_equals_the_grouped_path(first_order: bool, transductive_bn: bool, head_input: str) -> None:
    """The same conv4-strided on either path: a 3-task meta-step (losses, scores, meta-gradients, running
    statistics) and the evaluation of 3 episodes side by side agree to float rounding, in either map layout."""
    options: dict[str, object] = {"first_order": first_order, "transductive_bn": transductive_bn, "test_inner_steps": 2, "head_input": head_input}
    grouped, per_task = tiny_maml(**options), tiny_maml(opaque_conv4(), **options)
    assert chain_layers(per_task.backbone.features) is None
    assert_same_results(meta_step_results(grouped, tiny_episodes(3)), meta_step_results(per_task, tiny_episodes(3)))
    torch.testing.assert_close(evaluation_scores(grouped), evaluation_scores(per_task), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "options", [{}, {"per_query_bn": True}, {"transductive_bn": True}, {"per_query_bn": True, "head_input": "flatten"}],
    ids=["support-bn", "per-query-bn", "transductive-bn", "per-query-bn-flattened-maps"],
)
@LAYOUTS
@pytest.mark.usefixtures("grouped_layout")
def test_reptile_per_task_path_equals_the_grouped_path(options: dict[str, object]) -> None:
    """As for MAML, in each of Reptile's ways of normalising queries and either map layout."""
    settings = {"test_inner_steps": 3, "test_inner_batch": 3, **options}
    grouped, per_task = tiny_reptile(**settings), tiny_reptile(opaque_conv4(), **settings)
    assert_same_results(meta_step_results(grouped, tiny_episodes(3)), meta_step_results(per_task, tiny_episodes(3)))
    torch.testing.assert_close(evaluation_scores(grouped), evaluation_scores(per_task), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("adapt_norms", [True, False])
def test_a_fixed_batch_norm_scale_trains_alike_on_both_paths(adapt_norms: bool) -> None:
    """bn_scale: false: MAML (BatchNorm shifts adapted or not) and Reptile, a 3-task meta-step and an evaluation,
    the grouped path (no scale parameter in its chain) as the per-task path (the module's own forward)."""
    assert chain_layers(conv4_strided_fixed_scale().features) is not None
    grouped, per_task = (tiny_maml(conv4_strided_fixed_scale(opaque), adapt_norms=adapt_norms, test_inner_steps=2) for opaque in (False, True))
    assert_same_results(meta_step_results(grouped, tiny_episodes(3)), meta_step_results(per_task, tiny_episodes(3)))
    torch.testing.assert_close(evaluation_scores(grouped), evaluation_scores(per_task), rtol=1e-10, atol=1e-12)
    settings = {"test_inner_steps": 3, "test_inner_batch": 3, "per_query_bn": adapt_norms}  # Reptile: both query modes
    grouped, per_task = (tiny_reptile(conv4_strided_fixed_scale(opaque), **settings) for opaque in (False, True))
    assert_same_results(meta_step_results(grouped, tiny_episodes(3)), meta_step_results(per_task, tiny_episodes(3)))
    torch.testing.assert_close(evaluation_scores(grouped), evaluation_scores(per_task), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head_input", ["mean", "flatten"])
@pytest.mark.parametrize("images_per_pass", [1, 20, 10_000], ids=["pair-by-pair", "query-chunks", "tasks-side-by-side"])
@pytest.mark.parametrize("kind", ["grouped", "per-task"])
def test_per_query_statistics_equal_one_pass_per_query(images_per_pass: int, kind: str, head_input: str) -> None:
    """per_query_bn's passes (a task's queries interleaved with repeated support images, one set of BatchNorm
    statistics per query; one query, some queries or several whole tasks per pass) give each query the scores of
    a pass over its task's support set plus itself alone."""
    method = tiny_reptile(None if kind == "grouped" else opaque_conv4(), head_input=head_input)
    network = method.network
    generator = torch.Generator().manual_seed(5)
    support, query = torch.rand(3, 4, 1, 28, 28, generator=generator).double(), torch.rand(3, 6, 1, 28, 28, generator=generator).double()
    params = [p.detach() + 0.1 * torch.randn(3, *p.shape, generator=generator, dtype=p.dtype) for p in network.parameters]
    with torch.no_grad():
        got = network.per_query_logits(params, support, query, images_per_pass)
        alone = torch.stack([torch.stack([network.logits([p[t : t + 1] for p in params], torch.cat([support[t], query[t, j : j + 1]])[None])[0, -1]
                                          for j in range(6)]) for t in range(3)])
    assert got.shape == (3, 6, 3)
    torch.testing.assert_close(got, alone, rtol=1e-10, atol=1e-12)


def test_per_task_path_puts_only_batchnorm_in_training_mode() -> None:
    """Dropout after the body stays off in eval mode (scores are repeatable and equal the module's own eval-mode
    forward with BatchNorm on batch statistics), and every layer gets its own mode back."""
    torch.manual_seed(0)
    backbone = Backbone(Normalize([0.1], [0.3]), nn.Sequential(conv_block(1, 4, stride=2, pool=False), nn.Dropout(0.5)))
    network = TaskNetwork(backbone, nn.Linear(4, 3))
    backbone.eval()
    images = torch.rand(1, 6, 1, 28, 28)
    with torch.no_grad():
        got = network.logits(network.meta_parameters(1), images)
        torch.testing.assert_close(got, network.logits(network.meta_parameters(1), images), rtol=0, atol=0)
        reference = copy.deepcopy(backbone)
        reference.features[0][1].train()
        torch.testing.assert_close(got[0], network.head(MetaLearnedBody(reference)(images[0])), rtol=1e-6, atol=1e-6)
    assert not any(module.training for module in backbone.modules())


@pytest.mark.parametrize("method", ["maml", "reptile"])
def test_residual_queries_do_not_influence_each_other(method: str) -> None:
    """Support-set statistics for queries on the per-task path: a query's scores depend on itself alone."""
    adaptive = tiny_maml(residual_backbone(), way=5) if method == "maml" else tiny_reptile(residual_backbone(), way=5)
    assert_queries_independent(adaptive.float().eval())


@pytest.mark.parametrize("method", ["maml", "reptile"])
def test_a_flattened_head_input_is_the_backbones_flattened_embedding(method: str) -> None:
    """``head_input: flatten`` (Reptile's reference network): the head reads the last maps flattened, 4 x 2 x 2 = 16
    inputs on conv4-strided with 4 filters, exactly the backbone's own flattened embedding, where ``mean`` reads
    their 4 channel averages; the exported embedding is that input."""
    build = tiny_maml if method == "maml" else tiny_reptile
    flat, averaged = build(head_input="flatten"), build()
    assert (flat.head.in_features, averaged.head.in_features) == (16, 4)
    flat.eval()
    images = torch.rand(5, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        embedded = flat.exported_classifier().embed(images)
        assert embedded.shape == (5, 16)
        torch.testing.assert_close(embedded, flat.backbone(images), rtol=1e-12, atol=1e-12)  # the backbone's flatten: true, pool: false
        torch.testing.assert_close(embedded.view(5, 4, 4).mean(-1), averaged.eval().exported_classifier().embed(images), rtol=1e-12, atol=1e-12)


def test_an_unknown_head_input_is_refused() -> None:
    with pytest.raises(FsltoolError, match="head_input.*mean, flatten.*'max'"):
        tiny_reptile(head_input="max")
