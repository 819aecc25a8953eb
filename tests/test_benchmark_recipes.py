"""The natural-image benchmark recipes (miniImageNet, tieredImageNet, CIFAR-FS, FC100, CUB): each builds its model
at its data's image size (RGB, 84 or 32 px) and takes one training step on a tiny random episode of its training
way. The data files are not needed (nor on the development machines): images are random, shot and query are
small, and MAML's and Reptile's inner loops are shortened, so the whole file stays cheap on 2 CPU cores."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fsltool.checkpoint import build_model
from fsltool.data.augment import augment_episode, episode_generator
from fsltool.data.episodes import Episode, EpisodeShape, episode_labels
from fsltool.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = {"miniimagenet": 84, "tieredimagenet": 84, "cub": 84, "cifarfs": 32, "fc100": 32}
RECIPES = sorted(p for folder in IMAGE_SIZE for p in (REPO / "recipes" / folder).glob("*.yaml") if not p.stem.endswith("-base"))
# Shortened for the test only: the step's code path is the same with 1 inner step as with the recipe's 5-19.
CHEAP_OPTIONS = {"inner_steps": 1, "test_inner_steps": 1}
# Recipes that differ only in what they validate and test on (protonet-resnet12-5w1s / -5w5s share one training;
# fomaml's 5w1s / 5w5s differ in meta-batch only) take the step once.
STEPPED: set[str] = set()


def test_every_benchmark_folder_has_recipes() -> None:
    folders = {p.parent.name for p in RECIPES}
    assert folders == set(IMAGE_SIZE)
    names = {f"{p.parent.name}/{p.stem}" for p in RECIPES}
    methods = ("protonet", "matchingnet", "relationnet", "maml", "fomaml", "reptile", "snail", "mann")
    assert {f"miniimagenet/{m}-5w{s}s" for m in methods for s in (1, 5)} <= names
    assert {f"miniimagenet/{m}-resnet12-5w{s}s" for m in ("protonet", "fomaml", "reptile") for s in (1, 5)} <= names
    assert {f"{folder}/protonet-resnet12-5w{s}s" for folder in IMAGE_SIZE for s in (1, 5)} <= names
    assert {f"{folder}/protonet-resnet12-metaoptnet" for folder in ("miniimagenet", "tieredimagenet", "cifarfs", "fc100")} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_builds_and_takes_one_training_step(path: Path) -> None:
    recipe = load_recipe(path)
    assert Path(recipe.data).name.endswith(".h5") and recipe.data.startswith("data/")
    for text in (recipe.validation.shape, recipe.test_shape):  # what the benchmark prepare commands store
        assert text in ("5w1s15q", "5w5s15q"), f"{path.name}: {text} is not stored by fsltool prepare <benchmark>"
    if "pretrain" in path.stem:  # transfer-learning pairs: run end to end by tests/test_transfer_recipes.py
        assert recipe.backbone == "resnet12" and (recipe.pretrain.epochs > 0 or recipe.init)
        return
    if "resnet12" in path.stem or path.parent.name != "miniimagenet":
        assert recipe.backbone == "resnet12" and recipe.train.augment.kind in ("natural", "padded")
    size = IMAGE_SIZE[path.parent.name]
    options = dict(recipe.method_options)
    options.update({key: value for key, value in CHEAP_OPTIONS.items() if key in options})
    if "inner_batch" in options:
        options["inner_batch"] = min(options["inner_batch"], 5)
    torch.manual_seed(0)
    method = build_model({
        "method": recipe.method, "method_options": options, "backbone": recipe.backbone,
        "backbone_options": dict(recipe.backbone_options), "image_shape": [3, size, size],
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
    })
    with torch.no_grad():
        embedding = method.eval().backbone(torch.rand(2, 3, size, size))
    assert embedding.shape[0] == 2 and torch.isfinite(embedding).all()
    if recipe.backbone == "resnet12":  # the global average, or the 640 maps flattened (MetaOptNet's 640x5x5 at 84 px)
        assert embedding.shape[1:] == ((640,) if recipe.backbone_options.get("pool", True) else (640 * (size // 16) ** 2,))

    # One training step on a tiny episode of the training way (shot and query kept small).
    train = EpisodeShape.parse(recipe.train.shape)
    key = repr((recipe.method, sorted(options.items()), recipe.backbone, sorted(recipe.backbone_options.items()), size,
                train.way, train.shot if recipe.method == "snail" else 0, recipe.train.augment))
    if key in STEPPED:
        return
    STEPPED.add(key)
    shape = EpisodeShape(train.way, 1, 1 if recipe.method not in ("reptile",) else 2)
    if recipe.method == "snail":  # the sequence length is fixed by the recipe: keep its shot
        shape = dataclasses.replace(shape, shot=train.shot)
    support_labels, query_labels = episode_labels(shape)
    episode = Episode(torch.rand(shape.way * shape.shot, 3, size, size), support_labels,
                      torch.rand(shape.way * shape.query, 3, size, size), query_labels, shape)
    if recipe.train.augment.kind != "none":
        episode = augment_episode(episode, recipe.train.augment, episode_generator(recipe.seed, 1, 0))
    method.train()
    parameters = [p for p in method.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in parameters]
    outputs = method.meta_step([episode])
    loss = torch.stack([output.loss for output in outputs]).mean()
    assert torch.isfinite(loss)
    scored = shape.way * shape.query if outputs[0].labels is None else len(outputs[0].labels)  # Reptile logs some queries
    assert outputs[0].scores.shape == (scored, shape.way)
    optimizer = torch.optim.SGD(parameters, lr=0.01)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, parameters)), "the step changed no parameter"
