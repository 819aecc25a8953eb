from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsltool.data.episodes import Episode, EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import evaluate
from fsltool.methods import build_method
from fsltool.methods.adaptation import MetaLearnedBody
from fsltool.methods.base import TaskShare
from fsltool.methods.protonet import prototype_scores
from fsltool.methods import reptile as reptile_module
from fsltool.methods.reptile import Reptile, minibatch_order
from fsltool.models import build_backbone
from fsltool.models.backbones import Backbone
from fsltool.recipe import load_recipe
from fsltool.train import meta_train
from tests.conftest import quick_recipe, random_episode
from tests.methods.test_maml import tiny_episodes

REPO = Path(__file__).resolve().parents[2]


def fresh(hidden: int = 64, **options: object) -> Reptile:
    torch.manual_seed(0)
    method = build_method("reptile", build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=hidden), options)
    assert isinstance(method, Reptile)
    return method


def tiny_reptile(backbone: Backbone | None = None, **options: object) -> Reptile:
    """conv4-strided with 4 filters or the given ``backbone``, float64, a random head."""
    settings: dict[str, object] = {"way": 3, "inner_steps": 3, "inner_batch": 4, "inner_lr": 0.01, **options}
    method = (fresh(hidden=4, **settings) if backbone is None else build_method("reptile", backbone, settings)).double()
    assert isinstance(method, Reptile)
    with torch.no_grad():
        method.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return method


@pytest.mark.parametrize("inner_optimizer", ["adam", "sgd"])
def test_inner_loop_is_a_plain_optimizer_on_a_copy(inner_optimizer: str) -> None:
    """The trained copy equals torch.optim (Adam with beta1 = 0, or SGD) run on a deep copy of the module, with
    its ordinary forward (BatchNorm on batch statistics), over the same minibatches."""
    method = tiny_reptile(inner_optimizer=inner_optimizer)
    episode = tiny_episodes(1)[0]
    images, labels = torch.cat([episode.support, episode.query]), torch.cat([episode.support_labels, episode.query_labels])
    adapted = method.train_copies(images[None], labels[None], 3, 4, torch.Generator().manual_seed(5), track=False)
    reference = copy.deepcopy(method).train()
    body = MetaLearnedBody(reference.backbone)
    params = list(reference.parameters())
    optimizer = torch.optim.Adam(params, lr=0.01, betas=(0.0, 0.999)) if inner_optimizer == "adam" else torch.optim.SGD(params, lr=0.01)
    for chosen in minibatch_order(1, len(labels), 3, 4, torch.Generator().manual_seed(5))[0]:
        optimizer.zero_grad()
        F.cross_entropy(reference.head(body(images[chosen])), labels[chosen]).backward()
        optimizer.step()
    for got, want in zip(adapted, params):
        torch.testing.assert_close(got[0], want.detach(), rtol=1e-9, atol=1e-12)
    assert not torch.equal(adapted[0][0], method.network.parameters[0])  # it moved; the meta-parameters did not


