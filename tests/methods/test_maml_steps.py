"""MAML's two meta-training steps (method_options.step): grouped, tasks side by side, and lean, one task at a time.
Both compute the same meta-step; what differs is how many tasks each inner-loop and query pass holds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError
from fsltool.methods.maml import MAML
from fsltool.models.backbones import Backbone
from tests.methods.test_adaptation_functional import evaluation_scores, meta_step_results, opaque_conv4
from tests.methods.test_maml import tiny_episodes, tiny_maml
from tests.methods.test_maml_plus_plus import EVERY_OPTION, perturbed


def results_and_pass_sizes(method: MAML, episodes: list[Episode]) -> tuple[list[list[torch.Tensor]], set[int]]:
    """meta_step_results, and how many tasks the network's passes held (inner-loop support passes and query passes)."""
    sizes: set[int] = set()
    logits: Callable[..., torch.Tensor] = method.network.logits

    def counted(params: list[torch.Tensor], images: torch.Tensor, **options: object) -> torch.Tensor:
        sizes.add(images.shape[0])
        return logits(params, images, **options)

    method.network.logits = counted  # type: ignore[method-assign]
    return meta_step_results(method, episodes), sizes


def assert_same(first: list[list[torch.Tensor]], second: list[list[torch.Tensor]]) -> None:
    for a_values, b_values in zip(first, second, strict=True):
        for a, b in zip(a_values, b_values, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("transductive_bn", [False, True], ids=["support-bn", "transductive-bn"])
def test_lean_step_takes_one_task_per_pass_and_equals_the_grouped_step(first_order: bool, transductive_bn: bool) -> None:
    """A 3-task meta-step: the grouped step runs the 3 tasks in every pass, the lean step one task per pass, and
    their losses, scores, meta-gradients and BatchNorm running statistics agree to float64 rounding."""
    runs = {step: results_and_pass_sizes(tiny_maml(first_order=first_order, transductive_bn=transductive_bn, step=step), tiny_episodes(3))
            for step in ("grouped", "lean")}
    assert runs["grouped"][1] == {3}
    assert runs["lean"][1] == {1}
    assert_same(runs["grouped"][0], runs["lean"][0])


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_lean_step_equals_the_grouped_step_with_every_maml_plus_plus_option(first_order: bool) -> None:
    """Multi-step loss, per-step BatchNorm and learned inner learning rates on, mid-annealing: the same meta-step
    (per-step running statistics and the inner learning rates' gradients included) and the same evaluation."""
    results, scores = [], []
    for step in ("grouped", "lean"):
        method = perturbed(tiny_maml(**{**EVERY_OPTION, "first_order": first_order, "step": step}))
        method.meta_steps_done.fill_(3)
        results.append(meta_step_results(method, tiny_episodes(3)))
        scores.append(evaluation_scores(method))
    assert_same(*results)
    torch.testing.assert_close(*scores, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("step", ["grouped", "lean"])
def test_a_backbone_run_task_by_task_takes_one_task_per_pass_in_either_step(step: str) -> None:
    """A backbone the grouped network cannot run (here conv4-strided inside a Sequential subclass) runs task by task
    anyway: each pass holds one task's graph whatever the step, with the chain's results."""
    backbone: Backbone = opaque_conv4()
    per_task, sizes = results_and_pass_sizes(tiny_maml(backbone, step=step), tiny_episodes(3))
    assert sizes == {1}
    assert_same(per_task, meta_step_results(tiny_maml(step=step), tiny_episodes(3)))


def test_an_unknown_step_is_named() -> None:
    with pytest.raises(FsltoolError, match=r"method_options.step must be one of grouped, lean, got 'fast'"):
        tiny_maml(step="fast")
