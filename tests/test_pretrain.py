"""Supervised pretraining (fsltool pretrain) and starting a meta-training run from it (init:): learning, exact
resume, data parallelism, exact weight transfer, and the run working with evaluate and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fsltool.checkpoint import load_checkpoint, load_trained, training_budget, untrained_like
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import evaluate
from fsltool.pretrain import pretrain
from fsltool.recipe import PretrainConfig, Recipe, recipe_from_dict, validate
from fsltool.train import meta_train
from tests.conftest import quick_recipe, run_cli
from tests.test_distributed import torchrun


def pretrain_recipe(data: Path, output: Path, **settings: object) -> Recipe:
    recipe = quick_recipe(data, output)
    recipe.pretrain = PretrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 0.1, "log_every": 5, **settings})  # type: ignore[arg-type]
    recipe.validation.every = 1
    validate(recipe)
    return recipe


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if row["phase"] == "train"]


def test_pretraining_lowers_the_loss_and_beats_the_untrained_network_on_stored_episodes(synthetic_file: Path, tmp_path: Path) -> None:
    recipe = pretrain_recipe(synthetic_file, tmp_path / "run", epochs=6, lr_schedule="cosine")
    result = pretrain(recipe, quiet=True)
    curve = losses(tmp_path / "run")
    assert curve[-1] < 0.5 * curve[0]
    trained = load_trained(tmp_path / "run")
    with FewShotData(synthetic_file) as data:
        after = evaluate(trained.method, data, "test", EpisodeShape(5, 1, 5))
        before = evaluate(untrained_like(trained), data, "test", EpisodeShape(5, 1, 5))
    assert after.accuracy > before.accuracy + 10
    assert result.best_epoch == load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["epoch"]
    # The best checkpoint is chosen by few-shot validation accuracy, logged once per epoch.
    val = [row for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if row["phase"] == "val"]
    assert [row["epoch"] for row in val] == list(range(1, 7))
    assert result.best_accuracy == max(row["accuracy"] for row in val)


@pytest.mark.parametrize("settings", [{"augment": {"kind": "glyph"}, "rotation_weight": 0.5, "head": "cosine"},
                                      {"optimizer": "adamw", "lr": 0.01, "lr_schedule": "cosine", "warmup": 1, "clip_grad_norm": 1.0}])
def test_resume_at_an_epoch_boundary_is_exact(settings: dict[str, object], synthetic_file: Path, tmp_path: Path) -> None:
    raw = pretrain_recipe(synthetic_file, tmp_path / "run", epochs=3).to_dict()
    raw["pretrain"].update(settings)
    pretrain(recipe_from_dict(raw), quiet=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    straight, straight_losses = load_checkpoint(checkpoints / "last.pt"), losses(tmp_path / "run")
    (checkpoints / "last.pt").write_bytes((checkpoints / "epoch-00000001.pt").read_bytes())  # as if stopped after epoch 1
    pretrain(recipe_from_dict(raw), quiet=True, resume=True)
    resumed = load_checkpoint(checkpoints / "last.pt")
    for expected, got in [(straight["model"], resumed["model"]), *((straight["heads"][k], resumed["heads"][k]) for k in straight["heads"])]:
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
    assert losses(tmp_path / "run") == straight_losses


def test_two_processes_pretrain_like_one(synthetic_file: Path, tmp_path: Path) -> None:
    raw = pretrain_recipe(synthetic_file, tmp_path / "one", epochs=1, micro_batches=2).to_dict()
    pretrain(recipe_from_dict(raw), quiet=True)
    result = torchrun({**raw, "output": str(tmp_path / "two")}, tmp_path, command="pretrain")
    assert result.returncode == 0, result.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    for key, value in one["model"].items():  # parameters and BatchNorm running averages
        torch.testing.assert_close(two["model"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)


def test_init_starts_meta_training_from_exactly_the_pretrained_backbone(synthetic_file: Path, tmp_path: Path) -> None:
    pretrain(pretrain_recipe(synthetic_file, tmp_path / "pre", epochs=1), quiet=True)
    pretrained = load_checkpoint(tmp_path / "pre" / "checkpoints" / "best.pt")["model"]
    recipe = quick_recipe(synthetic_file, tmp_path / "fine", episodes=1, lr=1e-12)  # one step too small to move anything
    recipe.init = str(tmp_path / "pre")
    meta_train(recipe, quiet=True)
    fine = load_checkpoint(tmp_path / "fine" / "checkpoints" / "last.pt")["model"]
    features = [key for key in pretrained if key.startswith("backbone.features.") and "running" not in key and "tracked" not in key]
    assert features
    for key in features:
        torch.testing.assert_close(fine[key], pretrained[key], rtol=0, atol=1e-9, msg=key)
    scratch = quick_recipe(synthetic_file, tmp_path / "scratch", episodes=1, lr=1e-12)
    meta_train(scratch, quiet=True)
    unloaded = load_checkpoint(tmp_path / "scratch" / "checkpoints" / "last.pt")["model"]
    assert any(not torch.allclose(unloaded[key], pretrained[key]) for key in features)


def test_init_refuses_another_backbone_naming_both(synthetic_file: Path, tmp_path: Path) -> None:
    pretrain(pretrain_recipe(synthetic_file, tmp_path / "pre", epochs=1), quiet=True)
    recipe = quick_recipe(synthetic_file, tmp_path / "fine", episodes=1)
    recipe.init, recipe.backbone_options = str(tmp_path / "pre"), {"hidden": 32}
    with pytest.raises(FsltoolError, match=r"init: .*pre has backbone 'conv4' \{\} .* this recipe has 'conv4' \{'hidden': 32\}"):
        meta_train(recipe, quiet=True)
    assert not (tmp_path / "fine" / "checkpoints" / "last.pt").exists()
    recipe.init = str(tmp_path / "nothing-here")
    with pytest.raises(FsltoolError, match="nothing-here: no such run folder"):
        meta_train(recipe, quiet=True)


def test_a_pretraining_run_evaluates_and_exports_as_a_prototype_classifier(synthetic_file: Path, tmp_path: Path) -> None:
    pretrain(pretrain_recipe(synthetic_file, tmp_path / "pre", epochs=1), quiet=True)
    code, out, _ = run_cli("evaluate", str(tmp_path / "pre"), "--shape", "5w1s5q")
    assert code == 0 and "accuracy" in out
    code, out, _ = run_cli("evaluate", str(tmp_path / "pre"), "--shape", "5w1s5q", "--json", "-")
    budget = json.loads(out)["training"]
    assert (budget["stage"], budget["epochs"], budget["splits"]) == ("pretrain", 1, ["train"]) and budget["steps"] > 0
    code, out, err = run_cli("export", str(tmp_path / "pre"), "--out", str(tmp_path / "export"), "--verify-episodes", "5", "-q")
    assert code == 0, err
    assert (tmp_path / "export" / "classifier.onnx").is_file() and "prediction agreement 100.00%" in out
    code, out, err = run_cli("info", str(tmp_path / "pre"), "--json")
    assert code == 0, err
    described = json.loads(out)
    assert (described["stage"], described["epochs_trained"], described["epochs_planned"], described["status"]) == ("pretrain", 1, 1, "finished")
    assert described["latest_logged_step"] == described["steps_trained"] and "resume" not in described


def test_pretraining_input_errors_are_one_line(synthetic_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match="'pretrain.epochs' must be at least 1"):
        pretrain(quick_recipe(synthetic_file, tmp_path / "a"), quiet=True)
    with pytest.raises(FsltoolError, match="'pretrain.batch_size': 100000 is more than the .* images of train"):
        pretrain(pretrain_recipe(synthetic_file, tmp_path / "b", batch_size=100000), quiet=True)
    with pytest.raises(FsltoolError, match="'pretrain.micro_batches': 3 does not divide pretrain.batch_size 32"):
        pretrain_recipe(synthetic_file, tmp_path / "c", micro_batches=3)
    with pytest.raises(FsltoolError, match="'pretrain.head': 'mlp' is not one of linear, cosine"):
        pretrain_recipe(synthetic_file, tmp_path / "d", head="mlp")
    with pytest.raises(FsltoolError, match="unknown split 'extra'"):
        pretrain(pretrain_recipe(synthetic_file, tmp_path / "e", splits=["train", "extra"]), quiet=True)
    code, _, err = run_cli("pretrain", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err and len(err.strip().splitlines()) == 1


def test_training_on_train_and_val_draws_from_both_splits(synthetic_file: Path) -> None:
    with FewShotData(synthetic_file) as data:
        sampler = data.sampler(["train", "val"], EpisodeShape(5, 1, 1), torch.Generator().manual_seed(0))
        drawn = torch.cat([torch.cat(sampler.sample()) for _ in range(200)])
        owner = {int(i): name for name in ("train", "val") for c in data.splits[name]
                 for i in range(data.class_start[c], data.class_start[c] + data.class_count[c])}
        assert {owner[int(i)] for i in drawn} == {"train", "val"}
        with pytest.raises(FsltoolError, match="names a split twice"):
            data.sampler(["train", "train"], EpisodeShape(5, 1, 1), torch.Generator())


def test_evaluate_scores_a_run_under_another_classifier_of_its_backbone(synthetic_file: Path, tmp_path: Path) -> None:
    pretrain(pretrain_recipe(synthetic_file, tmp_path / "pre", epochs=1), quiet=True)
    code, out, err = run_cli("evaluate", str(tmp_path / "pre"), "--shape", "5w1s5q", "--method", "baseline++", "--episodes", "10",
                             "--json", "-")
    assert code == 0, err
    assert json.loads(out)["method"] == "baseline++"
    for head in ("svm", "ridge"):  # their learned score scale is fixed at 1 for this (classifier_only_options)
        code, out, err = run_cli("evaluate", str(tmp_path / "pre"), "--shape", "5w1s5q", "--method", head, "--episodes", "10",
                                 "--json", "-")
        assert code == 0, err
        assert json.loads(out)["method"] == head and json.loads(out)["accuracy"] > 20
    code, _, err = run_cli("evaluate", str(tmp_path / "pre"), "--shape", "5w1s5q", "--method", "snail")
    assert code == 2 and "trained layers of its own" in err and len(err.strip().splitlines()) == 1


def test_time_to_accuracy_puts_a_fine_tuning_run_after_its_pretraining(synthetic_file: Path, tmp_path: Path) -> None:
    from fsltool.plots import time_curve

    pretrain(pretrain_recipe(synthetic_file, tmp_path / "pre", epochs=2), quiet=True)
    recipe = quick_recipe(synthetic_file, tmp_path / "fine", episodes=4)
    recipe.init = str(tmp_path / "pre")
    meta_train(recipe, quiet=True)
    pre, fine = time_curve(tmp_path / "pre"), time_curve(tmp_path / "fine")
    assert len(pre.minutes) == 2 and fine.before is not None
    own = [row["elapsed"] / 60 for row in map(json.loads, (tmp_path / "fine" / "metrics.jsonl").read_text().splitlines()) if row["phase"] == "val"]
    assert fine.minutes.tolist() == pytest.approx([pre.minutes[-1] + m for m in own])
    code, _, err = run_cli("plot", "time", str(tmp_path / "pre"), str(tmp_path / "fine"), "--out", str(tmp_path / "time.png"))
    assert code == 0, err
    assert (tmp_path / "time.png").stat().st_size > 10_000
    code, _, err = run_cli("plot", "curves", str(tmp_path / "pre"), "--out", str(tmp_path / "curves.png"))
    assert code == 0, err


def test_time_to_accuracy_counts_a_checkpoint_init_up_to_that_checkpoint(synthetic_file: Path, tmp_path: Path) -> None:
    """A run started from a checkpoint file (not a run folder) begins when that checkpoint was written: the
    earlier run's curve is cut there, and still counted if that run's folder is gone."""
    from fsltool.checkpoint import load_checkpoint, save_checkpoint
    from fsltool.plots import time_curve

    meta_train(quick_recipe(synthetic_file, tmp_path / "first", episodes=8), quiet=True)
    checkpoint = tmp_path / "first" / "checkpoints" / "episode-00000004.pt"
    seconds = load_checkpoint(checkpoint)["elapsed"]
    recipe = quick_recipe(synthetic_file, tmp_path / "then", episodes=4)
    recipe.init = str(checkpoint)
    meta_train(recipe, quiet=True)
    then = time_curve(tmp_path / "then")
    assert then.start == pytest.approx(seconds / 60) and then.before is not None
    assert then.before.minutes.tolist() == pytest.approx([time_curve(tmp_path / "first").minutes[0]])  # validated at 4 and 8: cut at 4
    own = [row["elapsed"] / 60 for row in map(json.loads, (tmp_path / "then" / "metrics.jsonl").read_text().splitlines()) if row["phase"] == "val"]
    assert then.minutes.tolist() == pytest.approx([seconds / 60 + m for m in own])
    code, _, err = run_cli("plot", "time", str(tmp_path / "then"), "--out", str(tmp_path / "time.png"))
    assert code == 0, err

    kept = tmp_path / "kept.pt"
    kept.write_bytes(checkpoint.read_bytes())
    (tmp_path / "first").rename(tmp_path / "elsewhere")  # the run that wrote it is gone: no curve, the same start
    recipe.init, recipe.output = str(kept), str(tmp_path / "again")
    meta_train(recipe, quiet=True)
    again = time_curve(tmp_path / "again")
    assert again.before is None and again.start == pytest.approx(seconds / 60)

    (tmp_path / "elsewhere").rename(tmp_path / "first")  # back, but the checkpoint now precedes every validation
    state = load_checkpoint(kept)
    save_checkpoint(kept, {**state, "elapsed": 0.0})
    recipe.output = str(tmp_path / "early")
    meta_train(recipe, quiet=True)
    early = time_curve(tmp_path / "early")
    assert early.before is None and early.start == 0.0


def test_multistep_schedule_decays_at_each_milestone_epoch(synthetic_file: Path, tmp_path: Path) -> None:
    recipe = pretrain_recipe(synthetic_file, tmp_path / "run", epochs=3, lr_schedule="multistep", lr_milestones=[1, 2], lr_gamma=0.1)
    pretrain(recipe, quiet=True)
    rows = [row for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if row["phase"] == "train"]
    by_epoch = {int(-(-row["epoch"] // 1)): row["lr"] for row in rows}  # the lr in force at each epoch's last row
    assert by_epoch[1] == pytest.approx(0.1 * 0.1) and by_epoch[2] == pytest.approx(0.1 * 0.01) and by_epoch[3] == pytest.approx(0.1 * 0.01)
    factored = pretrain_recipe(synthetic_file, tmp_path / "factored", epochs=3, lr_schedule="multistep", lr_milestones=[1, 2],
                               lr_factors=[0.06, 0.012])  # MetaOptNet's kind: a factor per milestone, not powers of one
    pretrain(factored, quiet=True)
    rows = [row for row in map(json.loads, (tmp_path / "factored" / "metrics.jsonl").read_text().splitlines()) if row["phase"] == "train"]
    by_epoch = {int(-(-row["epoch"] // 1)): row["lr"] for row in rows}
    assert by_epoch[1] == pytest.approx(0.1 * 0.06) and by_epoch[2] == pytest.approx(0.1 * 0.012) and by_epoch[3] == pytest.approx(0.1 * 0.012)
    with pytest.raises(FsltoolError, match=r"'pretrain.lr_milestones' must list increasing positive counts"):
        pretrain_recipe(synthetic_file, tmp_path / "x", lr_schedule="multistep", lr_milestones=[2, 1])
    with pytest.raises(FsltoolError, match=r"'pretrain.splits' must name at least one split"):
        pretrain_recipe(synthetic_file, tmp_path / "y", splits=[])


def test_init_starts_maml_per_step_batch_norm_from_the_pretrained_backbone(synthetic_file: Path, tmp_path: Path) -> None:
    """MAML++'s per-step BatchNorm layers are copies of the backbone's: with init they copy the loaded backbone's,
    not the freshly built one's (they were left at scale 1, shift 0)."""
    from fsltool.checkpoint import load_trained
    from fsltool.methods.adaptation import batch_norm_layers

    pretrain(pretrain_recipe(synthetic_file, tmp_path / "pre", epochs=1), quiet=True)
    recipe = quick_recipe(synthetic_file, tmp_path / "fine", method="maml", episodes=1, lr=1e-12, shape="5w1s2q",
                          method_options={"way": 5, "inner_steps": 2, "test_inner_steps": 2, "per_step_bn": True})
    recipe.init = str(tmp_path / "pre")
    meta_train(recipe, quiet=True)
    method = load_trained(tmp_path / "fine").method
    pretrained = batch_norm_layers(load_trained(tmp_path / "pre").method.backbone.features)
    assert any(not torch.allclose(layer.weight, torch.ones_like(layer.weight)) for layer in pretrained)
    for copied, loaded in zip(method.step_norms[0], pretrained, strict=True):
        torch.testing.assert_close(copied.weight, loaded.weight, rtol=0, atol=1e-9)
        torch.testing.assert_close(copied.bias, loaded.bias, rtol=0, atol=1e-9)