def test_the_loops_sgd_step_on_the_surrogate_is_the_reptile_update() -> None:
    """meta_step's losses, averaged and backpropagated, then SGD (lr epsilon, no momentum) as train.py does:
    theta <- theta + epsilon * mean_t(theta'_t - theta)."""
    method = tiny_reptile()
    episodes = tiny_episodes(3)
    theta = [p.detach().clone() for p in method.parameters()]
    torch.manual_seed(7)
    outputs = method.meta_step(episodes)
    torch.manual_seed(7)  # the same minibatches again: the copies meta_step trained
    images = torch.stack([torch.cat([e.support, e.query]) for e in episodes])
    labels = torch.stack([torch.cat([e.support_labels, e.query_labels]) for e in episodes])
    copies = method.train_copies(images, labels, 3, 4, None, track=False)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.7, momentum=0.0)
    optimizer.zero_grad()
    torch.stack([o.loss for o in outputs]).mean().backward()
    optimizer.step()
    for before, after, trained in zip(theta, method.parameters(), copies):
        torch.testing.assert_close(after.detach(), before + 0.7 * (trained - before).mean(0), rtol=1e-12, atol=1e-14)
    for output, task_copies in zip(outputs, zip(*copies)):
        distance = sum(0.5 * (before - c).pow(2).sum() for before, c in zip(theta, task_copies))
        torch.testing.assert_close(output.loss.detach(), distance)
    # the log's scores: the trained copies' on the first query of each class (non-transductive: each query alone)
    support, query = torch.stack([e.support for e in episodes]), torch.stack([e.query for e in episodes])
    with torch.no_grad():
        every_query = method.network.query_logits(copies, support, query, False)
    for output, task_scores in zip(outputs, every_query):
        assert output.scores.shape == (3, 3) and output.labels.tolist() == [0, 1, 2]
        torch.testing.assert_close(output.scores, task_scores[::2], rtol=1e-12, atol=1e-12)
    transductive = tiny_reptile(transductive_bn=True)
    for output, episode in zip(transductive.meta_step(episodes), episodes):  # the query batch's statistics: every query
        assert output.scores.shape == (3 * 2, 3) and torch.equal(output.labels, episode.query_labels)


