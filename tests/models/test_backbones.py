"""Backbones: output shapes at the usual image sizes, options, pretrained weights files, freezing, and every
method training on top of a residual backbone."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import save_file

from conftest import load_script
from fsltool.errors import FsltoolError
from fsltool.methods import build_method
from fsltool.models import build_backbone
from fsltool.models.weights import load_backbone_weights

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
SMALL_RESNET12 = {"widths": [8, 12, 16, 20]}

# (backbone, options, image size) -> embedding shape
SHAPES = [
    ("conv4", {}, 28, (64,)), ("conv4", {}, 32, (256,)), ("conv4", {}, 84, (1600,)),
    ("conv4", {"pool": True}, 84, (64,)),
    ("conv4-relation", {}, 84, (64, 21, 21)),
    ("resnet12", {}, 28, (640,)), ("resnet12", {}, 32, (640,)), ("resnet12", {}, 84, (640,)),
    ("resnet12", {"flatten": False}, 84, (640, 5, 5)), ("resnet12", {"flatten": False}, 32, (640, 2, 2)),
    ("resnet18", {}, 32, (512,)), ("resnet18", {}, 84, (512,)),
    ("wrn28-10", {"depth": 10, "widen": 2}, 32, (128,)), ("wrn28-10", {"depth": 10, "widen": 2}, 84, (128,)),
]


@pytest.mark.parametrize(("name", "options", "size", "expected"), SHAPES)
def test_embedding_shape_at_each_image_size(name: str, options: dict, size: int, expected: tuple[int, ...]) -> None:
    backbone = build_backbone(name, 3, MEAN, STD, image_size=size, **options)
    out = backbone(torch.rand(2, 3, size, size))
    assert tuple(out.shape) == (2, *expected) == (2, *backbone.embedding_shape)
    assert backbone.embedding_size == out[0].numel()


def test_default_widths_are_the_papers() -> None:
    """ResNet-12 at 64-160-320-640 has about 12.4 M parameters; WRN-28-10 about 36.5 M (both as published)."""
    resnet = build_backbone("resnet12", 3, MEAN, STD, image_size=84)
    assert 12.3e6 < sum(p.numel() for p in resnet.parameters()) < 12.5e6
    wrn = build_backbone("wrn28-10", 3, MEAN, STD, image_size=32)
    assert 36.4e6 < sum(p.numel() for p in wrn.parameters()) < 36.6e6


def test_resnet12_residual_shortcut_is_used() -> None:
    """Zeroing the shortcut's BatchNorm scale changes the output: the skip connection is part of the network."""
    backbone = build_backbone("resnet12", 3, MEAN, STD, image_size=32, **SMALL_RESNET12).eval()
    images = torch.rand(3, 3, 32, 32)
    before = backbone(images)
    with torch.no_grad():
        backbone.features.stage4.shortcut[1].weight.zero_()
        backbone.features.stage4.shortcut[1].bias.zero_()
    assert not torch.allclose(before, backbone(images))


def test_dropblock_drops_whole_blocks_at_the_rate_asked() -> None:
    from fsltool.models.backbones import DropBlock

    torch.manual_seed(0)
    maps = torch.ones(50, 4, 10, 10)
    out = DropBlock(0.2, 3).train()(maps)
    assert out.shape == maps.shape
    dropped = out == 0
    assert 0.15 < dropped.float().mean() < 0.25  # about drop_rate of every map
    # The mask is a union of whole 3x3 squares inside the map: opening it (erode, then dilate) changes nothing.
    corners = -F.max_pool2d(-dropped.float(), 3, stride=1)  # 1 where a whole square starting there is dropped
    assert torch.equal(F.max_pool2d(F.pad(corners, (2, 2, 2, 2)), 3, stride=1).bool(), dropped)
    kept = out[~dropped]
    assert torch.allclose(kept, kept[0].expand_as(kept))  # what is kept is rescaled by one factor
    torch.testing.assert_close(DropBlock(0.2, 3).eval()(maps), maps)


def test_dropblock_draws_each_channel_its_own_blocks() -> None:
    """Ghiasi et al.'s Algorithm 1, MetaOptNet's and RFS's code: a mask per channel, not one per image."""
    from fsltool.models.backbones import DropBlock

    torch.manual_seed(0)
    dropped = DropBlock(0.2, 3).train()(torch.ones(50, 4, 10, 10)) == 0
    differing = (dropped[:, 0] != dropped[:, 1]).flatten(1).any(1)
    assert differing.float().mean() > 0.9