def relation_run(data: Path, output: Path, **train: object) -> Recipe:
    recipe = quick_recipe(data, output, method="relationnet", backbone="conv4-relation", shape="5w1s2q", **train)
    validate(recipe)
    return recipe


def maml_plus_plus_run(data: Path, output: Path, **train: object) -> Recipe:
    options = {"way": 5, "inner_steps": 2, "test_inner_steps": 2, "multi_step_loss": True, "multi_step_loss_epochs": 6,
               "per_step_bn": True, "learn_inner_lr": True, "first_order_until": 3}
    recipe = quick_recipe(data, output, method="maml", backbone="conv4-strided", method_options=options, shape="5w1s1q", **train)
    validate(recipe)
    return recipe


@pytest.mark.parametrize(("make_run", "backbone_options"), [(relation_run, {"freeze_statistics": True}), (maml_plus_plus_run, {})],
                         ids=["relationnet", "maml++"])
def test_init_scope_model_starts_every_layer_and_statistic_from_a_run_of_the_method(
        make_run, backbone_options: dict[str, object], synthetic_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """init_scope: model takes the method's own layers (a relation module; MAML++'s learned rates, per-step
    BatchNorm and meta-step counter) and the BatchNorm running statistics too, where init_scope: backbone starts
    them fresh; Relation Networks' under a backbone option a branch may not change (freeze_statistics)."""
    from fsltool.checkpoint import build_model, model_config
    from fsltool.train import start_weights

    meta_train(make_run(synthetic_file, tmp_path / "source", episodes=4), quiet=True)
    source = load_checkpoint(tmp_path / "source" / "checkpoints" / "last.pt")["model"]
    recipe = make_run(synthetic_file, tmp_path / "fine", episodes=1)
    recipe.init, recipe.backbone_options = str(tmp_path / "source" / "checkpoints" / "last.pt"), backbone_options
    with FewShotData(synthetic_file) as data:
        def started(scope: str) -> dict[str, torch.Tensor]:
            recipe.init_scope = scope
            torch.manual_seed(recipe.seed)
            method = build_model(model_config(recipe, data.image_shape, data.mean, data.std, data.provenance))
            start_weights(method, recipe, data.image_shape)
            return method.state_dict()
        whole, features_only = started("model"), started("backbone")
    assert whole.keys() == source.keys()
    for key, value in source.items():
        assert torch.equal(whole[key], value), key
    own = [key for key in source if not key.startswith("backbone.") and "tracked" not in key]
    assert own and all(not torch.equal(features_only[key], source[key]) for key in own)
    recipe.init_scope = "model"
    meta_train(recipe, quiet=True)  # the run trains on from there
    budget = training_budget(load_trained(tmp_path / "fine", "last"))
    assert (budget["episodes"], budget["init"], budget["init_scope"]) == (1, recipe.init, "model")


def test_init_scope_model_refuses_another_method_or_other_layers_naming_them(synthetic_file: Path, tmp_path: Path) -> None:
    meta_train(relation_run(synthetic_file, tmp_path / "source", episodes=1), quiet=True)
    pretrain(pretrain_recipe(synthetic_file, tmp_path / "pre", epochs=1), quiet=True)
    recipe = relation_run(synthetic_file, tmp_path / "fine", episodes=1)
    recipe.init_scope, recipe.init = "model", str(tmp_path / "pre")
    recipe.backbone = "conv4"
    recipe.method = "protonet"
    with pytest.raises(FsltoolError, match=r"pre holds a pretraining run; init_scope: model takes every layer of a run of this recipe's method 'protonet'"):
        meta_train(recipe, quiet=True)
    recipe = relation_run(synthetic_file, tmp_path / "fine", episodes=1, method_options={"relation_hidden": 4})
    recipe.init_scope, recipe.init = "model", str(tmp_path / "source")
    with pytest.raises(FsltoolError, match=r"source: 'relation\..*' has shape \(.*\) there and \(.*\) in this recipe's model"):
        meta_train(recipe, quiet=True)
    assert not (tmp_path / "fine" / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(("scope", "init", "message"), [
    ("layers", "x", r"recipe key 'init_scope': 'layers' is not one of backbone, model"),
    ("model", "", r"recipe key 'init_scope' is model but 'init' names no run to take the model from"),
])
def test_init_scope_values_are_checked(synthetic_file: Path, tmp_path: Path, scope: str, init: str, message: str) -> None:
    recipe = quick_recipe(synthetic_file, tmp_path / "fine")
    recipe.init_scope, recipe.init = scope, init
    with pytest.raises(FsltoolError, match=message):
        validate(recipe)


@pytest.mark.parametrize("stage", ["pretrain", "meta-train"])
def test_the_dropblock_ramp_follows_the_optimizer_updates(stage: str, synthetic_file: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """backbone_options.drop_ramp: the update after k updates drops at drop_rate * min(1, k / ramp), in both loops."""
    from fsltool.models.backbones import DropBlock

    seen: list[float] = []
    forward = DropBlock.forward

    def recording(self: DropBlock, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            seen.append(self.rate)
        return forward(self, x)

    monkeypatch.setattr(DropBlock, "forward", recording)
    recipe = pretrain_recipe(synthetic_file, tmp_path / "run", epochs=1)
    recipe.backbone, recipe.backbone_options = "resnet12", {"widths": [4, 4, 4, 4], "drop_rate": 0.2, "drop_block_size": 1, "drop_ramp": 4}
    if stage == "pretrain":
        updates = pretrain(recipe, quiet=True).steps
    else:
        recipe.train.episodes = updates = 6
        meta_train(recipe, quiet=True)
    assert seen == sorted(seen)
    assert sorted(set(seen)) == pytest.approx(sorted({0.2 * min(1.0, done / 4) for done in range(updates)}))