@pytest.mark.parametrize("transductive_bn", [False, True])
def test_grouped_meta_batch_equals_the_per_task_loop(transductive_bn: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Surrogate losses, scores, meta-gradients and BatchNorm running statistics of a 3-task meta-batch, grouped
    vs one task at a time, each task on the same minibatches either way."""
    episodes = tiny_episodes(3)
    order = minibatch_order(3, 10, 3, 4, torch.Generator().manual_seed(3))
    results = []
    for grouped in (True, False):
        method = tiny_reptile(transductive_bn=transductive_bn)
        method.group_tasks = grouped
        rows = iter([order] if grouped else order.split(1))
        monkeypatch.setattr(reptile_module, "minibatch_order", lambda *args: next(rows))
        outputs = method.meta_step(episodes)
        method.zero_grad()
        torch.stack([o.loss for o in outputs]).mean().backward()
        results.append(([o.loss.detach() for o in outputs], [o.scores for o in outputs], [p.grad for p in method.parameters()],
                        [b.clone() for b in method.buffers()]))
    for grouped_values, loop_values in zip(*results):
        for a, b in zip(grouped_values, loop_values):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_evaluation_is_seeded_non_transductive_and_leaves_the_model_alone() -> None:
    support, labels, query = random_episode(5, 1, 6)
    method = fresh(test_inner_steps=5).eval()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.no_grad():
        together = method(support, labels, query)
        again = method(support, labels, query)
    with torch.inference_mode():
        alone = torch.cat([method(support, labels, query[i : i + 1]) for i in range(6)])
    assert together.shape == (6, 5) and together.abs().max() > 0
    torch.testing.assert_close(together, again, rtol=0, atol=0)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in state.items())
    transductive = fresh(test_inner_steps=5, transductive_bn=True).eval()
    with torch.no_grad():
        assert not torch.allclose(transductive(support, labels, query)[:1], transductive(support, labels, query[:1]), atol=1e-5)


def test_per_query_bn_scores_each_query_with_the_support_set_and_itself_alone() -> None:
    """per_query_bn (the paper's non-transductive evaluation): a query's scores are the same scored with the other
    queries or alone, they are those of a pass over the support set plus that query, and they differ from the
    support-statistics mode's (the query enters its own normalisation). Evaluation labels it non-transductive."""
    support, labels, query = random_episode(5, 1, 6)
    method = fresh(test_inner_steps=5, per_query_bn=True).eval()
    with torch.no_grad():
        together = method(support, labels, query)
        alone = torch.cat([method(support, labels, query[i : i + 1]) for i in range(6)])
        adapted = method.train_copies(support[None], labels[None], 5, 5, torch.Generator().manual_seed(reptile_module.EVAL_SEED), track=False)
        reference = torch.cat([method.network.logits(adapted, torch.cat([support, query[i : i + 1]])[None])[0, -1:] for i in range(6)])
        method.per_query_bn = False
        support_statistics = method(support, labels, query)
    assert together.shape == (6, 5) and together.abs().max() > 0
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together, support_statistics, atol=1e-4)
    assert method.transductive is False


def test_short_meta_training_improves_accuracy_after_fine_tuning(synthetic_file: Path, tmp_path: Path) -> None:
    """40 meta-steps of 5 tasks, 5-way 1-shot with 9 more images per class, SGD epsilon 1 on the surrogate: the
    fine-tuned accuracy on the 30 stored validation episodes rises well above the initial network's."""
    options = {"way": 5, "inner_lr": 0.01, "test_inner_steps": 10}
    recipe = quick_recipe(synthetic_file, tmp_path / "reptile", method="reptile", backbone="conv4-strided", method_options=options,
                          shape="5w1s9q", episodes=40, meta_batch=5, optimizer="sgd", momentum=0.0, lr=1.0, log_every=10)
    recipe.validation.every, recipe.validation.episodes = 40, 30
    with FewShotData(synthetic_file) as data:
        torch.manual_seed(recipe.seed)
        untrained = build_method("reptile", build_backbone("conv4-strided", 1, data.mean, data.std), options)
        before = evaluate(untrained, data, "val", EpisodeShape(5, 1, 5)).accuracy
    after = meta_train(recipe, quiet=True).best_accuracy
    assert after > before + 5, (before, after)


def test_export_graphs_are_the_body_and_prototype_classification() -> None:
    method = fresh().eval()
    support, labels, query = random_episode(4, 2, 3)
    graphs = method.export_graphs(Episode(support, labels, query, torch.zeros(3, dtype=torch.long), EpisodeShape(4, 2, 1)))
    assert set(graphs) == {"embedding", "classifier"}
    with torch.no_grad():
        embeddings = graphs["embedding"].module(support)
        assert embeddings.shape == (8, 64)
        expected = prototype_scores(embeddings, labels, graphs["embedding"].module(query), 4)
        torch.testing.assert_close(graphs["classifier"].module(support, labels, query), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inner_optimizer": "rmsprop"}, r"method_options.inner_optimizer must be one of adam, sgd, got 'rmsprop'"),
        ({"inner_batch": 0}, r"method_options.inner_batch must be a positive integer, got 0"),
        ({"test_inner_batch": True}, r"method_options.test_inner_batch must be a positive integer, got True"),
        ({"inner_lr": -1e-3}, r"method_options.inner_lr must be a positive number, got -0.001"),
        ({"way": 0}, r"method_options.way must be a positive integer, got 0"),
        ({"transductive_bn": "no"}, r"method_options.transductive_bn must be true or false, got 'no'"),
        ({"per_query_bn": 1}, r"method_options.per_query_bn must be true or false, got 1"),
        ({"per_query_bn": True, "transductive_bn": True}, r"method_options.per_query_bn is a non-transductive mode"),
        ({"inner_adam_state": "global"}, r"method_options.inner_adam_state must be one of fresh, shared, got 'global'"),
        ({"inner_adam_state": "shared", "inner_optimizer": "sgd"}, r"method_options.inner_adam_state shared is Adam's state: it needs inner_optimizer: adam"),
    ],
)
def test_bad_options_are_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        fresh(**options)


