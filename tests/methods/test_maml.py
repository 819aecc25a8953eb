from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import Episode, EpisodeShape, episode_labels
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import evaluate
from fsltool.export import export_run
from fsltool.methods import build_method
from fsltool.methods.maml import MAML
from fsltool.models import build_backbone
from fsltool.models.backbones import Backbone
from fsltool.recipe import load_recipe
from fsltool.runtime import create_session
from fsltool.train import meta_train
from tests.conftest import quick_recipe, random_episode

REPO = Path(__file__).resolve().parents[2]


def fresh(backbone: str = "conv4-strided", hidden: int = 64, **options: object) -> MAML:
    torch.manual_seed(0)
    method = build_method("maml", build_backbone(backbone, 1, [0.1], [0.3], hidden=hidden), options)
    assert isinstance(method, MAML)
    return method


def tiny_episodes(tasks: int, way: int = 3, shot: int = 2, query: int = 2, size: int = 28, dtype: torch.dtype = torch.float64) -> list[Episode]:
    generator = torch.Generator().manual_seed(tasks * 10 + way)
    shape = EpisodeShape(way, shot, query)
    support_labels, query_labels = episode_labels(shape)
    return [
        Episode(torch.rand(way * shot, 1, size, size, generator=generator, dtype=dtype), support_labels,
                torch.rand(way * query, 1, size, size, generator=generator, dtype=dtype), query_labels, shape)
        for _ in range(tasks)
    ]


def tiny_maml(backbone: Backbone | None = None, **options: object) -> MAML:
    """conv4-strided with 4 filters (28 -> 14 -> 7 -> 4 -> 2) or the given ``backbone``, float64, a random head (the
    zero head would make the body's first inner gradient vanish and hide part of what the check must see)."""
    settings: dict[str, object] = {"way": 3, "inner_steps": 2, "inner_lr": 0.4, **options}
    method = (fresh(hidden=4, **settings) if backbone is None else build_method("maml", backbone, settings)).double()
    assert isinstance(method, MAML)
    with torch.no_grad():
        method.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        method.head.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return method


def outer_loss(method: MAML, episodes: list[Episode]) -> torch.Tensor:
    """What the training loop backpropagates: the mean of the meta-batch's losses."""
    return torch.stack([output.loss for output in method.meta_step(episodes)]).mean()


def meta_gradient(method: MAML, episodes: list[Episode]) -> list[torch.Tensor]:
    method.zero_grad(set_to_none=True)
    outer_loss(method, episodes).backward()
    return [p.grad.clone() for p in method.parameters()]


def checked_entries(method: MAML, grads: list[torch.Tensor]) -> list[tuple[int, tuple[int, ...]]]:
    """The largest-gradient entry of the first convolution, of every BatchNorm scale and shift, and of the head."""
    names = [name for name, _ in method.named_parameters()]
    chosen = [i for i, name in enumerate(names) if name.endswith("features.0.0.weight") or ".1.weight" in name or ".1.bias" in name or name.startswith("head.")]
    entries = []
    for i in chosen:
        flat = int(grads[i].abs().flatten().argmax())
        entries.append((i, tuple(int(k) for k in np.unravel_index(flat, grads[i].shape))))
    return entries


