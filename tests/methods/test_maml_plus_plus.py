"""MAML++ options of the maml method (Antoniou et al. 2019): the multi-step loss schedule against the reference's
formula, float64 finite-difference checks of the meta-gradient with per-step BatchNorm, learned inner learning
rates and the multi-step loss, grouped == per-task with every option, derivative-order annealing, exact resume,
unchanged state_dicts with the options off, and the recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsltool.checkpoint import load_checkpoint
from fsltool.data.episodes import EpisodeShape
from fsltool.errors import FsltoolError
from fsltool.methods import build_method
from fsltool.methods.maml import MAML, multi_step_loss_weights
from fsltool.models import build_backbone
from fsltool.recipe import load_recipe
from fsltool.train import meta_train
from tests.conftest import assert_resume_from_episode_4_is_exact, quick_recipe
from tests.methods.test_adaptation_functional import evaluation_scores, meta_step_results, opaque_conv4
from tests.methods.test_maml import fresh, meta_gradient, outer_loss, tiny_episodes, tiny_maml

REPO = Path(__file__).resolve().parents[2]
EVERY_OPTION: dict[str, object] = {
    "multi_step_loss": True, "multi_step_loss_epochs": 10, "per_step_bn": True, "learn_inner_lr": True, "test_inner_steps": 2,
}


def pinned_at(method: MAML, done: int) -> MAML:
    """Every meta_step of ``method`` runs at meta-step ``done`` (a finite-difference check evaluates the outer
    loss many times, which would otherwise move the multi-step loss weights between evaluations)."""
    method.meta_steps_done.fill_(done)
    step = method.meta_step

    def meta_step_at_done(episodes):  # type: ignore[no-untyped-def]
        outputs = step(episodes)
        method.meta_steps_done.fill_(done)
        return outputs

    method.meta_step = meta_step_at_done  # type: ignore[method-assign]
    return method


def training_objective_error(method: MAML, episodes: list, grads: list[torch.Tensor], entries: list[tuple[int, tuple[int, ...]]]) -> float:
    """As test_maml.finite_difference_error, but the outer loss is evaluated with autograd on: the training
    objective (the multi-step loss), not the validation loss a meta_step gives under no_grad (the last step's)."""
    params = list(method.parameters())
    h = 1e-6
    worst = 0.0
    for i, index in entries:
        values = []
        for shift in (h, -h):
            with torch.no_grad():
                original = params[i][index].item()
                params[i][index] = original + shift
            values.append(outer_loss(method, episodes).item())
            with torch.no_grad():
                params[i][index] = original
        numeric = (values[0] - values[1]) / (2 * h)
        analytic = grads[i][index].item()
        assert abs(analytic) > 1e-4, "pick entries whose gradient is not (near) zero"
        worst = max(worst, abs(analytic - numeric) / abs(numeric))
    return worst


def perturbed(method: MAML) -> MAML:
    """Per-step BatchNorm copies and learned learning rates moved off their initial values, so that a check would
    see a copy or a rate used at the wrong step."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for step in method.step_norms or []:
            for layer in step:
                layer.weight.add_(0.2 * torch.randn(layer.weight.shape, generator=generator, dtype=layer.weight.dtype))
                layer.bias.add_(0.2 * torch.randn(layer.bias.shape, generator=generator, dtype=layer.bias.dtype))
        if method.inner_lrs is not None:
            method.inner_lrs.mul_(1 + 0.3 * torch.rand(method.inner_lrs.shape, generator=generator, dtype=method.inner_lrs.dtype))
    return method


def test_multi_step_loss_weights_follow_the_reference_schedule() -> None:
    """get_per_step_loss_importance_vector with N = 5 steps over 10 units: 1/N each at first; the others lose
    1/(N*10) per unit and the last gains (N-1) times that; floors 0.03/N and 1 - (N-1)*0.03/N; after the
    annealing the last step alone."""
    torch.testing.assert_close(multi_step_loss_weights(5, 0, 10), [0.2] * 5)
    torch.testing.assert_close(multi_step_loss_weights(5, 5, 10), [0.1] * 4 + [0.6])
    torch.testing.assert_close(multi_step_loss_weights(5, 9, 10), [0.02] * 4 + [0.92])
    torch.testing.assert_close(multi_step_loss_weights(5, 99, 100), [0.006] * 4 + [0.976])  # both floors
    assert multi_step_loss_weights(5, 10, 10) == [0.0] * 4 + [1.0]
    assert multi_step_loss_weights(1, 0, 10) == [1.0]
    for done in range(0, 100, 7):
        assert abs(sum(multi_step_loss_weights(5, done, 100)) - 1) < 1e-12


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-task"])
@pytest.mark.parametrize("transductive_bn", [False, True], ids=["support-bn", "transductive-bn"])
def test_every_option_meta_gradient_matches_finite_differences(grouped: bool, transductive_bn: bool) -> None:
    """float64, 2 inner steps, 2 tasks, every option at meta-step 3 of a 10-step multi-step loss annealing
    (weights 0.35 and 0.65): the autograd meta-gradient is the central finite difference of the outer loss at the
    largest-gradient entry of every meta-parameter: the convolutions, step 0's and step 1's BatchNorm scales and
    shifts, the head and the learned inner learning rates (relative 1e-4 or better)."""
    method = pinned_at(perturbed(tiny_maml(transductive_bn=transductive_bn, **EVERY_OPTION)), 3)
    assert method.step_loss_weights() == pytest.approx([0.35, 0.65])
    method.group_tasks = grouped
    episodes = tiny_episodes(2)
    grads = meta_gradient(method, episodes)
    names = [name for name, _ in method.named_parameters()]
    assert sum(name.startswith("step_norms.0.") for name in names) == 8 and "inner_lrs" in names
    entries = [(i, tuple(int(k) for k in torch.unravel_index(g.abs().argmax(), g.shape))) for i, g in enumerate(grads)]
    assert len(entries) == 4 + 8 + 2 + 8 + 1  # convolutions, BatchNorm (step 0), head, BatchNorm (step 1), inner lrs
    worst = training_objective_error(method, episodes, grads, entries)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("transductive_bn", [False, True], ids=["support-bn", "transductive-bn"])
def test_every_option_grouped_equals_per_task(first_order: bool, transductive_bn: bool) -> None:
    """With every option on: a 3-task meta-step (losses, scores, meta-gradients, every running statistic, per-step
    copies included) grouped in one pass, in chunks of 2 with query passes of 1, episode by episode, and on the
    per-task path (functional_call) all agree; so does evaluating 3 episodes side by side."""
    options = {**EVERY_OPTION, "first_order": first_order, "transductive_bn": transductive_bn}
    results, scores = [], []
    for backbone, grouped, chunk, query_chunk in ((None, True, 8, 8), (None, True, 2, 1), (None, False, 8, 8), (opaque_conv4(), True, 8, 8)):
        method = perturbed(tiny_maml(backbone, **options))
        method.group_tasks, method.task_chunk, method.query_chunk = grouped, chunk, query_chunk
        method.meta_steps_done.fill_(3)
        results.append(meta_step_results(method, tiny_episodes(3)))
        assert int(method.meta_steps_done) == 4
        scores.append(evaluation_scores(method))
    for other, other_scores in zip(results[1:], scores[1:]):
        for first_values, other_values in zip(results[0], other, strict=True):
            for a, b in zip(first_values, other_values, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(scores[0], other_scores, rtol=1e-10, atol=1e-12)


def test_per_step_batch_norm_tracks_each_steps_statistics_and_evaluation_leaves_them() -> None:
    """A training meta-step moves the running statistics of step 0 (the backbone's, which export ships) and of
    step 1's copies, each with its own values; evaluation changes none of them."""
    method = tiny_maml(**EVERY_OPTION)
    step0, step1 = method.backbone.features[0][1], method.step_norms[0][0]
    method.train()
    method.meta_step(tiny_episodes(2))
    assert not torch.equal(step0.running_mean, torch.zeros_like(step0.running_mean))
    assert not torch.equal(step1.running_mean, torch.zeros_like(step1.running_mean))
    assert not torch.allclose(step0.running_mean, step1.running_mean)
    before = [b.clone() for b in method.buffers()]
    evaluation_scores(method)
    assert all(torch.equal(a, b) for a, b in zip(before, method.buffers()))


def test_options_at_their_neutral_point_compute_plain_maml() -> None:
    """Learned learning rates at their initial value, and the multi-step loss once annealed, give plain MAML's
    losses and meta-gradients (inner_lr 0.5: exact in binary, so the float rate equals the stored one)."""
    episodes = tiny_episodes(2)
    plain = tiny_maml(inner_lr=0.5, test_inner_steps=2)
    expected = meta_gradient(plain, episodes)
    lslr = tiny_maml(inner_lr=0.5, test_inner_steps=2, learn_inner_lr=True)
    by_name = dict(zip([name for name, _ in lslr.named_parameters()], meta_gradient(lslr, episodes)))
    assert by_name.pop("inner_lrs").abs().min() > 0
    for got, want in zip(by_name.values(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    annealed = pinned_at(tiny_maml(inner_lr=0.5, multi_step_loss=True, multi_step_loss_epochs=5), 5)
    for got, want in zip(meta_gradient(annealed, episodes), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    msl = pinned_at(tiny_maml(inner_lr=0.5, multi_step_loss=True, multi_step_loss_epochs=5), 4)
    assert not torch.allclose(meta_gradient(msl, episodes)[0], expected[0])


def test_first_order_until_anneals_the_derivative_order() -> None:
    """first_order_until: 2 gives the first-order meta-gradient at meta-steps 0 and 1, the second-order one from
    meta-step 2 on."""
    episodes = tiny_episodes(2)
    first, second = meta_gradient(tiny_maml(first_order=True), episodes), meta_gradient(tiny_maml(), episodes)
    method = tiny_maml(first_order_until=2)
    for done, expected in ((0, first), (1, first), (2, second), (7, second)):
        for got, want in zip(meta_gradient(pinned_at(tiny_maml(first_order_until=2), done), episodes), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    method.meta_step(episodes)
    assert int(method.meta_steps_done) == 1
    with torch.no_grad():  # a validation loss is not a meta-step
        method.meta_step(episodes)
    assert int(method.meta_steps_done) == 1


def test_options_off_leave_the_state_dict_unchanged() -> None:
    """A plain MAML state_dict (and so every existing checkpoint) has exactly the keys it had; each option adds
    only its own state."""
    plain = set(fresh().state_dict())
    assert not any(key.startswith(("step_norms", "inner_lrs", "meta_steps_done")) for key in plain)
    assert set(fresh(multi_step_loss=True).state_dict()) - plain == {"meta_steps_done"}
    assert set(fresh(first_order_until=10).state_dict()) - plain == {"meta_steps_done"}
    assert set(fresh(learn_inner_lr=True, test_inner_steps=1).state_dict()) - plain == {"inner_lrs"}
    per_step = fresh(per_step_bn=True, inner_steps=3, test_inner_steps=3)
    added = set(per_step.state_dict()) - plain
    assert len(added) == 2 * 4 * 5 and all(key.startswith(("step_norms.0.", "step_norms.1.")) for key in added)  # 2 steps x 4 layers x (scale, shift, 3 buffers)
    assert fresh(learn_inner_lr=True, test_inner_steps=1, inner_lr=0.1).inner_lrs.shape == (4 + 8 + 2, 1)
    assert per_step.norm_positions and fresh(learn_inner_lr=True, per_step_bn=True, inner_steps=3, test_inner_steps=3).inner_lrs.shape == (4 + 2, 3)


def test_resume_with_every_option_is_exact(synthetic_file: Path, tmp_path: Path) -> None:
    """8 meta-steps with every option (multi-step loss annealed over 6, first order for the first 3) stopped at 4
    and resumed end with the parameters, per-step statistics and meta-step count of an uninterrupted run."""
    options = {"way": 5, "inner_steps": 2, "test_inner_steps": 2, "multi_step_loss": True, "multi_step_loss_epochs": 6,
               "per_step_bn": True, "learn_inner_lr": True, "first_order_until": 3}

    def recipe(output: Path):  # type: ignore[no-untyped-def]
        return quick_recipe(synthetic_file, output, method="maml", backbone="conv4-strided", method_options=options,
                            shape="5w1s1q", episodes=8, meta_batch=2, lr=0.003)

    meta_train(recipe(tmp_path / "straight"), quiet=True)
    assert int(load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]["meta_steps_done"]) == 8
    assert_resume_from_episode_4_is_exact(recipe(tmp_path / "resumed"), tmp_path / "straight")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"multi_step_loss": 1}, r"method_options.multi_step_loss must be true or false, got 1"),
        ({"multi_step_loss_epochs": 0}, r"method_options.multi_step_loss_epochs must be a positive integer, got 0"),
        ({"per_step_bn": "yes"}, r"method_options.per_step_bn must be true or false, got 'yes'"),
        ({"learn_inner_lr": None}, r"method_options.learn_inner_lr must be true or false, got None"),
        ({"first_order_until": -1}, r"method_options.first_order_until must be a whole number of meta-steps \(0: off\), got -1"),
        ({"first_order_until": 2.5}, r"method_options.first_order_until must be a whole number"),
        ({"first_order_until": 5, "first_order": True}, r"method_options.first_order_until anneals first order into second order: it needs first_order: false"),
        ({"per_step_bn": True, "inner_steps": 1, "test_inner_steps": 3}, r"method_options.test_inner_steps \(3\) must not exceed inner_steps \(1\)"),
        ({"learn_inner_lr": True, "inner_steps": 2, "test_inner_steps": 3}, r"method_options.test_inner_steps \(3\) must not exceed inner_steps \(2\)"),
    ],
)
def test_bad_options_are_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        fresh(**options)


def test_per_step_bn_needs_batch_norm() -> None:
    backbone = build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=4)
    backbone.features = torch.nn.Sequential(backbone.features[0][0], torch.nn.ReLU())
    with pytest.raises(FsltoolError, match=r"method_options.per_step_bn needs BatchNorm layers, and the backbone has none"):
        build_method("maml", backbone, {"per_step_bn": True, "test_inner_steps": 1})