def test_an_episode_of_another_way_names_the_option() -> None:
    with pytest.raises(FsltoolError, match=r"method_options.way = 5 outputs, but the episode is 3-way"):
        fresh(way=5).eval()(*random_episode(3, 1, 2))


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "omniglot").glob("reptile-*w*s.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_make_the_loops_step_the_reptile_update(path: Path) -> None:
    recipe = load_recipe(path)
    method = build_method(recipe.method, build_backbone(recipe.backbone, 1, [0.1], [0.3], **recipe.backbone_options), recipe.method_options)
    for shape in (recipe.train.shape, recipe.validation.shape, recipe.test_shape):
        method.check_way(EpisodeShape.parse(shape).way)
    train = recipe.train
    assert (train.optimizer, train.momentum, train.weight_decay) == ("sgd", 0.0, 0.0)
    assert EpisodeShape.parse(train.shape).per_class == 10  # the reference's 10 training shots per class
    assert train.lr_schedule == "linear"  # the paper's epsilon, annealed linearly to 0
    assert recipe.method_options["inner_adam_state"] == "shared"  # the reference code's one Adam state


def stacked(episodes: list[Episode]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, n, ...) images and (T, n) labels: each episode's support and query together, as meta-training uses them."""
    return (torch.stack([torch.cat([e.support, e.query]) for e in episodes]),
            torch.stack([torch.cat([e.support_labels, e.query_labels]) for e in episodes]))


def adam_from(params: list[torch.Tensor], squares: list[torch.Tensor], steps: int) -> torch.optim.Adam:
    """torch's Adam (beta1 = 0) over ``params``, its state loaded through its own load_state_dict."""
    optimizer = torch.optim.Adam(params, lr=0.01, betas=(0.0, 0.999))
    state = {i: {"step": torch.tensor(float(steps)), "exp_avg": torch.zeros_like(p), "exp_avg_sq": v.clone()}
             for i, (p, v) in enumerate(zip(params, squares))}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return optimizer


def train_reference(method: Reptile, optimizer: torch.optim.Adam, params: list[torch.Tensor], images: torch.Tensor,
                    labels: torch.Tensor, order: torch.Tensor) -> None:
    body = MetaLearnedBody(method.backbone)
    for chosen in order:
        optimizer.zero_grad()
        F.cross_entropy(method.head(body(images[chosen])), labels[chosen]).backward()
        optimizer.step()


def test_shared_adam_state_task_by_task_is_the_references_one_adam_across_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """inner_adam_state: shared, tasks one at a time: two meta-steps of 3 tasks train the same copies as ONE
    torch Adam whose state runs on across all six tasks (the reference code's), parameters reset per task; the
    shared state ends as that Adam's second moments and step count."""
    method = tiny_reptile(inner_adam_state="shared")
    method.group_tasks = False
    reference = copy.deepcopy(method).train()
    params = list(reference.parameters())
    optimizer = torch.optim.Adam(params, lr=0.01, betas=(0.0, 0.999))
    orders = minibatch_order(6, 10, 3, 4, torch.Generator().manual_seed(3))
    rows = iter(orders.split(1))
    monkeypatch.setattr(reptile_module, "minibatch_order", lambda *args: next(rows))
    for meta_step in range(2):
        episodes = tiny_episodes(3 + meta_step)[:3]
        theta = [p.detach().clone() for p in method.parameters()]
        losses = [o.loss.detach() for o in method.meta_step(episodes)]
        images, labels = stacked(episodes)
        for task in range(3):
            with torch.no_grad():
                for p, start in zip(params, theta):
                    p.copy_(start)
            train_reference(reference, optimizer, params, images[task], labels[task], orders[3 * meta_step + task])
            distance = sum(0.5 * (start - p.detach()).pow(2).sum() for start, p in zip(theta, params))
            torch.testing.assert_close(losses[task], distance, rtol=1e-10, atol=1e-14)
    for squares, p in zip(method._adam_squares(), params):
        torch.testing.assert_close(squares, optimizer.state[p]["exp_avg_sq"], rtol=1e-10, atol=1e-20)
    assert method._adam_steps == 18 and float(method.inner_adam_steps) == 18.0


def test_shared_adam_state_grouped_starts_each_task_from_it_and_absorbs_them_in_order() -> None:
    """Side by side, each task trains from the shared state (torch's Adam loaded with it gives the same copy),
    and the state then takes every task's second-moment additions, task t's decayed by the later tasks' steps."""
    method = tiny_reptile(inner_adam_state="shared")
    images, labels = stacked(tiny_episodes(3))
    method.train_copies(images, labels, 3, 4, torch.Generator().manual_seed(1), track=False, absorb=True)  # a state to start from
    start_squares, start_steps = [s.clone() for s in method._adam_squares()], method._adam_steps
    assert start_steps == 9 and all(s.abs().sum() > 0 for s in start_squares)
    copies = method.train_copies(images, labels, 3, 4, torch.Generator().manual_seed(2), track=False, absorb=True)
    order = minibatch_order(3, labels.shape[1], 3, 4, torch.Generator().manual_seed(2))
    decay = 0.999**3
    expected = [decay**3 * s for s in start_squares]
    for task in range(3):
        reference = copy.deepcopy(method).train()
        params = list(reference.parameters())
        optimizer = adam_from(params, start_squares, start_steps)
        train_reference(reference, optimizer, params, images[task], labels[task], order[task])
        for got, p in zip(copies, params):
            torch.testing.assert_close(got[task], p.detach(), rtol=1e-9, atol=1e-12)
        for i, (p, s) in enumerate(zip(params, start_squares)):
            expected[i] = expected[i] + decay ** (2 - task) * (optimizer.state[p]["exp_avg_sq"] - decay * s)
    for got, want in zip(method._adam_squares(), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-20)
    assert method._adam_steps == 18


def test_shared_adam_state_is_used_by_evaluation_left_unchanged_and_saved() -> None:
    """Evaluation fine-tunes from the shared state (other scores than from a zero state) without changing it;
    the state travels in the state_dict, step count included."""
    method = tiny_reptile(inner_adam_state="shared", way=5)
    images, labels = stacked(tiny_episodes(2, way=5))
    method.train_copies(images, labels, 3, 4, torch.Generator().manual_seed(1), track=False, absorb=True)
    method.eval()
    support, support_labels, query = random_episode(5, 1, 4)
    support, query = support.double(), query.double()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.no_grad():
        scores = method(support, support_labels, query)
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in state.items())
    reloaded = tiny_reptile(inner_adam_state="shared", way=5).eval()
    reloaded.load_state_dict(state)
    assert reloaded._adam_steps == 6  # 2 tasks x 3 steps
    zeroed = tiny_reptile(inner_adam_state="shared", way=5).eval()
    zeroed.load_state_dict({**state, **{k: torch.zeros_like(v) for k, v in state.items() if "inner_adam" in k}})
    with torch.no_grad():
        torch.testing.assert_close(reloaded(support, support_labels, query), scores, rtol=0, atol=0)
        assert not torch.allclose(zeroed(support, support_labels, query), scores, atol=1e-6)


