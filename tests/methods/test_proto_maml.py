"""Proto-MAML (the maml method's ``head_init: prototypes``): the prototype head scores as ProtoNet, the inner loop
starts each task there, the meta-gradient through that start matches finite differences (second order, and first
order at a vanishing inner learning rate, where the two orders agree: the start's graph to the body is kept),
grouped == per-task with every MAML++ option, and the option is named when wrong."""

from __future__ import annotations

import pytest
import torch

from fsltool.errors import FsltoolError
from fsltool.methods.adaptation import prototype_head
from tests.methods.test_adaptation_functional import assert_same_results, evaluation_scores, meta_step_results, opaque_conv4
from tests.methods.test_maml import checked_entries, finite_difference_error, meta_gradient, tiny_episodes, tiny_maml
from tests.methods.test_maml_plus_plus import EVERY_OPTION, perturbed


def test_the_prototype_head_gives_protonets_softmax() -> None:
    """softmax(2 c_k.f - |c_k|^2) = softmax(-|f - c_k|^2), c_k the mean of class k's support features."""
    generator = torch.Generator().manual_seed(0)
    support, query = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64), torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    weight, bias = prototype_head(support, labels, 3)
    means = torch.stack([torch.stack([support[t][labels[t] == k].mean(0) for k in range(3)]) for t in range(2)])
    torch.testing.assert_close(weight, 2 * means)
    logits = torch.einsum("tnd,tkd->tnk", query, weight) + bias.unsqueeze(1)
    torch.testing.assert_close(logits.softmax(-1), (-torch.cdist(query, means).pow(2)).softmax(-1))


def test_the_inner_loop_starts_at_the_support_prototypes() -> None:
    """At a vanishing inner learning rate the adapted scores are the prototype classifier's on the body's features
    (queries normalised with the support set's BatchNorm statistics, as the non-transductive pass), whatever the
    meta-learned head holds."""
    method = tiny_maml(head_init="prototypes", inner_lr=1e-12, test_inner_steps=1).eval()
    episode = tiny_episodes(1)[0]
    support, labels, query = episode.support[None], episode.support_labels[None], episode.query[None]
    with torch.no_grad():
        scores = method.score_episodes(support, labels, query)
        body = [p.unsqueeze(0) for p in method.network.parameters[:-2]]
        features = method.network.features(body, torch.cat([support, query], 1), stats_rows=support.shape[1])
        weight, bias = prototype_head(features[:, : support.shape[1]], labels, 3)
        expected = torch.einsum("tnd,tkd->tnk", features[:, support.shape[1] :], weight) + bias.unsqueeze(1)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)
    assert method.head.weight.abs().sum() > 0  # tiny_maml's random head: not what scored


@pytest.mark.parametrize(("first_order", "inner_lr"), [(False, 0.4), (True, 1e-7)], ids=["second-order", "first-order-vanishing-lr"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-task"])
def test_meta_gradient_through_the_prototype_start_matches_finite_differences(first_order: bool, inner_lr: float, grouped: bool) -> None:
    """float64, 2 inner steps, 2 tasks: the body's meta-gradient is the central finite difference of the outer loss
    (relative 1e-4 or better). First order is exact only as the inner learning rate vanishes, and only if the
    head's start keeps its graph to the body (without it the body's gradient would be the query loss's through
    the features alone). The meta-learned head is unused: its gradient is zero."""
    method = tiny_maml(head_init="prototypes", first_order=first_order, inner_lr=inner_lr)
    method.group_tasks = grouped
    episodes = tiny_episodes(2)
    grads = meta_gradient(method, episodes)
    names = [name for name, _ in method.named_parameters()]
    head = [i for i, name in enumerate(names) if name.startswith("head.")]
    assert all(torch.equal(grads[i], torch.zeros_like(grads[i])) for i in head)
    entries = [(i, index) for i, index in checked_entries(method, grads) if i not in head]
    assert len(entries) == 9  # the first convolution, 4 x (BatchNorm scale, shift)
    assert finite_difference_error(method, episodes, grads, entries) < 1e-4


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_grouped_equals_per_task_with_every_maml_plus_plus_option(first_order: bool) -> None:
    """A 3-task meta-step (losses, scores, meta-gradients, running statistics) grouped in one pass, in chunks of 2
    with query passes of 1, and on the per-task path all agree; so does evaluating 3 episodes side by side."""
    options = {**EVERY_OPTION, "first_order": first_order, "head_init": "prototypes"}
    results, scores = [], []
    for backbone, chunk, query_chunk in ((None, 8, 8), (None, 2, 1), (opaque_conv4(), 8, 8)):
        method = perturbed(tiny_maml(backbone, **options))
        method.task_chunk, method.query_chunk = chunk, query_chunk
        results.append(meta_step_results(method, tiny_episodes(3)))
        scores.append(evaluation_scores(method))
    for other, other_scores in zip(results[1:], scores[1:]):
        assert_same_results(results[0], other)
        torch.testing.assert_close(scores[0], other_scores, rtol=1e-10, atol=1e-12)


def test_the_start_changes_what_meta_training_learns() -> None:
    """The same meta-step from a zero head and from the prototypes gives other losses and body gradients."""
    episodes = tiny_episodes(2)
    zero, prototypes = tiny_maml(), tiny_maml(head_init="prototypes")
    with torch.no_grad():
        zero.head.weight.zero_()
        zero.head.bias.zero_()
    assert not torch.allclose(meta_gradient(zero, episodes)[0], meta_gradient(prototypes, episodes)[0])


def test_an_unknown_head_init_is_named() -> None:
    with pytest.raises(FsltoolError, match=r"method_options.head_init must be one of zero, prototypes, got 'proto'"):
        tiny_maml(head_init="proto")