@pytest.mark.parametrize("adapt_norms", [True, False], ids=["norms-adapted", "norms-meta-learned-only"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-task"])
@pytest.mark.parametrize("transductive_bn", [False, True], ids=["support-bn", "transductive-bn"])
def test_second_order_meta_gradient_matches_finite_differences(transductive_bn: bool, grouped: bool, adapt_norms: bool) -> None:
    """float64, BatchNorm in every block, 2 inner steps, 2 tasks: the meta-gradient autograd gives (tasks grouped or
    one by one; BatchNorm scales and shifts adapted in the inner loop or not) is the central finite difference of
    the outer loss to a relative 1e-4 or better at every checked entry (measured: ~1e-8 with h = 1e-6)."""
    method = tiny_maml(transductive_bn=transductive_bn, adapt_norms=adapt_norms)
    method.group_tasks = grouped
    episodes = tiny_episodes(2)
    grads = meta_gradient(method, episodes)
    entries = checked_entries(method, grads)
    assert len(entries) == 11  # the first convolution, 4 x (BN scale, shift), head weight and bias
    worst = finite_difference_error(method, episodes, grads, entries)
    assert worst < 1e-4, worst


def finite_difference_error(method: MAML, episodes: list[Episode], grads: list[torch.Tensor], entries: list[tuple[int, tuple[int, ...]]]) -> float:
    """The largest relative difference, over ``entries`` (parameter, element), between the meta-gradient ``grads``
    and the central finite difference (h = 1e-6) of the outer loss."""
    params = list(method.parameters())
    h = 1e-6
    worst = 0.0
    for i, index in entries:
        with torch.no_grad():
            original = params[i][index].item()
            params[i][index] = original + h
            plus = outer_loss(method, episodes).item()
            params[i][index] = original - h
            minus = outer_loss(method, episodes).item()
            params[i][index] = original
        numeric = (plus - minus) / (2 * h)
        analytic = grads[i][index].item()
        assert abs(analytic) > 1e-4, "pick entries whose gradient is not (near) zero"
        worst = max(worst, abs(analytic - numeric) / abs(numeric))
    return worst


def test_without_adapt_norms_the_inner_loop_leaves_batchnorm_parameters_alone() -> None:
    """``adapt_norms: false`` (MAML's reference code): after the inner steps every BatchNorm scale and shift is
    still the meta-parameter while the convolutions and the head have moved; with the default they move too."""
    episodes = tiny_episodes(2)
    support, labels = torch.stack([e.support for e in episodes]), torch.stack([e.support_labels for e in episodes])
    for adapt_norms in (True, False):
        method = tiny_maml(adapt_norms=adapt_norms)
        names = [name for name, _ in method.backbone.features.named_parameters()] + ["head.weight", "head.bias"]
        meta = method.task_copies(2, detach=True)
        adapted = method.adapt(meta, support, labels, 2, create_graph=False, track=False)[1]
        for name, before, after in zip(names, meta, adapted, strict=True):
            moved = not torch.equal(before, after)
            is_norm = ".1." in name  # conv_block: index 1 is the BatchNorm layer
            assert moved == (adapt_norms or not is_norm), (adapt_norms, name)


def test_first_order_is_the_query_gradient_at_the_adapted_parameters_and_differs_from_second_order() -> None:
    episodes = tiny_episodes(2)
    second = meta_gradient(tiny_maml(), episodes)
    method = tiny_maml(first_order=True)
    first = meta_gradient(method, episodes)
    # FOMAML by definition: the mean over tasks of the query-loss gradient taken at each task's adapted parameters.
    expected = [torch.zeros_like(g) for g in first]
    for episode in episodes:
        adapted = [p.detach().clone().requires_grad_() for p in method.parameters()]
        for _ in range(2):
            logits = functional_logits(method, adapted, episode.support)
            grads = torch.autograd.grad(F.cross_entropy(logits, episode.support_labels), adapted)
            adapted = [(p - 0.4 * g).detach().requires_grad_() for p, g in zip(adapted, grads)]
        query = torch.cat([episode.support, episode.query])
        loss = F.cross_entropy(functional_logits(method, adapted, query, stats_rows=len(episode.support))[len(episode.support):], episode.query_labels)
        for total, g in zip(expected, torch.autograd.grad(loss, adapted)):
            total += g / len(episodes)
    for got, want in zip(first, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    difference = torch.cat([(a - b).flatten() for a, b in zip(first, second)]).norm() / torch.cat([g.flatten() for g in second]).norm()
    assert difference > 0.05, float(difference)


def functional_logits(method: MAML, params: list[torch.Tensor], images: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
    """The network written out layer by layer with plain (ungrouped) ops: an independent reference."""
    names = [name for name, _ in method.named_parameters()]
    values = dict(zip(names, params))
    x = method.backbone.normalize(images)
    rows = len(images) if stats_rows is None else stats_rows
    for b, block in enumerate(method.backbone.features):
        conv = block[0]
        x = F.conv2d(x, values[f"backbone.features.{b}.0.weight"], stride=conv.stride, padding=conv.padding)
        ref = x[:rows]
        mean, var = ref.mean((0, 2, 3), keepdim=True), ref.var((0, 2, 3), unbiased=False, keepdim=True)
        weight, bias = values[f"backbone.features.{b}.1.weight"], values[f"backbone.features.{b}.1.bias"]
        x = F.relu((x - mean) / torch.sqrt(var + block[1].eps) * weight[:, None, None] + bias[:, None, None])
    return x.mean((2, 3)) @ values["head.weight"].T + values["head.bias"]


@pytest.mark.parametrize("adapt_norms", [True, False])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("transductive_bn", [False, True])
def test_grouped_meta_batch_equals_the_per_task_loop(first_order: bool, transductive_bn: bool, adapt_norms: bool) -> None:
    """Losses, scores, meta-gradients and BatchNorm running statistics of a 3-task meta-batch: grouped in one pass,
    grouped in chunks of 2 tasks (each chunk's meta-gradient computed before the next), with query passes of 1 or
    2 tasks inside an inner-loop chunk of 3, and one by one."""
    results = []
    for grouped, chunk, query_chunk in ((True, 8, 8), (True, 2, 2), (True, 3, 2), (True, 8, 1), (False, 8, 8)):
        method = tiny_maml(first_order=first_order, transductive_bn=transductive_bn, adapt_norms=adapt_norms)
        method.group_tasks, method.task_chunk, method.query_chunk = grouped, chunk, query_chunk
        episodes = tiny_episodes(3)
        outputs = method.meta_step(episodes)
        method.zero_grad()
        torch.stack([o.loss for o in outputs]).mean().backward()
        results.append(([o.loss.detach() for o in outputs], [o.scores for o in outputs], [p.grad for p in method.parameters()],
                        [b.clone() for b in method.buffers()]))
    for other in results[1:]:
        for grouped, loop in zip(results[0], other):
            assert len(grouped) == len(loop)
            for a, b in zip(grouped, loop):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("adapt_norms", [True, False])
def test_a_fixed_batch_norm_scale_is_neither_adapted_nor_learned(adapt_norms: bool) -> None:
    """backbone_options.bn_scale false (MAML's code: BatchNorm with a shift, no scale): the meta-gradient is the
    finite difference of the outer loss, and the scale is no parameter, so it stays 1 (the grouped path against the
    per-task one: test_adaptation_functional.py)."""
    torch.manual_seed(0)
    method = tiny_maml(build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=4, bn_scale=False), adapt_norms=adapt_norms)
    names = [name for name, _ in method.named_parameters()]
    assert not any(name.endswith(".1.weight") for name in names) and sum(name.endswith(".1.bias") for name in names) == 4
    grads = meta_gradient(method, tiny_episodes(2))
    entries = checked_entries(method, grads)
    assert len(entries) == 7  # the first convolution, 4 BN shifts, head weight and bias
    assert finite_difference_error(method, tiny_episodes(2), grads, entries) < 1e-4
    scales = [b for name, b in method.named_buffers() if name.endswith(".1.weight")]
    assert len(scales) == 4 and all(torch.equal(scale, torch.ones_like(scale)) for scale in scales)


def test_evaluation_adapts_and_queries_do_not_influence_each_other() -> None:
    """Non-transductive: a query's scores are the same scored alone or with others; transductive: they are not.
    Evaluation runs under no_grad and inference_mode and still adapts (test_inner_steps)."""
    support, labels, query = random_episode(5, 1, 6)
    for transductive in (False, True):
        method = fresh(way=5, transductive_bn=transductive).eval()
        with torch.no_grad():
            together = method(support, labels, query)
        with torch.inference_mode():
            alone = torch.cat([method(support, labels, query[i : i + 1]) for i in range(6)])
        assert together.shape == (6, 5)
        assert torch.allclose(together, alone, atol=1e-5) != transductive
        assert together.abs().max() > 0  # the zero head moved: the inner loop ran
    assert not any(p.grad is not None for p in method.parameters())


def test_eval_mode_uses_test_inner_steps_and_leaves_running_statistics_alone() -> None:
    support, labels, query = random_episode(5, 1, 6)
    method = fresh(way=5, test_inner_steps=1, inner_steps=1).eval()
    before = [b.clone() for b in method.buffers()]
    with torch.no_grad():
        one = method(support, labels, query)
        method.test_inner_steps = 4
        four = method(support, labels, query)
    assert not torch.allclose(one, four)
    assert all(torch.equal(a, b) for a, b in zip(before, method.buffers()))
    method.train()
    method.meta_step(tiny_episodes(2, way=5, shot=1, query=1, dtype=torch.float32))
    assert not torch.equal(before[0], method.backbone.features[0][1].running_mean)


@pytest.fixture(scope="module")
def run(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "maml"
    recipe = quick_recipe(synthetic_file, output, method="maml", backbone="conv4-strided", method_options={"way": 5},
                          shape="5w1s5q", episodes=60, meta_batch=4, lr=0.003, log_every=15)
    recipe.validation.every = 60
    meta_train(recipe, quiet=True)
    return output


def test_short_meta_training_improves_accuracy_after_adaptation(run: Path, synthetic_file: Path) -> None:
    """60 meta-steps of 4 tasks (5-way 1-shot): the training loss falls, and the accuracy of the adapted network on
    the 30 stored validation episodes rises well above the same network's at initialisation."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["phase"] == "train"]
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0], losses
    trained = load_trained(run, "last")
    untrained = build_method("maml", build_backbone("conv4-strided", 1, trained.config["mean"], trained.config["std"]), {"way": 5})
    with FewShotData(synthetic_file) as data:
        after = evaluate(trained.method, data, "val", EpisodeShape(5, 1, 5))
        before = evaluate(untrained, data, "val", EpisodeShape(5, 1, 5))
    assert after.accuracy > before.accuracy + 5, (before.accuracy, after.accuracy)


def test_export_writes_the_body_as_a_prototype_embedding(run: Path, tmp_path: Path) -> None:
    report = export_run(run, tmp_path, verify_episodes=0)
    assert {p.name for p in report.files} == {"embedding.onnx", "embedding.ts", "classifier.onnx", "classifier.ts", "model.json"}
    method = load_trained(run).method
    reference = method.exported_classifier().eval()
    support, labels, query = random_episode(7, 3, 4)
    with torch.inference_mode():
        expected = reference(support, labels, query).numpy()
        embeddings = reference.body(query).numpy()
    got = create_session(str(tmp_path / "classifier.onnx"), "cpu").run(
        None, {"support": support.numpy(), "support_labels": labels.numpy(), "query": query.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    assert embeddings.shape == (4, 64)
    emb = create_session(str(tmp_path / "embedding.onnx"), "cpu").run(None, {"images": query.numpy()})[0]
    np.testing.assert_allclose(emb, embeddings, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"way": 1}, r"method_options.way must be at least 2"),
        ({"way": "5"}, r"method_options.way must be a positive integer, got '5'"),
        ({"inner_steps": 0}, r"method_options.inner_steps must be a positive integer, got 0"),
        ({"test_inner_steps": 2.5}, r"method_options.test_inner_steps must be a positive integer"),
        ({"inner_lr": 0}, r"method_options.inner_lr must be a positive number, got 0"),
        ({"inner_lr": "0.4"}, r"method_options.inner_lr must be a positive number, got '0.4'"),
        ({"first_order": "yes"}, r"method_options.first_order must be true or false, got 'yes'"),
        ({"transductive_bn": 1}, r"method_options.transductive_bn must be true or false, got 1"),
        ({"adapt_norms": "no"}, r"method_options.adapt_norms must be true or false, got 'no'"),
        ({"adapt_norms": True, "per_step_bn": True, "test_inner_steps": 1}, r"method_options.adapt_norms must be left out or false with per_step_bn"),
    ],
)
def test_bad_options_are_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        fresh(**options)


def test_an_episode_of_another_way_names_the_option() -> None:
    method = fresh(way=5)
    with pytest.raises(FsltoolError, match=r"method_options.way = 5 outputs, but the episode is 20-way"):
        method(*random_episode(20, 1, 3))
    with pytest.raises(FsltoolError, match=r"method_options.way = 5 outputs, but the episode is 3-way"):
        method.meta_step(tiny_episodes(2, way=3, dtype=torch.float32))


def test_unknown_option_is_caught_when_the_recipe_loads(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: d\noutput: o\nmethod: maml\nmethod_options:\n  inner_setps: 1\n")
    with pytest.raises(FsltoolError, match=r"method 'maml' has no option 'inner_setps' \(did you mean 'inner_steps'\?\)"):
        load_recipe(recipe)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*maml-*w*s.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_build_with_the_way_they_train(path: Path) -> None:
    recipe = load_recipe(path)
    method = build_method(recipe.method, build_backbone(recipe.backbone, 1, [0.1], [0.3], **recipe.backbone_options), recipe.method_options)
    for shape in (recipe.train.shape, recipe.validation.shape, recipe.test_shape):
        method.check_way(EpisodeShape.parse(shape).way)