def test_dropblock_ramp_rises_linearly_over_the_updates() -> None:
    from fsltool.models.backbones import DropBlock, ramp_dropblocks, ramped_dropblocks

    block = DropBlock(0.2, 3, ramp=10).train()
    maps = torch.ones(4, 2, 10, 10)
    assert torch.equal(block(maps), maps)  # nothing dropped before the first update
    rates = []
    assert ramped_dropblocks(nn.Sequential(block, DropBlock(0.2, 3))) == [block]  # the unramped one keeps its rate
    for done in (0, 5, 10, 30):
        ramp_dropblocks([block], done)
        rates.append(block.rate)
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.2])
    unramped = DropBlock(0.2, 3)
    unramped.ramp_to(0)
    assert unramped.rate == 0.2


def test_dropblock_only_in_training() -> None:
    backbone = build_backbone("resnet12", 3, MEAN, STD, image_size=32, drop_rate=0.5, **SMALL_RESNET12)
    images = torch.rand(4, 3, 32, 32)
    backbone.eval()
    torch.testing.assert_close(backbone(images), backbone(images))
    backbone.train()
    torch.manual_seed(0)
    first = backbone(images)
    torch.manual_seed(1)
    assert not torch.allclose(first, backbone(images))


def tf_same(x: torch.Tensor, kernel: int, stride: int, fill: float = 0.0) -> torch.Tensor:
    """``x`` padded as TensorFlow's 'SAME' pads it for a ``kernel``/``stride`` window: the total its output size
    ceil(n / stride) needs, the odd one after."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=fill)


def test_tf_same_padding_is_tensorflows_same_for_the_strided_convolutions() -> None:
    """MAML's and Reptile's Omniglot network as their TensorFlow code pads it: 28 -> 14 -> 7 -> 4 -> 2."""
    torch.manual_seed(0)
    backbone = build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=4, tf_same_padding=True).eval()
    images = torch.rand(3, 1, 28, 28)
    x = backbone.normalize(images)
    for block in backbone.features:
        conv, norm = (m for m in block if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)))
        x = F.relu(norm(F.conv2d(tf_same(x, 3, 2), conv.weight, stride=2)))
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), x.flatten(1))
        default = build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=4).eval()
        default.load_state_dict(backbone.state_dict())
        assert default(images).shape == backbone(images).shape and not torch.allclose(default(images), backbone(images))


def test_pool_ceil_is_tensorflows_same_pooling() -> None:
    """Reptile's miniImageNet network pools with 'SAME': 84 -> 42 -> 21 -> 11 -> 6, the last maps 6x6."""
    torch.manual_seed(0)
    backbone = build_backbone("conv4", 3, MEAN, STD, image_size=84, hidden=4, pool_ceil=True).eval()
    assert backbone.map_shape == (4, 6, 6) and backbone.embedding_size == 144
    images = torch.rand(2, 3, 84, 84)
    x = backbone.normalize(images)
    for block in backbone.features:
        conv, norm = (m for m in block if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)))
        x = F.relu(F.max_pool2d(tf_same(norm(conv(x)), 2, 2, fill=-math.inf), 2))
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), x.flatten(1))
    with pytest.raises(FsltoolError, match="backbone_options.pool_ceil must be true or false, got 'yes'"):
        build_backbone("conv4", 3, MEAN, STD, pool_ceil="yes")
    with pytest.raises(FsltoolError, match="backbone_options.tf_same_padding must be true or false"):
        build_backbone("conv4-strided", 1, [0.1], [0.3], tf_same_padding=1)


@pytest.mark.parametrize("name", ["conv4", "conv4-strided", "conv4-relation"])
def test_bn_eps_sets_every_batchnorm_epsilon_of_the_conv4_family(name: str) -> None:
    """``bn_eps`` (TensorFlow's 1e-3 in MAML's and Reptile's reference code): every BatchNorm of the backbone
    normalises with it, so a map of tiny variance comes out scaled down instead of blown up to unit variance."""
    default, reference = (build_backbone(name, 1, [0.1], [0.3], hidden=4, **options) for options in ({}, {"bn_eps": 1e-3}))
    assert {m.eps for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-5}
    assert {m.eps for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    norm = next(m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)).train()
    maps = 1e-3 * torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(0))  # variance 1e-6
    assert float(norm(maps).detach().std()) < 0.05
    with pytest.raises(FsltoolError, match="backbone_options.bn_eps must be a positive number, got 0"):
        build_backbone(name, 1, [0.1], [0.3], hidden=4, bn_eps=0)


