from __future__ import annotations

from pathlib import Path

import pytest

from fsltool.errors import FsltoolError
from fsltool.recipe import dump_recipe, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_merge_and_overrides(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "data: d.h5\nmethod: protonet\ntrain:\n  lr: 0.001\n  episodes: 100\n")
    recipe = load_recipe(write(tmp_path / "r.yaml", "base: base.yaml\noutput: out\ntrain:\n  episodes: 50\n"),
                         ["train.lr=0.01", "seed=3", "validation.shape=5w5s15q"])
    assert recipe.train.lr == 0.01 and recipe.train.episodes == 50 and recipe.seed == 3
    assert recipe.validation.shape == "5w5s15q" and recipe.data == "d.h5"
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert "episodes: 50" in dump_recipe(recipe)


def test_a_files_method_options_replace_its_bases_while_overrides_set_one_key(tmp_path: Path) -> None:
    """A method's options are one set: a child recipe that names some gets exactly those, not a mix with its base's."""
    write(tmp_path / "base.yaml", "data: d.h5\nmethod_options:\n  distance: cosine\n  learn_scale: true\n"
                                  "backbone_options:\n  hidden: 32\n")
    child = write(tmp_path / "r.yaml", "base: base.yaml\noutput: out\nmethod_options:\n  distance: euclidean\n"
                                       "backbone_options: {}\n")
    assert load_recipe(child, []).method_options == {"distance": "euclidean"}
    assert load_recipe(child, []).backbone_options == {}
    assert load_recipe(child, ["method_options.learn_scale=true"]).method_options == {"distance": "euclidean", "learn_scale": True}
    assert load_recipe(tmp_path / "base.yaml", ["output=o", "method_options.distance=euclidean"]).method_options == {
        "distance": "euclidean", "learn_scale": True}


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("data: d\noutput: o\ntrain:\n  episods: 3\n", [], r"unknown recipe key 'train.episods' \(did you mean 'train.episodes'\?\)"),
        ("data: d\noutput: o\nmethd: protonet\n", [], r"did you mean 'method'"),
        ("data: d\noutput: o\n", ["train.lr=fast"], r"recipe key 'train.lr': expected float, got 'fast'"),
        ("data: d\noutput: o\ntrain:\n  episodes: 1.5\n", [], r"'train.episodes': expected int"),
        ("data: d\noutput: o\ntrain:\n  episodes: 0\n", [], r"'train.episodes' must be positive"),
        ("data: d\noutput: o\ntrain:\n  shape: 5way\n", [], r"'train.shape'"),
        ("data: d\noutput: o\n", ["train.shape=5w5-1s"], r"recipe key 'train.shape': episode shape '5w5-1s': the range of shots must rise"),
        ("data: d\noutput: o\n", ["validation.shape=5w1-5s"], r"recipe key 'validation.shape': episode shape '5w1-5s' is not of the form"),
        ("data: d\noutput: o\n", ["train.lr_schedule=exponential"], r"'train.lr_schedule': 'exponential' is not one of step, multistep, linear, cosine"),
        ("data: d\noutput: o\n", ["train.warmup=-1"], r"'train.warmup' must be >= 0, got -1"),
        ("data: d\noutput: o\ntrain: {lr_schedule: multistep, lr_milestones: [10, 20], lr_factors: [0.1]}\n", [],
         r"'train.lr_factors' must list one positive factor per lr_milestones entry with lr_schedule multistep, got \[0.1\]"),
        ("data: d\noutput: o\ntrain: {lr_schedule: multistep, lr_milestones: [10], lr_factors: [-0.1]}\n", [], r"'train.lr_factors' must list"),
        ("data: d\noutput: o\ntrain: {lr_schedule: cosine, lr_factors: [0.1]}\n", [], r"'train.lr_factors' must list"),
        ("data: d\noutput: o\ntrain: {lr_schedule: multistep, lr_milestones: [10], lr_factors: [fast]}\n", [], r"'train.lr_factors'"),
        ("data: d\noutput: o\nmethod: protonett\n", [], r"unknown method 'protonett'"),
        ("data: d\noutput: o\nbackbone: conv5\n", [], r"unknown backbone 'conv5' \(did you mean 'conv4'\?\)"),
        ("data: d\noutput: o\nmethod_options:\n  metric: cosine\n", [], r"method 'protonet' has no option 'metric'"),
        ("output: o\n", [], r"recipe key 'data' is required"),
        ("data: d\noutput: o\ntrain: 3\n", [], r"recipe key 'train': expected a mapping"),
        ("data: [unclosed\n", [], r"invalid YAML"),
        ("- a list\n", [], r"must be a YAML mapping"),
        ("data: d\noutput: o\n", ["noequals"], r"not of the form key=value"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        load_recipe(write(tmp_path / "r.yaml", text), overrides)


def test_missing_recipe_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match="nope.yaml: cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_unsafe_yaml_is_not_executed(tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match="invalid YAML"):
        load_recipe(write(tmp_path / "r.yaml", "data: !!python/object/apply:os.system ['echo hacked']\noutput: o\n"))


SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if not p.name.endswith("-base.yaml"))


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe: Path) -> None:
    loaded = load_recipe(recipe)
    assert loaded.output and loaded.data


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "data: d\noutput: o\ntrain:\n  episodes: 5\n  lr: 0.1\n  episodes: 7\n")
    with pytest.raises(FsltoolError, match=r"r.yaml: invalid YAML \(key 'episodes' is given twice \(lines 4 and 6\)\)"):
        load_recipe(path)


def test_a_recipe_that_is_not_utf8_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"data: d\noutput: \xff\n")
    with pytest.raises(FsltoolError, match=r"r.yaml: recipe is not UTF-8 text \(byte 16 is 0xff\)"):
        load_recipe(path)


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=.nan", "'train.lr': nan is not a finite number"),
    ("train.weight_decay=-.inf", "'train.weight_decay': -inf is not a finite number"),
    ("method_options={attention_scale: .inf}", "'method_options.attention_scale': inf is not a finite number"),
])
def test_non_finite_numbers_are_refused(tmp_path: Path, override: str, message: str) -> None:
    path = write(tmp_path / "r.yaml", "data: d\noutput: o\nmethod: matchingnet\n")
    with pytest.raises(FsltoolError, match=message):
        load_recipe(path, [override])


@pytest.mark.parametrize(("setting", "changes"), [
    ("20w1s", {"head_init": "prototypes"}),
    ("20w5s", {"head_init": "prototypes", "inner_lr": 0.1}),
])
def test_maml_plus_plus_from_protonet_starts_from_the_protonet_recipes_run_with_prototype_heads(
        setting: str, changes: dict[str, object]) -> None:
    """Static: init names omniglot/protonet-20w1s's output with the same backbone (or init would refuse it), and the
    recipe is maml++-pretrained-<setting>'s with only the listed method options changed."""
    child = load_recipe(REPO / "recipes" / "omniglot" / f"maml++-from-protonet-{setting}.yaml")
    protonet = load_recipe(REPO / "recipes" / "omniglot" / "protonet-20w1s.yaml")
    base = load_recipe(REPO / "recipes" / "omniglot" / f"maml++-pretrained-{setting}.yaml")
    assert child.init == protonet.output and (child.backbone, child.backbone_options) == (protonet.backbone, protonet.backbone_options)
    assert child.method_options == {**base.method_options, **changes}
    assert (child.train, child.validation, child.test_shape) == (base.train, base.validation, base.test_shape)