FROM_SCRATCH = sorted((REPO / "recipes" / "omniglot").glob("maml++-[0-9]*w*s.yaml"))
PRETRAINED = sorted((REPO / "recipes" / "omniglot").glob("maml++-pretrained-*w*s.yaml"))


@pytest.mark.parametrize("path", FROM_SCRATCH + PRETRAINED, ids=lambda p: p.name)
def test_maml_plus_plus_recipes_build_at_the_papers_configuration(path: Path) -> None:
    """The reference's Omniglot MAML++ configuration: Conv-4 with max-pooling, 5 inner steps of lr 0.1 (train and
    test), every option on, meta-batch 8, Adam 1e-3 with cosine annealing, 1 query per class in training, the
    multi-step loss annealed over the first tenth of training (the reference: 10 of 100 epochs); the way the recipe
    trains. From the pretrained Conv-4, the 20-way inner learning rates start at 0.4 (docs/results.md)."""
    recipe = load_recipe(path)
    assert len(FROM_SCRATCH) == 4 and len(PRETRAINED) == 4
    method = build_method(recipe.method, build_backbone(recipe.backbone, 1, [0.1], [0.3], **recipe.backbone_options), recipe.method_options)
    assert isinstance(method, MAML) and recipe.backbone == "conv4"
    pretrained = path in PRETRAINED  # meta-fine-tuned from the pretrained Conv-4 with MAML's transfer outer lr
    inner_lr = 0.4 if pretrained and recipe.method_options["way"] == 20 else 0.1  # the pretrained features need a larger step
    assert (method.inner_steps, method.test_inner_steps, method.inner_lr) == (5, 5, inner_lr)
    assert method.multi_step_loss and method.per_step_bn and method.learn_inner_lr and method.second_order_now()
    assert method.multi_step_loss_epochs * 10 == recipe.train.episodes and EpisodeShape.parse(recipe.train.shape).query == 1
    assert recipe.init == ("runs/omniglot/pretrain-conv4" if pretrained else "")
    outer_lr = 0.0001 if pretrained else 0.001
    assert (recipe.train.meta_batch, recipe.train.lr, recipe.train.lr_schedule, recipe.train.optimizer) == (8, outer_lr, "cosine", "adam")
    for shape in (recipe.train.shape, recipe.validation.shape, recipe.test_shape):
        method.check_way(EpisodeShape.parse(shape).way)