def test_early_dropout_drops_elements_after_the_first_two_stages_in_training_only() -> None:
    """``early_dropout`` (MetaOptNet's and RFS's plain dropout after stages 1-2): those stages' outputs lose about
    that share of their elements in training, the rest rescaled; stages 3-4 and evaluation are untouched."""
    backbone = build_backbone("resnet12", 3, MEAN, STD, image_size=32, early_dropout=0.3, **SMALL_RESNET12)
    outputs = {}
    for name in ("stage1", "stage2", "stage3"):
        getattr(backbone.features, name).register_forward_hook(lambda module, inputs, output, name=name: outputs.__setitem__(name, output))
    images = torch.rand(16, 3, 32, 32)
    torch.manual_seed(0)
    backbone.train()(images)
    for name in ("stage1", "stage2"):
        assert 0.25 < float((outputs[name] == 0).float().mean()) < 0.35, name  # leaky ReLU outputs are never 0 otherwise
    assert float((outputs["stage3"] == 0).float().mean()) < 0.01
    backbone.eval()
    torch.testing.assert_close(backbone(images), backbone(images))
    assert float((outputs["stage1"] == 0).float().mean()) < 0.01


@pytest.mark.parametrize(("options", "message"), [
    ({"widths": [8, 8, 8]}, "widths must be 4"), ({"drop_rate": 1.5}, "drop_rate"), ({"early_dropout": -0.1}, "early_dropout must be a number"), ({"pool": "yes"}, "pool must be true"),
    ({"drop_ramp": 100}, "needs backbone_options.drop_rate"), ({"drop_rate": 0.1, "drop_ramp": -1}, "drop_ramp must be a whole number"),
    ({"colour": 1}, "has no option 'colour'"), ({"freeze": ["stage9"]}, "no stage 'stage9'"),
    ({"freeze_statistics": "yes"}, "freeze_statistics must be true or false, got 'yes'"),
])
def test_bad_options_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        build_backbone("resnet12", 3, MEAN, STD, image_size=32, **options)


def test_conv4_without_its_final_relu_has_signed_features_and_the_same_parameters() -> None:
    """final_relu: false leaves out only the last block's ReLU: the same parameter names and values give the
    default network's features before that ReLU (so some are negative), for Matching Networks' cosines."""
    torch.manual_seed(0)
    default = build_backbone("conv4", 1, [0.5], [0.2], hidden=8)
    signed = build_backbone("conv4", 1, [0.5], [0.2], hidden=8, final_relu=False)
    signed.load_state_dict(default.state_dict())
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        features = signed.eval()(images)
        default.eval()
        before_relu = default.features[3][:2](default.features[:3](default.normalize(images)))  # last conv + BN
        expected = torch.nn.functional.max_pool2d(before_relu, 2).flatten(1)
    assert (features < 0).any() and (default(images) >= 0).all()
    torch.testing.assert_close(features, expected)
    with pytest.raises(FsltoolError, match=r"backbone_options.final_relu must be true or false, got 'no'"):
        build_backbone("conv4", 1, [0.5], [0.2], final_relu="no")
    with pytest.raises(FsltoolError, match=r"backbone_options.hidden must be a positive integer, got 0"):
        build_backbone("conv4", 1, [0.5], [0.2], hidden=0)