def test_shared_adam_state_refuses_a_data_parallel_share() -> None:
    images, labels = stacked(tiny_episodes(2))
    with pytest.raises(FsltoolError, match=r"inner_adam_state.*cannot run data-parallel"):
        tiny_reptile(inner_adam_state="shared").train_copies(images, labels, 3, 4, None, track=False, share=TaskShare(0, 4), absorb=True)


@pytest.mark.parametrize(("method_name", "options"), [("reptile", {}), ("maml", {"inner_steps": 1})])
def test_initial_head_starts_the_meta_learned_head(method_name: str, options: dict) -> None:
    """initial_head: zero (default), glorot (Reptile's tf.layers.dense), normal (MAML's Omniglot tf.random_normal);
    the bias starts at zero in all three."""
    heads = {}
    for start in ("zero", "glorot", "normal"):
        torch.manual_seed(0)
        net = build_method(method_name, build_backbone("conv4-strided", 1, [0.1], [0.3]), {**options, "way": 20, "initial_head": start})
        heads[start] = net.head
        assert torch.equal(net.head.bias, torch.zeros(20))
    assert torch.equal(heads["zero"].weight, torch.zeros(20, 64))
    bound = math.sqrt(6 / (64 + 20))
    assert heads["glorot"].weight.abs().max() <= bound and heads["glorot"].weight.abs().max() > 0.9 * bound
    assert heads["normal"].weight.std().item() == pytest.approx(1.0, rel=0.1)
    with pytest.raises(FsltoolError, match="method_options.initial_head must be one of zero, glorot, normal"):
        build_method(method_name, build_backbone("conv4-strided", 1, [0.1], [0.3]), {**options, "initial_head": "ones"})
