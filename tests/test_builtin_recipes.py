"""Built-in recipes: discoverable by name, copied out as one self-contained file, checked without training,
and shipped inside the wheel."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from fsltool.builtin_recipes import find_recipe, init_path, list_recipes, list_starting_points, recipe_path
from fsltool.errors import FsltoolError
from fsltool.recipe import load_recipe
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


invoke = run_cli


def test_list_names_every_recipe_but_the_bases() -> None:
    on_disk = {p.relative_to(REPO / "recipes").with_suffix("").as_posix() for p in (REPO / "recipes").glob("*/*.yaml")}
    listed = {r.name for r in list_recipes()}
    assert listed == {name for name in on_disk if not name.endswith("-base")}
    assert "omniglot/protonet-5w1s" in listed and all(r.summary for r in list_recipes())
    code, out, _ = invoke("recipes", "list", "--json")
    assert code == 0 and {row["name"] for row in json.loads(out)} == listed
    code, out, err = invoke("recipes", "list")  # the table is the result: on stdout
    assert code == 0 and "omniglot/protonet-5w1s" in out and not err
    assert all(path.name in out for path in list_starting_points())  # what a recipe's init may name


def test_copy_is_self_contained_and_equal_to_the_original(tmp_path: Path) -> None:
    code, _, err = invoke("recipes", "copy", "omniglot/relationnet-5w1s", str(tmp_path))
    assert code == 0, err
    copied = tmp_path / "relationnet-5w1s.yaml"
    assert "base:" not in copied.read_text() and "Sung et al. 2018" in copied.read_text()  # the base's comments came too
    assert load_recipe(copied) == load_recipe(REPO / "recipes/omniglot/relationnet-5w1s.yaml")

    before = copied.read_text()
    copied.write_text(before + "# my edit\n")
    code, _, err = invoke("recipes", "copy", "omniglot/relationnet-5w1s", str(copied))
    assert code == 2 and "already exists" in err and copied.read_text().endswith("# my edit\n")  # nothing lost
    assert invoke("recipes", "copy", "omniglot/relationnet-5w1s", str(copied), "--force")[0] == 0
    assert copied.read_text() == before


def test_unknown_names_suggest_the_nearest() -> None:
    with pytest.raises(FsltoolError, match=r"did you mean 'omniglot/protonet-5w1s'"):
        find_recipe("omniglot/protonet-5w1")
    with pytest.raises(FsltoolError, match=r"nope\.yaml: no such recipe file, nor a built-in recipe"):
        recipe_path("nope.yaml")
    assert recipe_path("synthetic/protonet-quick") == REPO / "recipes/synthetic/protonet-quick.yaml"


def test_check_by_name_validates_against_the_data(synthetic_file: Path) -> None:
    shapes = ["validation.shape=5w1s5q", "test_shape=5w1s5q", "train.shape=10w1s5q"]
    code, _, err = invoke("recipes", "check", "synthetic/protonet-quick", f"data={synthetic_file}", *shapes)
    assert code == 0 and "recipe is valid" in err
    code, _, err = invoke("recipes", "check", "synthetic/protonet-quick", f"data={synthetic_file}", *shapes[:2], "train.shape=500w1s5q")
    assert code == 2 and err.count("\n") == 1 and "500" in err
    # the model is built as training builds it: a bad method or backbone option fails the check, not the run
    for bad, message in (("method_options.distance=bogus", "method_options.distance must be one of euclidean, cosine, got 'bogus'"),
                         ("backbone_options.hidden=-3", "backbone_options.hidden must be a positive integer, got -3")):
        code, _, err = invoke("recipes", "check", "synthetic/protonet-quick", f"data={synthetic_file}", *shapes, bad)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_the_wheel_ships_every_recipe_folder() -> None:
    """pyproject lists packages by hand (the recipes come from another folder): a new recipe folder or
    sub-package must be added there, or it silently goes missing from installs."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p.parent.relative_to(REPO / "recipes").as_posix() for p in (REPO / "recipes").glob("*/*.yaml")}
    assert {f"fsltool.recipes.{folder}" for folder in folders} <= set(config["package-data"])
    assert {f"fsltool.recipes.{folder}" for folder in folders} <= set(config["packages"])
    assert all(config["package-dir"].get(f"fsltool.recipes.{folder}") == f"recipes/{folder}" for folder in folders)
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "fsltool").rglob("__init__.py")}
    assert packages <= set(config["packages"])
    # the checkpoints recipes start from (init: NAME.pt) ship too
    assert "fsltool.inits" in config["packages"] and config["package-dir"]["fsltool.inits"] == "results/init"
    assert config["package-data"]["fsltool.inits"] == ["*.pt"]


@pytest.mark.parametrize("recipe", list_recipes(), ids=lambda r: r.name)
def test_every_builtin_recipe_loads_and_validates(recipe) -> None:
    """Static checks only (keys, types, shapes, method and backbone options): no data file is needed."""
    loaded = load_recipe(recipe.path)
    assert loaded.output.startswith("runs/") and loaded.data.startswith("data/")


def shipped_inits() -> list:
    """The built-in recipes whose init is a checkpoint that ships with fsltool (not a run folder to make)."""
    shipped = {path.name for path in list_starting_points()}
    return [recipe for recipe in list_recipes() if load_recipe(recipe.path).init in shipped]


def test_some_recipes_start_from_a_shipped_checkpoint() -> None:
    assert {recipe.name for recipe in shipped_inits()} >= {"omniglot/reptile-from-5way-20w1s", "omniglot/reptile-from-5way-20w5s"}
    assert all(path.parent == REPO / "results" / "init" for path in list_starting_points())  # in a clone: committed there


@pytest.mark.parametrize("recipe", shipped_inits(), ids=lambda r: r.name)
def test_a_shipped_init_checkpoint_loads_into_the_recipes_network(recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint is found by name from any folder and fits the recipe's backbone: its feature layers arrive
    unchanged, while the method's own head (another way here) starts fresh."""
    from fsltool.checkpoint import build_model, load_checkpoint, model_config
    from fsltool.train import start_weights

    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(recipe.path)
    saved = load_checkpoint(init_path(loaded.init))
    shape = tuple(saved["model_config"]["image_shape"])
    method = build_model(model_config(loaded, shape, saved["model_config"]["mean"], saved["model_config"]["std"], {}))
    fresh = {key: value.clone() for key, value in method.state_dict().items()}
    start_weights(method, loaded, shape)
    features = {key: value for key, value in saved["model"].items() if key.startswith("backbone.features.")}
    assert features and all(torch.equal(method.state_dict()[key], value) for key, value in features.items())
    assert any(not torch.equal(fresh[key], features[key]) for key in features)
    head = [key for key in fresh if not key.startswith("backbone.")]
    assert head and all(torch.equal(method.state_dict()[key], fresh[key]) for key in head)


def test_init_names_a_path_first_then_a_shipped_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = list_starting_points()[0]
    monkeypatch.chdir(tmp_path)
    assert init_path(shipped.name) == shipped and init_path(shipped.stem) == shipped
    (tmp_path / shipped.name).write_bytes(b"mine")  # a file of that name here is the user's: it wins
    assert init_path(shipped.name) == Path(shipped.name)
    with pytest.raises(FsltoolError, match=rf"^sub/{shipped.name}: no such run folder or checkpoint"):
        init_path(f"sub/{shipped.name}")  # a path is never taken for a shipped name
    with pytest.raises(FsltoolError, match=rf"^nowhere.pt: no such run folder or checkpoint, nor a checkpoint that ships with fsltool \(shipped: .*{shipped.name}"):
        init_path("nowhere.pt")


def test_info_describes_a_shipped_checkpoint_by_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = list_starting_points()[0]
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke("info", shipped.stem, "--json")
    assert code == 0, err
    details = json.loads(out)
    assert details["kind"] == "checkpoint" and Path(details["path"]) == shipped
    code, _, err = invoke("info", f"sub/{shipped.name}")
    assert code == 2 and err.strip() == f"error: sub/{shipped.name}: no such file or folder"


def test_check_loads_the_starting_weights(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`recipes check` fails where meta-train would, before any training: an init that is not there, or whose
    network does not fit; a built-in recipe's shipped init is found from any folder."""
    monkeypatch.chdir(tmp_path)
    shapes = ("validation.shape=5w1s5q", "test_shape=5w1s5q")
    code, _, err = invoke("recipes", "check", "omniglot/reptile-from-5way-20w1s", f"data={synthetic_file}", "train.shape=20w1s5q", *shapes)
    assert code == 0, err
    for bad, message in (("init=nowhere.pt", "nowhere.pt: no such run folder or checkpoint"),
                         ("init=reptile-5w5s-100k-episode-30000.pt", "has backbone 'conv4-strided'")):
        code, _, err = invoke("recipes", "check", "synthetic/protonet-quick", f"data={synthetic_file}", *shapes, bad)
        assert code == 2 and err.count("\n") == 1 and message in err, err