@pytest.mark.parametrize("train", [True, False])
def test_conv4_pooling_before_its_relu_is_the_papers_block(train: bool) -> None:
    """The blocks pool before the ReLU (a quarter of the ReLU work): outputs and gradients equal the papers' order
    (conv, BN, ReLU, pool) bit for bit, ties included (blank image regions make whole windows equal); MAML's
    second-order gradients sum in another order, so they agree to float rounding."""
    torch.manual_seed(0)
    backbone = build_backbone("conv4", 1, [0.5], [0.2], hidden=8).train(train)
    assert [type(m).__name__ for m in backbone.features[0]] == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU"]
    reference = load_script("benchmark_block_order").use_papers_order(copy.deepcopy(backbone))
    assert [type(m).__name__ for m in reference.features[0]] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    images = torch.rand(6, 1, 28, 28)
    images[:, :, :10] = 1.0  # blank rows: equal values in whole pooling windows

    def gradients(model: torch.nn.Module) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        features = model(images)
        first = torch.autograd.grad(features.square().sum(), list(model.parameters()), create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), list(model.parameters()))
        return features, first, second

    features, first, second = gradients(backbone)
    expected_features, expected_first, expected_second = gradients(reference)
    assert torch.equal(features, expected_features)
    assert all(torch.equal(a, b) for a, b in zip(first, expected_first, strict=True))
    for a, b in zip(second, expected_second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_too_small_images_are_refused() -> None:
    with pytest.raises(FsltoolError, match="too small"):
        build_backbone("conv4", 1, [0.5], [0.2], image_size=8)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_load_exactly(tmp_path: Path, suffix: str) -> None:
    source = build_backbone("resnet12", 3, MEAN, STD, image_size=32, **SMALL_RESNET12)
    path = tmp_path / f"weights{suffix}"
    state = {key: value.contiguous() for key, value in source.features.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    target = build_backbone("resnet12", 3, MEAN, STD, image_size=32, **SMALL_RESNET12)
    load_backbone_weights(target, "resnet12", path)
    for key, value in source.features.state_dict().items():
        assert torch.equal(target.features.state_dict()[key], value), key


def test_weights_of_a_whole_method_load(tmp_path: Path) -> None:
    """A state_dict saved from an fsltool method ('backbone.features.' keys) loads into a bare backbone."""
    method = build_method("protonet", build_backbone("conv4", 1, [0.5], [0.2], hidden=8), {})
    torch.save(method.state_dict(), tmp_path / "method.pt")
    target = build_backbone("conv4", 1, [0.5], [0.2], hidden=8)
    load_backbone_weights(target, "conv4", tmp_path / "method.pt")
    assert torch.equal(target.features[0][0].weight, method.backbone.features[0][0].weight)


def test_torchvision_layout_loads_into_resnet18(tmp_path: Path) -> None:
    """torchvision's resnet18 state_dict names (conv1, layer1.0.downsample..., fc) load; fc is left out."""
    source = build_backbone("resnet18", 3, MEAN, STD, image_size=32)
    state = dict(source.features.state_dict())
    assert "layer2.0.downsample.0.weight" in state and "bn1.running_mean" in state
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(state, tmp_path / "torchvision.pth")
    target = build_backbone("resnet18", 3, MEAN, STD, image_size=32)
    load_backbone_weights(target, "resnet18", tmp_path / "torchvision.pth")
    assert torch.equal(target.features.conv1.weight, source.features.conv1.weight)


def test_bad_weights_files_are_one_line_errors(tmp_path: Path) -> None:
    target = build_backbone("resnet12", 3, MEAN, STD, image_size=32, **SMALL_RESNET12)
    state = dict(build_backbone("resnet12", 3, MEAN, STD, image_size=32, **SMALL_RESNET12).features.state_dict())
    missing = {k: v for k, v in state.items() if not k.startswith("stage4")}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(FsltoolError, match=r"missing.pt: weights do not fit backbone 'resnet12': missing stage4\.conv1\.weight"):
        load_backbone_weights(target, "resnet12", tmp_path / "missing.pt")
    wide = dict(build_backbone("resnet12", 3, MEAN, STD, image_size=32, widths=[8, 12, 16, 24]).features.state_dict())
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(FsltoolError, match=r"shape mismatch stage4\.conv1\.weight \(24, 16, 3, 3\) vs \(20, 16, 3, 3\)"):
        load_backbone_weights(target, "resnet12", tmp_path / "wide.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FsltoolError, match="junk.pt: not a readable weights file"):
        load_backbone_weights(target, "resnet12", tmp_path / "junk.pt")
    with pytest.raises(FsltoolError, match="nothere.pt: backbone weights file not found"):
        load_backbone_weights(target, "resnet12", tmp_path / "nothere.pt")


def test_frozen_stages_stay_frozen() -> None:
    """Frozen stages get no gradient, their BatchNorm statistics do not move in training mode, the rest learns."""
    backbone = build_backbone("resnet12", 3, MEAN, STD, image_size=32, freeze=["stage1", "stage2"], **SMALL_RESNET12)
    method = build_method("protonet", backbone, {})
    frozen_before = {k: v.clone() for k, v in backbone.features.stage1.state_dict().items()}
    free_before = backbone.features.stage4.conv1.weight.clone()
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=0.01)
    method.train()
    support, query = torch.rand(10, 3, 32, 32), torch.rand(10, 3, 32, 32)
    labels = torch.arange(5).repeat_interleave(2)
    F.cross_entropy(method(support, labels, query), labels).backward()
    optimizer.step()
    for key, value in backbone.features.stage1.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    assert not torch.equal(backbone.features.stage4.conv1.weight, free_before)
    assert not backbone.features.stage2.training and backbone.features.stage3.training


def test_frozen_statistics_normalise_as_in_evaluation_while_the_weights_learn() -> None:
    """freeze_statistics: in training mode the backbone computes its evaluation-mode features (running statistics,
    which stay as they are), and its parameters, BatchNorm scale and shift included, still get gradients."""
    backbone = build_backbone("conv4", 1, [0.1], [0.3], freeze_statistics=True)
    reference = build_backbone("conv4", 1, [0.1], [0.3])
    reference.load_state_dict(backbone.state_dict())
    statistics = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k or "batches" in k}
    images = torch.rand(12, 1, 28, 28)
    backbone.train()
    features = backbone(images)
    torch.testing.assert_close(features, reference.eval()(images))
    assert not torch.allclose(features, reference.train()(images))
    features.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    for key, value in statistics.items():
        assert torch.equal(backbone.state_dict()[key], value), key


@pytest.mark.parametrize("method", ["maml", "reptile"])
def test_adaptive_methods_refuse_frozen_statistics(method: str) -> None:
    """Their inner loop normalises with batch statistics whatever the module's mode: the option would do nothing."""
    backbone = build_backbone("conv4", 1, [0.1], [0.3], freeze_statistics=True)
    with pytest.raises(FsltoolError, match="freeze_statistics does not apply to it"):
        build_method(method, backbone, {"way": 5})


METHOD_OPTIONS = {
    "protonet": ("resnet12", {}, {}),
    "matchingnet": ("resnet12", {}, {"fce": True}),
    "relationnet": ("resnet12", {"flatten": False}, {}),
    "snail": ("resnet12", {}, {"way": 5}),
    "mann": ("resnet12", {}, {"way": 5}),
    "maml": ("resnet12", {}, {"way": 5, "inner_steps": 1}),
}


@pytest.mark.parametrize("method_name", list(METHOD_OPTIONS))
def test_every_method_learns_on_resnet12(method_name: str) -> None:
    """Each method on a (small) ResNet-12 at 32x32 RGB: a few steps on one episode lower its training loss."""
    from fsltool.data.episodes import Episode, EpisodeShape

    backbone_name, backbone_options, options = METHOD_OPTIONS[method_name]
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name, 3, MEAN, STD, image_size=32, **SMALL_RESNET12, **backbone_options)
    method = build_method(method_name, backbone, options)
    shape = EpisodeShape(5, 1, 2)
    generator = torch.Generator().manual_seed(3)
    episode = Episode(torch.rand(5, 3, 32, 32, generator=generator), torch.arange(5),
                      torch.rand(10, 3, 32, 32, generator=generator), torch.arange(5).repeat_interleave(2), shape)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    method.train()
    losses = []
    for _ in range(6):
        outputs = method.meta_step([episode])
        loss = torch.stack([output.loss for output in outputs]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def test_reptile_meta_step_on_resnet12_moves_every_parameter() -> None:
    """Reptile's meta-gradient (initial minus adapted weights) reaches every layer of a residual backbone."""
    from fsltool.data.episodes import Episode, EpisodeShape

    backbone = build_backbone("resnet12", 3, MEAN, STD, image_size=32, **SMALL_RESNET12)
    method = build_method("reptile", backbone, {"way": 5, "inner_steps": 2})
    generator = torch.Generator().manual_seed(3)
    episode = Episode(torch.rand(5, 3, 32, 32, generator=generator), torch.arange(5),
                      torch.rand(5, 3, 32, 32, generator=generator), torch.arange(5), EpisodeShape(5, 1, 1))
    method.train()
    torch.stack([output.loss for output in method.meta_step([episode])]).mean().backward()
    for name, parameter in backbone.features.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_meta_training_starts_from_a_weights_file_and_keeps_frozen_stages(synthetic_file: Path, tmp_path: Path) -> None:
    """A run with backbone_options.weights starts from the file's tensors; a frozen stage ends exactly there, the
    others move; the rebuilt trained model no longer needs the file."""
    from conftest import quick_recipe, trained

    from fsltool.checkpoint import load_trained

    torch.manual_seed(5)
    source = build_backbone("resnet12", 1, [0.5], [0.2], image_size=28, **SMALL_RESNET12)
    torch.save(source.features.state_dict(), tmp_path / "pretrained.pt")
    recipe = quick_recipe(synthetic_file, tmp_path / "run", backbone="resnet12", episodes=4, shape="5w1s2q")
    recipe.backbone_options = {**SMALL_RESNET12, "weights": str(tmp_path / "pretrained.pt"), "freeze": ["stage1"]}
    run = trained(recipe)
    (tmp_path / "pretrained.pt").unlink()
    features = load_trained(run).method.backbone.features
    for key, value in source.features.stage1.state_dict().items():
        assert torch.equal(features.stage1.state_dict()[key], value), key
    assert not torch.equal(features.stage4.conv1.weight, source.features.stage4.conv1.weight)


@pytest.mark.parametrize("name", ["conv4", "conv4-strided", "conv4-relation"])
def test_glorot_weight_init_is_tensorflows_default(name: str) -> None:
    """weight_init: glorot draws every convolution uniformly within sqrt(6 / (fan_in + fan_out)), TensorFlow's
    glorot_uniform (fans of 3x3 kernels: 9 x channels in and out); the default keeps torch's narrower draw."""
    torch.manual_seed(0)
    glorot = build_backbone(name, 1, [0.1], [0.3], weight_init="glorot")
    torch.manual_seed(0)
    default = build_backbone(name, 1, [0.1], [0.3])
    convs = [m for m in glorot.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    for conv in convs[1:]:
        bound = math.sqrt(6 / (9 * conv.in_channels + 9 * conv.out_channels))
        weight = conv.weight.detach()
        assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound
        assert weight.pow(2).mean().sqrt() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # a uniform's spread
    narrower = [m.weight.detach().abs().max() for m in default.modules() if isinstance(m, nn.Conv2d)][1:]
    assert all(w < 0.7 * math.sqrt(6 / (9 * 64 * 2)) for w in narrower)
    with pytest.raises(FsltoolError, match="backbone_options.weight_init must be one of torch, glorot, got 'he'"):
        build_backbone(name, 1, [0.1], [0.3], weight_init="he")


@pytest.mark.parametrize("name", ["conv4", "conv4-strided", "conv4-relation"])
def test_bn_scale_false_fixes_every_batch_norm_scale_at_one(name: str) -> None:
    """bn_scale: false (MAML's tf.contrib.layers.batch_norm: center, no scale): the scale is a buffer of ones under
    the same state_dict key, no parameter; with the same draws the network computes what the default one does at
    its start, and only the shifts train."""
    torch.manual_seed(0)
    fixed = build_backbone(name, 1, [0.1], [0.3], bn_scale=False)
    torch.manual_seed(0)
    default = build_backbone(name, 1, [0.1], [0.3])
    assert fixed.state_dict().keys() == default.state_dict().keys()
    assert {n for n, _ in default.named_parameters()} - {n for n, _ in fixed.named_parameters()} == {
        n for n, m in default.named_modules() if isinstance(m, nn.BatchNorm2d) for n in [f"{n}.weight"]}
    images = torch.rand(6, 1, 28, 28)
    torch.testing.assert_close(fixed(images), default(images), rtol=0, atol=0)
    fixed(images).sum().backward()
    scales = [m.weight for m in fixed.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(scales) == 4 and all(s.grad is None and not s.requires_grad and torch.equal(s, torch.ones_like(s)) for s in scales)
    with pytest.raises(FsltoolError, match="backbone_options.bn_scale must be true or false, got 'no'"):
        build_backbone(name, 1, [0.1], [0.3], bn_scale="no")
