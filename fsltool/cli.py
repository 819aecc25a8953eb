"""The command line: parse arguments, call the library, print with rich. No logic of its own."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fsltool import __version__
from fsltool.atomic import write_json
from fsltool.errors import FsltoolError

if TYPE_CHECKING:  # the commands import what they use when they run: `fsltool --help` stays fast
    from fsltool.checkpoint import TrainedModel
    from fsltool.data.episodes import EpisodeShape
    from fsltool.data.store import FewShotData
    from fsltool.evaluate import EvalResult, SupportCopies
    from fsltool.methods import Method

SHAPES_HELP = "comma-separated episode shapes to store, e.g. 5w1s,5w5s,20w1s,20w5s"

quiet_option = click.option("--quiet", "-q", is_flag=True, help="no progress bar or messages on stderr; results still on stdout")
json_option = click.option("--json", "as_json", is_flag=True, help="print the result as JSON on stdout (for scripts)")


def _echo_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


class FsltoolGroup(click.Group):
    """Turns FsltoolError into one red line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FsltoolError as error:
            from fsltool.console import console

            console.print(f"[bold red]{error.label}:[/] {error}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(error.exit_code)


@click.group(cls=FsltoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fsltool")
@click.option("--no-tuning", is_flag=True,
              help="leave glibc's allocator at its defaults (otherwise freed memory is kept for reuse: faster steps, memory held at its peak)")
def main(no_tuning: bool) -> None:
    """Few-shot classification by meta-learning: prepare -> meta-train -> evaluate -> export.

    Example: fsltool meta-train omniglot/protonet-5w1s
    """
    from fsltool.platform_tuning import tune_allocator

    if not no_tuning:
        tune_allocator()


# ---------------------------------------------------------------- prepare


def _stacked(*decorators: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click arguments and options given once for several commands, applied in the order they are listed."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


def _episode_options_with(shapes: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options every prepare source shares: the stored evaluation episodes (``shapes`` by default) and how the file
    is written."""
    return _stacked(
        click.option("--shapes", default=shapes, show_default=True, help=SHAPES_HELP),
        click.option("--query", default=15, show_default=True, help="query images per class in stored episodes"),
        click.option("--episodes", default=600, show_default=True, help="stored episodes per shape and split"),
        click.option("--episode-seed", default=0, show_default=True, help="seed of the stored episodes"),
        click.option("--episode-splits", default="val,test", show_default=True, help="splits to store episodes for"),
        click.option("--unknowns", is_flag=True,
                     help="also store unknown-class queries per episode (open-set evaluation: calibrate --reject-rate, evaluate --open-set)"),
        click.option("--skip-bad", is_flag=True, help="skip unreadable images (and report how many) instead of stopping"),
        click.option("--force", is_flag=True, help="replace OUT if it exists"),
        quiet_option,
        json_option,
    )


_episode_options = _episode_options_with("5w1s,5w5s,20w1s,20w5s")
# The benchmarks' standard protocol, 5-way 1- and 5-shot: their 16-class validation splits cannot store 20-way.
_benchmark_episode_options = _episode_options_with("5w1s,5w5s")
_benchmark_size_option = click.option("--size", default=84, show_default=True,
                                      help="resize to SIZE x SIZE (84 is the benchmark's standard)")
_ignore_other_classes_option = click.option(
    "--ignore-other-classes", is_flag=True,
    help="leave out class folders the split does not list (e.g. the rest of ImageNet) instead of stopping")


def _run_prepare(listing_factory: Callable[[], Any], out: str, shapes: str, query: int, episodes: int, episode_seed: int,
                 episode_splits: str, unknowns: bool, skip_bad: bool, force: bool, quiet: bool, as_json: bool) -> None:
    from fsltool.console import console
    from fsltool.data.episodes import EpisodeShape
    from fsltool.data.pack import EpisodePlan, pack

    if episodes < 1 or query < 1:
        raise FsltoolError("--episodes and --query must be at least 1")
    plan = EpisodePlan(
        shapes=tuple(EpisodeShape.parse(s, default_query=query) for s in shapes.split(",") if s.strip()),
        splits=tuple(s.strip() for s in episode_splits.split(",") if s.strip()),
        episodes=episodes,
        seed=episode_seed,
        unknowns=unknowns,
    )
    report = pack(listing_factory(), out, plan, skip_bad=skip_bad, overwrite=force, quiet=quiet or as_json)
    if as_json:
        _echo_json({"path": report.path, "images": report.images, "classes": report.classes,
                    "splits": report.split_classes, "skipped": report.skipped})
        return
    splits = ", ".join(f"{name} {count}" for name, count in report.split_classes.items())
    skipped = f"; skipped {len(report.skipped)} unreadable images" if report.skipped else ""
    if not quiet:
        console.print(f"wrote {report.path}: {report.images} images, {report.classes} classes ({splits}){skipped}")
    for path in report.skipped[:20]:
        console.print(f"  skipped {path}", highlight=False)


def _three_numbers(option: str, text: str, kind: type, example: str) -> tuple[Any, Any, Any]:
    """An option's train,val,test triple, e.g. ``--split-ratios 0.64,0.16,0.2``; anything else is a one-line error."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        numbers = "whole numbers" if kind is int else "numbers"
        raise FsltoolError(f"{option} {text!r}: expected three {numbers} (train,val,test) like {example}")
    return values  # type: ignore[return-value]


@main.group()
def prepare() -> None:
    """Pack a dataset into one HDF5 file with its class splits and stored evaluation episodes.

    Example: fsltool prepare omniglot ../shared/data/omniglot data/omniglot.h5
    """


@prepare.command("synthetic")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--classes", default=1200, show_default=True, help="number of glyph classes")
@click.option("--images-per-class", default=20, show_default=True)
@click.option("--size", default=28, show_default=True, help="image side in pixels")
@click.option("--seed", default=0, show_default=True, help="seed of the glyphs and of the class split")
@click.option("--jitter", default=1.5, show_default=True, help="per-instance variation (difficulty)")
@click.option("--colour/--grey", default=False, show_default=True, help="RGB glyphs in class ink colours on varied, noisy backgrounds")
@_episode_options
def prepare_synthetic(out: str, classes: int, images_per_class: int, size: int, seed: int, jitter: float, colour: bool,
                      **common: Any) -> None:
    """The embedded synthetic set: Omniglot-like procedural glyphs, generated here (no download).

    Example: fsltool prepare synthetic data/synthetic.h5 (the RGB demo set: add --colour --size 84)
    """
    from fsltool.data.sources.synthetic import synthetic

    _run_prepare(lambda: synthetic(classes=classes, images_per_class=images_per_class, size=size, seed=seed, jitter=jitter,
                                   colour=colour), out, **common)


@prepare.command("omniglot")
@click.argument("root", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--rotations/--no-rotations", default=True, show_default=True, help="add 90/180/270-degree rotations as classes")
@click.option("--size", default=28, show_default=True, help="resize to SIZE x SIZE (0 keeps 105x105)")
@click.option("--split", type=click.Choice(["vinyals", "lake", "random"]), default="vinyals", show_default=True,
              help="vinyals: Vinyals et al. 2016 (1028/172/423 characters from both zips); lake: Lake et al. 2015 "
                   "(train and validate on the 30 background alphabets, test on the 20 evaluation alphabets, 659 "
                   "characters; validation = the 5 background alphabets of the Vinyals validation split, 172 characters); "
                   "random: 1028/172/423 characters drawn at random with --split-seed, alphabets shared between "
                   "splits (the Relation Network and MAML reference code's kind of split)")
@click.option("--split-seed", default=1, show_default=True, help="the seed of --split random's shuffle")
@click.option("--split-counts", default=None, metavar="TRAIN,VAL,TEST",
              help="--split random's character counts (default 1028,172,423); the test characters depend only on the "
                   "seed and the test count. MAML's code: 1100,100,423; MAML++'s: 1150,50,423")
@click.option("--rotated-splits", default="train,val,test", show_default=True,
              help="the splits that get the rotated classes; train,val: upright test characters, as the Reptile reference code")
@click.option("--resample", type=click.Choice(["lanczos", "nearest"]), default="lanczos", show_default=True,
              help="lanczos: antialiased grey strokes; nearest: binary glyphs, the images the papers' reference code "
                   "trained on (Pillow resizes the 1-bit PNGs by nearest neighbour)")
@_episode_options
def prepare_omniglot(root: str, out: str, rotations: bool, size: int, split: str, split_seed: int, split_counts: str | None,
                     rotated_splits: str, resample: str, **common: Any) -> None:
    """Omniglot from images_background.zip / images_evaluation.zip (or their folders) in ROOT, split by the Vinyals,
    the Lake or a seeded random character protocol.

    The Lake protocol names no validation set and allows only the background alphabets for model selection
    (brendenlake/omniglot README), so whole background alphabets are held out for validation, as public
    Lake-protocol code does (e.g. tensorfreitas/Siamese-Networks-for-One-Shot-Learning, 6 of 30 at random): here
    the fixed five of the Vinyals validation split, so both protocols validate on the same 172 characters. The
    random protocol keeps the Vinyals counts but draws the characters with a seed, so alphabets are shared between
    the splits, as in the Relation Network and MAML reference code.

    Example: fsltool prepare omniglot ../shared/data/omniglot data/omniglot-lake.h5 --split lake
    """
    from fsltool.data.sources.omniglot import omniglot

    counts = None if split_counts is None else _three_numbers("--split-counts", split_counts, int, "1150,50,423")
    _run_prepare(lambda: omniglot(root=root, rotations=rotations, size=size or None, split=split, split_seed=split_seed,
                                  split_counts=counts, resample=resample, rotated_splits=tuple(rotated_splits.split(","))),
                 out, **common)


@prepare.command("folder")
@click.argument("root", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True)
@click.option("--size", type=int, default=None, help="resize to SIZE x SIZE (default: all images must share one size)")
@click.option("--split-ratios", default="0.64,0.16,0.2", show_default=True, help="train,val,test fractions of the classes")
@click.option("--split-seed", default=0, show_default=True)
@click.option("--split-lists", type=click.Path(), default=None, help="folder with train.txt, val.txt, test.txt class lists (wins over ratios)")
@_episode_options
def prepare_folder(root: str, out: str, channels: str, size: int | None, split_ratios: str, split_seed: int,
                   split_lists: str | None, **common: Any) -> None:
    """A class-per-folder image tree (the class is the leaf folder).

    Example: fsltool prepare folder my_images/ data/mine.h5 --size 84 --split-ratios 0.6,0.2,0.2
    """
    from fsltool.data.sources.folder import folder

    ratios = _three_numbers("--split-ratios", split_ratios, float, "0.64,0.16,0.2")
    _run_prepare(lambda: folder(root=root, channels=int(channels), size=size, split_ratios=ratios,
                                split_seed=split_seed, split_lists=split_lists), out, **common)


@prepare.command("csv")
@click.argument("images", type=click.Path())
@click.argument("splits", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True)
@click.option("--size", default=84, show_default=True, help="resize to SIZE x SIZE")
@_episode_options
def prepare_csv(images: str, splits: str, out: str, channels: str, size: int, **common: Any) -> None:
    """CSV split files (train.csv, val.csv, test.csv: filename,label) beside an image folder (miniImageNet layout).

    Example: fsltool prepare csv mini/images ../shared/data/miniimagenet/splits/ravi data/mini.h5
    """
    from fsltool.data.sources.csv_splits import csv_splits

    _run_prepare(lambda: csv_splits(images=images, splits=splits, channels=int(channels), size=size), out, **common)


@prepare.command("miniimagenet")
@click.argument("root", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--split", default="ravi", show_default=True, help="built-in class split (ravi: Ravi & Larochelle 2017, 64/16/20)")
@_benchmark_size_option
@_ignore_other_classes_option
@_benchmark_episode_options
def prepare_miniimagenet(root: str, out: str, split: str, size: int, ignore_other_classes: bool, **common: Any) -> None:
    """miniImageNet from ROOT/images beside the Ravi CSVs (ROOT/train.csv, val.csv, test.csv), or from a
    class-per-folder tree of its 600-image classes (ROOT/<synset>/*.jpg; a folder with more, a full ImageNet class,
    is refused); the built-in split, 84x84.

    Example: fsltool prepare miniimagenet mini-imagenet/ data/mini.h5
    """
    from fsltool.data.sources.benchmarks import miniimagenet

    _run_prepare(lambda: miniimagenet(root=root, split=split, size=size, ignore_other_classes=ignore_other_classes),
                 out, **common)


@prepare.command("tieredimagenet")
@click.argument("root", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@_benchmark_size_option
@_ignore_other_classes_option
@_benchmark_episode_options
def prepare_tieredimagenet(root: str, out: str, size: int, ignore_other_classes: bool, **common: Any) -> None:
    """tieredImageNet from a class-per-folder tree of synsets (ROOT/<synset>/*.jpg), Ren et al. 2018 split
    (351/97/160 classes of 20/6/8 superclasses), 84x84.

    Example: fsltool prepare tieredimagenet imagenet/train data/tiered.h5 --ignore-other-classes
    """
    from fsltool.data.sources.benchmarks import tieredimagenet

    _run_prepare(lambda: tieredimagenet(root=root, size=size, ignore_other_classes=ignore_other_classes), out, **common)


@prepare.command("cub")
@click.argument("root", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@_benchmark_size_option
@_benchmark_episode_options
def prepare_cub(root: str, out: str, size: int, **common: Any) -> None:
    """CUB-200-2011 from ROOT/CUB_200_2011/images/<NNN.Class_name>/*.jpg, Chen et al. 2019 split (100/50/50), 84x84.

    Example: fsltool prepare cub downloads/ data/cub.h5
    """
    from fsltool.data.sources.benchmarks import cub

    _run_prepare(lambda: cub(root=root, size=size), out, **common)


@prepare.command("cifar-fs")
@click.argument("root", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@_benchmark_episode_options
def prepare_cifar_fs(root: str, out: str, **common: Any) -> None:
    """CIFAR-FS from the CIFAR-100 python files (ROOT/cifar-100-python/), Bertinetto et al. 2019 split
    (64/16/20 classes, all 600 images each), 32x32.

    Example: fsltool prepare cifar-fs downloads/ data/cifar-fs.h5
    """
    from fsltool.data.sources.cifar100 import cifar_fs

    _run_prepare(lambda: cifar_fs(root=root), out, **common)


@prepare.command("fc100")
@click.argument("root", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@_benchmark_episode_options
def prepare_fc100(root: str, out: str, **common: Any) -> None:
    """FC100 from the CIFAR-100 python files (ROOT/cifar-100-python/), Oreshkin et al. 2018 split by superclass
    (12/4/4 superclasses = 60/20/20 classes, all 600 images each), 32x32.

    Example: fsltool prepare fc100 downloads/ data/fc100.h5
    """
    from fsltool.data.sources.cifar100 import fc100

    _run_prepare(lambda: fc100(root=root), out, **common)


@prepare.command("unknowns")
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="write the result here (default: replace DATA)")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@quiet_option
@json_option
def prepare_unknowns(data: str, out: str | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Add unknown-class queries to every stored episode set of a DATA file that has none: per episode, as many
    queries as it has, from as many classes of its split outside the episode (seeded by the episode seed, so they
    equal those prepare --unknowns stores). A new file replaces DATA (or is written to OUT) by one rename.

    Example: fsltool prepare unknowns data/omniglot.h5 --out data/omniglot-open.h5
    """
    from fsltool.data.unknowns import add_unknowns

    report = add_unknowns(data, out, force=force)
    if as_json:
        _echo_json({"path": str(report.path), "added": report.added, "present": report.present})
    elif not quiet:
        from fsltool.console import console

        console.print(f"wrote {report.path}: unknown-class queries added to {len(report.added)} episode sets"
                      f"{f', {len(report.present)} had them already' if report.present else ''}", highlight=False)


# ---------------------------------------------------------------- meta-train and recipes


def _complete_recipe(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion: built-in recipe names, then files as usual."""
    from click.shell_completion import CompletionItem

    from fsltool.builtin_recipes import list_recipes

    names = [CompletionItem(r.name) for r in list_recipes() if r.name.startswith(incomplete)]
    return names + [CompletionItem(incomplete, type="file")]


def _load_recipe(recipe: str, overrides: tuple[str, ...]) -> Any:
    from fsltool.builtin_recipes import recipe_path
    from fsltool.recipe import load_recipe

    return load_recipe(recipe_path(recipe), overrides)


def _check_recipe(recipe: str, loaded: Any, stage: str = "meta-train") -> None:
    from fsltool.console import console
    from fsltool.recipe import check_data

    check_data(loaded, stage)
    console.print(f"{recipe}: recipe is valid (method {loaded.method}, data {loaded.data})", highlight=False)


# The arguments of the commands that train a run from a recipe (meta-train, pretrain).
_training_run_options = _stacked(
    click.argument("recipe", shell_complete=_complete_recipe),
    click.argument("overrides", nargs=-1),
    click.option("--check", is_flag=True, help="validate the recipe (and its data file) without training"),
    click.option("--resume", is_flag=True, help="continue the run in the recipe's output folder from its last checkpoint"),
    click.option("--force", is_flag=True, help="start over in an output folder that already holds a run"),
    quiet_option,
    json_option,
)


@main.command("meta-train")
@_training_run_options
@click.option("--branch-from", "branch_from", metavar="CHECKPOINT",
              help="start a new run from another run's checkpoint (a run folder: its last.pt), with this recipe's "
                   "length and learning-rate schedule from there on; the rest of the recipe must be that run's")
def meta_train_command(recipe: str, overrides: tuple[str, ...], check: bool, resume: bool, force: bool, quiet: bool, as_json: bool,
                       branch_from: str | None) -> None:
    """Meta-train the method a RECIPE (a file, or a built-in name) names; KEY=VALUE arguments override its keys.

    Example: fsltool meta-train recipes/omniglot/protonet-5w1s.yaml train.episodes=2000 output=runs/try
    """
    loaded = _load_recipe(recipe, overrides)
    if check:
        _check_recipe(recipe, loaded)
        if branch_from is not None:
            from fsltool.console import console
            from fsltool.train import branch_point

            point = branch_point(branch_from, loaded)
            console.print(f"{point.checkpoint}: a valid branch point (episode {point.state['episode']:,} of "
                          f"{loaded.train.episodes:,})", highlight=False, soft_wrap=True)
        return
    from fsltool.train import meta_train

    result = meta_train(loaded, resume=resume, force=force, quiet=quiet or as_json, branch_from=branch_from)
    if not result.writer:  # under torchrun, rank 0 alone validated and wrote the run
        return
    if as_json:
        _echo_json({"run": str(result.run_dir), "episodes": result.episodes, "seconds": round(result.seconds, 1),
                    "best_validation": {"accuracy": result.best_accuracy, "ci95": result.best_ci95, "episode": result.best_episode},
                    "skipped_nonfinite": result.skipped_nonfinite})
    else:
        click.echo(f"run folder: {result.run_dir}  ({result.seconds:.0f} s, best val {result.best_accuracy:.2f} ± {result.best_ci95:.2f}%)")


@main.command("pretrain")
@_training_run_options
def pretrain_command(recipe: str, overrides: tuple[str, ...], check: bool, resume: bool, force: bool, quiet: bool, as_json: bool) -> None:
    """Pretrain a backbone as a classifier over every training class (the RECIPE's pretrain section), choosing the
    best epoch by few-shot accuracy on the stored validation episodes. The run evaluates and exports like any
    other, and a meta-training recipe starts from it with init: RUN.

    Example: fsltool pretrain omniglot/pretrain-conv4 pretrain.epochs=5 output=runs/pre
    """
    loaded = _load_recipe(recipe, overrides)
    if check:
        _check_recipe(recipe, loaded, "pretrain")
        return
    from fsltool.pretrain import pretrain

    result = pretrain(loaded, resume=resume, force=force, quiet=quiet or as_json)
    if not result.writer:
        return
    if as_json:
        _echo_json({"run": str(result.run_dir), "epochs": result.epochs, "steps": result.steps, "seconds": round(result.seconds, 1),
                    "best_validation": {"accuracy": result.best_accuracy, "ci95": result.best_ci95, "epoch": result.best_epoch},
                    "skipped_nonfinite": result.skipped_nonfinite})
    else:
        click.echo(f"run folder: {result.run_dir}  ({result.seconds:.0f} s, best val {result.best_accuracy:.2f} ± {result.best_ci95:.2f}% "
                   f"at epoch {result.best_epoch})")


@main.group()
def recipes() -> None:
    """The built-in recipes: list them, show or copy one to edit, check one without training.

    Example: fsltool recipes copy omniglot/protonet-5w1s my-recipe.yaml
    """


@recipes.command("list")
@json_option
def recipes_list(as_json: bool) -> None:
    """The built-in recipes by name, with what each trains, and the checkpoints that ship for recipes to start
    from (``init: NAME.pt``).

    Example: fsltool recipes list
    """
    from fsltool.builtin_recipes import list_recipes, list_starting_points

    found = list_recipes()
    if as_json:
        _echo_json([{"name": r.name, "path": str(r.path), "summary": r.summary} for r in found])
        return
    from rich.table import Table

    from fsltool.console import results

    table = Table("name", "what it trains")
    for recipe in found:
        table.add_row(recipe.name, recipe.summary)
    results.print(table)
    shipped = ", ".join(path.name for path in list_starting_points())
    if shipped:
        results.print(f"Starting points that ship with fsltool (a recipe's init: NAME; fsltool info NAME): {shipped}", highlight=False)


@recipes.command("show")
@click.argument("name", shell_complete=_complete_recipe)
def recipes_show(name: str) -> None:
    """Print a built-in recipe with its base merged in and every key resolved.

    Example: fsltool recipes show omniglot/relationnet-5w1s
    """
    from fsltool.builtin_recipes import find_recipe, flattened_text

    click.echo(flattened_text(find_recipe(name).path), nl=False)


@recipes.command("copy")
@click.argument("name", shell_complete=_complete_recipe)
@click.argument("destination", type=click.Path(), default=".")
@click.option("--force", is_flag=True, help="replace DESTINATION if it exists")
def recipes_copy(name: str, destination: str, force: bool) -> None:
    """Copy a built-in recipe to DESTINATION (a file, or a folder; default: here) as one self-contained file.

    Example: fsltool recipes copy omniglot/protonet-5w1s my-recipe.yaml
    """
    from fsltool.builtin_recipes import copy_recipe
    from fsltool.console import console

    target = copy_recipe(name, Path(destination), force=force)
    console.print(f"wrote {target} (edit it, then: fsltool meta-train {target})", highlight=False)


@recipes.command("check")
@click.argument("recipe", shell_complete=_complete_recipe)
@click.argument("overrides", nargs=-1)
def recipes_check(recipe: str, overrides: tuple[str, ...]) -> None:
    """Validate a RECIPE (file or built-in name) and its data file without training (= meta-train --check).

    Example: fsltool recipes check omniglot/protonet-5w1s train.episodes=500
    """
    _check_recipe(recipe, _load_recipe(recipe, overrides))


# ---------------------------------------------------------------- evaluate


def data_protocol_of(provenance: dict[str, Any]) -> dict[str, Any]:
    """How the data file was packed, where numbers depend on it, for a result's JSON: the class split (Omniglot's
    vinyals, lake or random and its seed, a benchmark's named split; the test classes differ between splits),
    Omniglot's resampling (``image_resample``) and, where not every split has them, the splits with rotated classes
    (none for a file packed with ``--no-rotations``), so numbers are compared only within one protocol."""
    keys = {"split": "class_split", "split_seed": "class_split_seed", "split_counts": "class_split_counts",
            "resample": "image_resample", "rotated_splits": "rotated_splits"}
    protocol = {name: provenance[key] for key, name in keys.items() if key in provenance}
    return {**protocol, "rotated_splits": []} if provenance.get("rotations") is False else protocol


@main.command()
@click.argument("run", type=click.Path())
@click.option("--shape", default=None, help="episode shape, e.g. 5w1s or 20w5s15q (default: the recipe's test_shape)")
@click.option("--split", default="test", show_default=True)
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--episodes", type=int, default=None, help="the first N stored episodes (default all), or N sampled ones")
@click.option("--sample-seed", type=int, default=None, help="sample fresh seeded episodes instead of the stored ones")
@click.option("--data", "data_path", default=None, help="data file (default: the recipe's)")
@click.option("--json", "json_out", default=None, help="also write the result as JSON to FILE ('-' for stdout)")
@click.option("--untrained", is_flag=True, help="evaluate the run's network as initialised, before meta-training (a baseline)")
@click.option("--by-instance", is_flag=True, help="accuracy by instance number on labelled sequences, 10 images per class (mann)")
@click.option("--method", "classifier", default=None,
              help="score with another classifier over the run's backbone, e.g. baseline or baseline++ on a pretraining run")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N (auto: CUDA where torch sees a GPU)")
@click.option("--calibration", is_flag=True, help="also NLL and expected calibration error (15 bins) before and after the run's temperature (fsltool calibrate)")
@click.option("--open-set", is_flag=True, help="also AUROC of known against stored unknown-class queries and the accept/reject trade-off")
@click.option("--runtime", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="what embeds the images: PyTorch, or ONNX Runtime (methods that embed each image once; same scores to float rounding)")
@click.option("--transductive", is_flag=True,
              help="normalise each episode's support set and its query batch with their own BatchNorm statistics, as the "
                   "Relation Network and MAML papers' code does (MAML, Reptile: after the inner loop, their transductive_bn mode; "
                   "each query's score then depends on the others; labelled transductive)")
@click.option("--adapt-steps", type=click.IntRange(min=1), default=None,
              help="fine-tuning steps on each support set (MAML, Reptile; default: the recipe's test_inner_steps; "
                   "MAML's reference code tests after 10); recorded in the result")
@click.option("--ensemble", type=click.IntRange(min=1), default=None,
              help="classify by the mean scores of the run's N best-validated numbered checkpoints, as MAML++'s code "
                   "tests (5); the run keeps them with train.keep_best_checkpoints; instead of --checkpoint")
@click.option("--support-copies", type=click.IntRange(min=1), default=None,
              help="fit on N copies of each support image augmented as the run trained (pretrain.augment or train.augment), "
                   "as RFS's evaluation does (5); the queries as they are; recorded in the result")
@quiet_option
def evaluate(run: str, shape: str | None, split: str, which: str, episodes: int | None, sample_seed: int | None,
             data_path: str | None, json_out: str | None, untrained: bool, by_instance: bool, classifier: str | None,
             device: str, calibration: bool, open_set: bool, runtime: str, transductive: bool, adapt_steps: int | None,
             ensemble: int | None, support_copies: int | None, quiet: bool) -> None:
    """Mean accuracy +- 95% CI of a trained RUN (folder or checkpoint) on stored test episodes.

    Example: fsltool evaluate runs/protonet-omniglot-5w1s --shape 20w5s --json result.json
    """
    from fsltool.checkpoint import best_validated_checkpoints, load_trained, training_budget
    from fsltool.data.episodes import EpisodeShape
    from fsltool.data.store import FewShotData
    from fsltool.device import prepare_device, resolve_device
    from fsltool.evaluate import evaluate as run_evaluation
    from fsltool.loop import autocast_for

    if episodes is not None and episodes < 1:
        raise FsltoolError(f"--episodes must be at least 1, got {episodes}")
    confidence = calibration or open_set
    _refuse_evaluate_combinations(confidence, transductive, untrained, classifier, by_instance, sample_seed)
    if support_copies is not None and (confidence or by_instance or transductive):
        raise FsltoolError("--support-copies reports accuracy on the stored queries: it does not go with --calibration, "
                           "--open-set, --by-instance or --transductive")
    if ensemble is not None:
        _refuse_ensemble_combinations(confidence, untrained, classifier, by_instance)
    target = resolve_device(device, "--device")
    prepare_device(target, repeating_shapes=False)
    chosen = best_validated_checkpoints(run, ensemble) if ensemble is not None else []
    members = [load_trained(path) for path, _ in chosen] or [load_trained(run, which)]
    trained = max(members, key=lambda member: member.state["elapsed"])  # an ensemble cost its latest member's training
    methods = [_method_to_evaluate(member, untrained, adapt_steps, classifier).to(target) for member in members]
    method_name = classifier or trained.config["method"]
    episode_shape = EpisodeShape.parse(shape or trained.recipe.test_shape)
    copies = _support_copies(trained, support_copies)
    report: dict[str, Any] = {}  # --calibration / --open-set
    with FewShotData(data_path or trained.recipe.data) as data:
        if by_instance:
            source = {"run": str(run), "checkpoint": "untrained" if untrained else str(trained.path),
                      "training": None if untrained else training_budget(trained)}
            _evaluate_by_instance(methods[0], data, split, episode_shape, episodes, sample_seed, runtime, source, json_out)
            return
        with autocast_for(trained.recipe.precision, target):  # as the run validated (fp32 unless its recipe says bf16)
            result = run_evaluation(methods, data, split, episode_shape, episodes=episodes, sample_seed=sample_seed, runtime=runtime,
                                    query_batch_statistics=transductive, support_copies=copies)
        if confidence:
            from fsltool.calibration import confidence_report

            report = confidence_report(trained, data, split, episode_shape, episodes, calibration=calibration, open_set=open_set)
    checkpoint = [str(path) for path, _ in chosen] if chosen else "untrained" if untrained else str(trained.path)
    payload = {**result.to_json(), "run": str(run), "checkpoint": checkpoint, "data": data.path,
               **({"validation_accuracy": [score for _, score in chosen]} if chosen else {}),
               **data_protocol_of(data.provenance), "method": method_name, "precision": trained.recipe.precision,
               **({"adapt_steps": adapt_steps} if adapt_steps is not None else {}),
               **({"support_augment": dataclasses.asdict(copies.augment)} if copies is not None else {}),
               "training": None if untrained else training_budget(trained), **report}
    if json_out == "-":
        write_json("-", payload)
        return
    _print_evaluation(result, f"{method_name} on {data.path}", split, episode_shape, adapt_steps, quiet)
    if report:
        _print_confidence(report, f"{split}, {len(result.accuracies)} stored {episode_shape} episodes", quiet)
    if json_out:
        write_json(json_out, payload)

def _refuse_evaluate_combinations(confidence: bool, transductive: bool, untrained: bool, classifier: str | None, by_instance: bool,
                                  sample_seed: int | None) -> None:
    """evaluate's options that measure different things and do not combine."""
    if confidence and (untrained or classifier or by_instance or sample_seed is not None):
        raise FsltoolError("--calibration and --open-set evaluate the run's own trained method on stored episodes: they do not "
                           "go with --untrained, --method, --by-instance or --sample-seed")
    if transductive and (confidence or by_instance):
        raise FsltoolError("--transductive reports accuracy only: it does not go with --calibration, --open-set or --by-instance")


def _refuse_ensemble_combinations(confidence: bool, untrained: bool, classifier: str | None, by_instance: bool) -> None:
    """--ensemble scores the run's own checkpoints by accuracy; it names them itself, so not with --checkpoint."""
    if confidence or untrained or classifier or by_instance:
        raise FsltoolError("--ensemble reports the accuracy of the run's own trained checkpoints: it does not go with "
                           "--calibration, --open-set, --untrained, --method or --by-instance")
    if click.get_current_context().get_parameter_source("which") is not click.core.ParameterSource.DEFAULT:
        raise FsltoolError("--ensemble chooses the run's best-validated checkpoints itself: it does not go with --checkpoint")


def _support_copies(trained: TrainedModel, count: int | None) -> SupportCopies | None:
    """``--support-copies``: that many copies of each support image, augmented as the run trained: its
    ``pretrain.augment`` for a pretraining run (RFS augments as it pretrained), else its ``train.augment``."""
    from fsltool.data.augment import EPISODE_KINDS
    from fsltool.evaluate import SupportCopies

    if count is None:
        return None
    section = "pretrain" if trained.state.get("stage") == "pretrain" else "train"
    augment = getattr(trained.recipe, section).augment
    if augment.kind == "none" or augment.kind in EPISODE_KINDS:
        raise FsltoolError(f"--support-copies: {trained.path}: the run's recipe key '{section}.augment.kind' is {augment.kind}: "
                           "it has no per-image augmentation to make the copies with")
    return SupportCopies(count, augment)


def _method_to_evaluate(trained: TrainedModel, untrained: bool, adapt_steps: int | None, classifier: str | None) -> Method:
    """The run's method as evaluate's options ask: as initialised, with other fine-tuning steps, another classifier."""
    from fsltool.checkpoint import untrained_like, with_adapt_steps, with_classifier

    method = untrained_like(trained) if untrained else trained.method
    if adapt_steps is not None:
        method = with_adapt_steps(method, trained.config, adapt_steps)
    return with_classifier(method, classifier) if classifier else method


def _evaluate_by_instance(method: Method, data: FewShotData, split: str, shape: EpisodeShape, episodes: int | None,
                          sample_seed: int | None, runtime: str, source: dict[str, Any], json_out: str | None) -> None:
    """``evaluate --by-instance``: MANN's protocol, accuracy by how often the query's class was seen before;
    ``source`` names the run, checkpoint and training budget in the JSON."""
    from fsltool.by_instance import accuracy_by_instance

    by = accuracy_by_instance(method, data, split, shape, episodes=episodes, sample_seed=sample_seed, runtime=runtime)
    _report_by_instance(by.to_json(), {**source, "data": data.path, **data_protocol_of(data.provenance)}, json_out)


def _print_evaluation(result: EvalResult, title: str, split: str, shape: EpisodeShape, adapt_steps: int | None, quiet: bool) -> None:
    """The result as a table (unless ``quiet``) and one line for scripts."""
    from rich.table import Table

    from fsltool.console import console

    if not quiet:
        table = Table(title=title)
        for column in ("split", "shape", "episodes", "accuracy (%)", "95% CI"):
            table.add_column(column)
        table.add_row(split, str(shape), f"{len(result.accuracies)} {result.episodes_from}", f"{result.accuracy:.2f}", f"± {result.ci95:.2f}")
        console.print(table)
    click.echo(f"accuracy {result.accuracy:.2f} ± {result.ci95:.2f}% ({shape}, {len(result.accuracies)} {result.episodes_from} {split} episodes, "
               f"{'transductive' if result.transductive else 'non-transductive'}"
               f"{f', {adapt_steps} fine-tuning steps' if adapt_steps is not None else ''}"
               f"{f', ensemble of {result.ensemble} checkpoints' if result.ensemble > 1 else ''}"
               f"{f', support images as {result.support_copies} augmented copies' if result.support_copies else ''})")



def _report_by_instance(result: dict[str, Any], source: dict[str, Any], json_out: str | None) -> None:
    payload = {**result, **source}
    if json_out == "-":
        write_json("-", payload)
        return
    from rich.table import Table

    from fsltool.console import results

    table = Table(title=f"accuracy by instance, {result['way']}-way sequences of {result['sequence_length']} steps, "
                        f"{result['episodes']} {result['episodes_from']} {result['split']} episodes")
    for column in ("instance", "accuracy (%)", "95% CI"):
        table.add_column(column)
    for instance, row in result["by_instance"].items():
        table.add_row(instance, f"{row['accuracy']:.2f}", f"± {row['ci95']:.2f}")
    results.print(table)
    if json_out:
        write_json(json_out, payload)


# ---------------------------------------------------------------- calibrate


@main.command()
@click.argument("run", type=click.Path())
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--shape", default=None, help="stored validation episode shape (default: the recipe's test_shape)")
@click.option("--episodes", type=click.IntRange(min=1), default=None, help="the first N stored validation episodes (default all)")
@click.option("--data", "data_path", default=None, help="data file (default: the recipe's)")
@click.option("--reject-rate", type=float, default=None,
              help="also fit an open-set threshold: the fraction of unknown-class validation queries it lets through "
                   "(false-accept rate), e.g. 0.05; needs stored unknowns (prepare --unknowns / prepare unknowns)")
@click.option("--open-set-score", type=click.Choice(["score", "probability"]), default="score", show_default=True,
              help="what the threshold compares: the method's top raw score (ProtoNet: minus the squared distance to the "
                   "nearest prototype), or the calibrated top probability (depends on how many classes compete)")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@quiet_option
@json_option
def calibrate(run: str, which: str, shape: str | None, episodes: int | None, data_path: str | None, reject_rate: float | None,
              open_set_score: str, device: str, quiet: bool, as_json: bool) -> None:
    """Fit a RUN's softmax temperature on its stored validation episodes (and, with --reject-rate, a "none of
    these" threshold) into RUN/calibration.json; export, enroll and predict then use it.

    Example: fsltool calibrate runs/omniglot/protonet-5w1s --reject-rate 0.05
    """
    from fsltool.calibration import calibrate as fit_calibration
    from fsltool.checkpoint import load_trained
    from fsltool.data.episodes import EpisodeShape
    from fsltool.data.store import FewShotData
    from fsltool.device import resolve_device

    target = resolve_device(device, "--device")
    trained = load_trained(run, which)
    trained.method.to(target)
    episode_shape = EpisodeShape.parse(shape or trained.recipe.test_shape)
    with FewShotData(data_path or trained.recipe.data) as data:
        fit = fit_calibration(trained, data, episode_shape, episodes=episodes, reject_rate=reject_rate, open_set_score=open_set_score)
    if as_json:
        _echo_json({"file": str(fit.path), **fit.record, **fit.calibration.to_json()})
        return
    _print_confidence({"calibration": fit.record["validation"]}, f"validation, {fit.record['fitted_on']['episodes']} stored {episode_shape} episodes", quiet)
    open_set = fit.record["validation"]["open_set"]
    if open_set is not None:
        click.echo(f"open-set threshold {fit.calibration.open_set.threshold:.6g} on the {open_set_score}: accepts "
                   f"{100 * open_set['unknown_accepted']:.2f}% of {open_set['unknown_queries']} unknown and rejects "
                   f"{100 * open_set['known_rejected']:.2f}% of known validation queries")
    click.echo(f"temperature {fit.calibration.temperature:.4f} written to {fit.path}")


def _print_confidence(report: dict[str, Any], title: str, quiet: bool) -> None:
    """Tables of evaluate --calibration / --open-set and of calibrate: NLL and ECE before and after the temperature;
    AUROC and the accept/reject trade-off."""
    from rich.table import Table

    from fsltool.console import console

    calibration, open_set = report.get("calibration"), report.get("open_set")
    if calibration is not None:
        table = Table(title=f"calibration, {title} ({calibration['queries']} queries, ECE over {calibration['ece_bins']} bins)")
        for column in ("", "NLL", "ECE (%)"):
            table.add_column(column)
        for row, label in (("before", "softmax(scores)"), ("after", f"softmax(scores / {calibration['temperature']:.4f})")):
            table.add_row(label, f"{calibration[row]['nll']:.4f}", f"{100 * calibration[row]['ece']:.2f}")
        if not quiet:
            console.print(table)
    if open_set is None:
        return
    auroc = ", ".join(f"{value:.4f} by top {name}" for name, value in open_set["auroc"].items())
    click.echo(f"open set, {title}: AUROC {auroc} ({open_set['known_queries']} known, {open_set['unknown_queries']} unknown queries, "
               f"temperature {open_set['temperature']:.4f})")
    table = Table(title=f"accept/reject trade-off by the top {open_set['score']} (accuracy without rejection {100 * open_set['accuracy']:.2f}%)")
    for column in ("threshold set by", "threshold", "unknown accepted (%)", "known rejected (%)", "accuracy on accepted (%)", "open-set accuracy (%)"):
        table.add_column(column)
    stored = open_set["stored_threshold"]
    rows = ([(f"stored (val, {stored['false_accept_rate']:.0%})", stored)] if stored else []) + [
        (f"{row['target_unknown_accepted']:.0%} of unknowns", row) for row in open_set["trade_off"]]
    for label, row in rows:
        table.add_row(label, f"{row['threshold']:.6g}", f"{100 * row['unknown_accepted']:.2f}", f"{100 * row['known_rejected']:.2f}",
                      f"{100 * row['accuracy_accepted']:.2f}", f"{100 * row['open_set_accuracy']:.2f}")
    if not quiet:
        console.print(table)


# ---------------------------------------------------------------- export


@main.command()
@click.argument("run", type=click.Path())
@click.option("--out", "out_dir", default=None, help="output folder (default: RUN/export)")
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--verify-episodes", default=100, show_default=True, help="stored test episodes to check ONNX Runtime against PyTorch on (0: skip)")
@click.option("--data", "data_path", default=None, help="data file for verification (default: the recipe's)")
@click.option("--device", default="auto", show_default=True, help="ONNX Runtime device for verification: auto | cpu | cuda | cuda:N")
@quiet_option
@json_option
def export(run: str, out_dir: str | None, which: str, verify_episodes: int, data_path: str | None, device: str, quiet: bool, as_json: bool) -> None:
    """Export a trained RUN to ONNX (dynamic way/shot/query) and TorchScript, then verify under ONNX Runtime.

    Example: fsltool export runs/protonet-omniglot-5w1s --out models/protonet
    """
    from fsltool.console import console
    from fsltool.export import export_run
    from fsltool.runtime import device_index

    device_index(device)  # a bad name is refused before the export, not after it
    report = export_run(run, out_dir, which=which, data_path=data_path, verify_episodes=verify_episodes, device=device)
    check = report.verification
    if check is not None and check.agreement < 0.999:
        raise FsltoolError(f"ONNX Runtime disagrees with PyTorch on {100 * (1 - check.agreement):.2f}% of queries")
    if as_json:
        _echo_json({"out": str(report.out_dir), "files": [str(p) for p in report.files],
                    "verification": dataclasses.asdict(check) if check is not None else None})
        return
    for path in report.files if not quiet else ():
        console.print(f"wrote {path}", highlight=False)
    if check is not None:
        click.echo(f"verified on {check.episodes} stored {check.shape} test episodes with ONNX Runtime ({check.provider}): "
                   f"max |ONNX - PyTorch| = {check.max_abs_diff:.2e}, prediction agreement {100 * check.agreement:.2f}%, "
                   f"ONNX accuracy {check.accuracy:.2f}%")
    click.echo(f"ONNX model: {report.out_dir / 'classifier.onnx'}")


# ---------------------------------------------------------------- predict


@main.command()
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path(), metavar="[SUPPORT] QUERIES...")
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]), default="best", show_default=True, help="with a run folder")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N, with an export or enrolled folder (ONNX Runtime)")
@click.option("--top", type=click.IntRange(min=1), default=1, show_default=True, help="also list the K best classes of each query")
@json_option
@quiet_option
def predict(model: str, inputs: tuple[str, ...], which: str, device: str, top: int, as_json: bool, quiet: bool) -> None:
    """Classify QUERIES (images or folders) from a SUPPORT folder (one sub-folder of images per class), or against
    the classes enrolled in MODEL (no SUPPORT).

    MODEL is an enrolled folder (fsltool enroll) or an export folder (both: ONNX Runtime alone, no torch needed), or a
    run folder / checkpoint (PyTorch).

    Example: fsltool predict runs/omniglot/protonet-5w1s/export my_support/ query1.png query_folder/
    """
    from fsltool.predict import is_enrolled, predict_enrolled, predict_onnx, predict_torch
    from fsltool.runtime import device_index

    device_index(device)
    if is_enrolled(model):
        predictions, provider = predict_enrolled(model, list(inputs), device, top)
    elif len(inputs) < 2:
        raise FsltoolError(f"{model}: not an enrolled folder, so give a SUPPORT folder and then QUERIES")
    elif (Path(model) / "model.json").is_file():
        predictions, provider = predict_onnx(model, inputs[0], list(inputs[1:]), device, top)
    else:
        predictions, provider = predict_torch(model, inputs[0], list(inputs[1:]), which, top), "PyTorch (CPU)"
    if as_json:
        click.echo(json.dumps({"provider": provider, "predictions": [p.to_json() for p in predictions]}, indent=2))
        return
    for p in predictions:
        ranked = "".join(f"\t{r.label}\t{r.probability:.4f}" for r in p.top[1:])
        nearest = f"\t(nearest {p.nearest})" if p.unknown else ""  # below the model's open-set threshold
        click.echo(f"{p.query}\t{p.label or 'unknown'}\t{p.probability:.4f}{nearest}{ranked}")
    if quiet:
        return
    from fsltool.console import console

    console.print(f"{len(predictions)} queries classified with {provider}", highlight=False)


# ---------------------------------------------------------------- enroll


@main.command()
@click.argument("model", type=click.Path())
@click.argument("support", required=False, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="the enrolled folder")
@click.option("--add", is_flag=True, help="add SUPPORT's classes to those enrolled in OUT (the others are not recomputed)")
@click.option("--remove", multiple=True, metavar="NAME", help="drop an enrolled class (repeatable)")
@click.option("--force", is_flag=True, help="replace the enrolment in OUT (never a folder that is not one)")
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]), default="best", show_default=True, help="with a run folder")
@json_option
@quiet_option
def enroll(model: str, support: str | None, out_dir: str, add: bool, remove: tuple[str, ...], force: bool, which: str,
           as_json: bool, quiet: bool) -> None:
    """Enrol the classes of a SUPPORT folder (one sub-folder of images per class) once, with a trained MODEL (run
    folder or checkpoint): OUT gets one graph images -> scores with what the method keeps of each class as
    constants (ONNX + TorchScript), for fsltool predict OUT QUERIES...

    Later, without recomputing the others: MODEL more_classes/ --out OUT --add, or MODEL --out OUT --remove NAME.

    Example: fsltool enroll runs/omniglot/protonet-5w1s my_classes/ --out enrolled/
    """
    from fsltool.enroll import enroll as run_enrolment

    report = run_enrolment(model, support, out_dir, add=add, remove=remove, force=force, which=which)
    if as_json:
        _echo_json({"out": str(report.out_dir), "classes": report.classes, "added": report.added, "removed": report.removed,
                    "kept_per_class": report.kept, "calibration_left_out": report.calibration_left_out,
                    "files": [str(p) for p in report.files]})
        return
    if not quiet:
        from fsltool.console import console

        changes = [f"{verb} {len(names)}" for verb, names in (("added", report.added), ("removed", report.removed)) if names]
        console.print(f"{', '.join(changes)}; {len(report.classes)} classes enrolled, each kept as its {report.kept}", highlight=False)
        if report.calibration_left_out:
            console.print(f"note: {report.calibration_left_out}", highlight=False)
    click.echo(f"enrolled classifier: {report.out_dir / 'classifier.onnx'}")


# ---------------------------------------------------------------- plot


@main.group()
def plot() -> None:
    """PNG figures: a run's learning curves, or a stored episode with a model's predictions.

    Example: fsltool plot curves runs/omniglot/protonet-5w1s
    """


@plot.command("curves")
@click.argument("run", type=click.Path())
@click.option("--out", default=None, help="PNG file (default: RUN/curves.png)")
@quiet_option
def plot_curves(run: str, out: str | None, quiet: bool) -> None:
    """Loss and accuracy against episodes, and validation accuracy against wall time, of a RUN folder.

    Example: fsltool plot curves runs/omniglot/protonet-5w1s --out curves.png
    """
    from fsltool.console import console
    from fsltool.plots import plot_learning_curves

    written = plot_learning_curves(run, out)
    if not quiet:
        console.print(f"wrote {written}", highlight=False)


@plot.command("time")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", default="time-to-accuracy.png", show_default=True, help="PNG file")
@quiet_option
def plot_time(runs: tuple[str, ...], out: str, quiet: bool) -> None:
    """Validation accuracy against wall-clock minutes of several RUNS on one axis. A run started from another
    (init:) is drawn after it, so a pretrain-then-fine-tune campaign compares with training from scratch.

    Example: fsltool plot time runs/omniglot/protonet-5w1s runs/omniglot/protonet-pretrained-5w1s --out time.png
    """
    from fsltool.console import console
    from fsltool.plots import plot_time_to_accuracy

    written = plot_time_to_accuracy(list(runs), out)
    if not quiet:
        console.print(f"wrote {written}", highlight=False)


@plot.command("episode")
@click.argument("target", type=click.Path())
@click.option("--split", default="test", show_default=True)
@click.option("--shape", default=None, help="stored episode shape (default: the run's test_shape, or 5w1s15q)")
@click.option("--index", default=0, show_default=True, help="which stored episode")
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]), default="best", show_default=True, help="with a run")
@click.option("--out", default="episode.png", show_default=True, help="PNG file")
@quiet_option
def plot_episode(target: str, split: str, shape: str | None, index: int, which: str, out: str, quiet: bool) -> None:
    """A stored episode as a grid: one row per class, support then queries. TARGET is a data file, or a run
    folder / checkpoint whose predictions frame each query green (right) or red (wrong).

    Example: fsltool plot episode runs/omniglot/protonet-5w1s --shape 5w1s15q --index 3 --out episode.png
    """
    from fsltool.console import console
    from fsltool.plots import plot_episode_grid, stored_episode_view

    trained = None
    data_path = target
    if not target.endswith((".h5", ".hdf5")):
        from fsltool.checkpoint import load_trained

        trained = load_trained(target, which)
        data_path = trained.recipe.data
    view = stored_episode_view(data_path, split, shape or (trained.recipe.test_shape if trained else "5w1s15q"), index, trained)
    written = plot_episode_grid(view, Path(out))
    if not quiet:
        console.print(f"wrote {written}", highlight=False)


# ---------------------------------------------------------------- info


@main.command()
@click.argument("target", type=click.Path())
@json_option
def info(target: str, as_json: bool) -> None:
    """Describe a data file, a run folder or checkpoint, or an exported model (folder or .onnx); a folder of run
    folders gets one line per run (status, progress, validation).

    Example: fsltool info data/omniglot.h5
    """
    from fsltool.info import describe

    details = describe(target)
    if as_json:
        _echo_json(details)
        return
    if details["kind"] == "run folders":
        _print_runs(details)
        return
    if details["kind"] == "run folder":  # the resolved recipe is the folder's recipe.yaml: too long to repeat here
        details["recipe"] = str(Path(target) / "recipe.yaml")
    from rich.pretty import Pretty

    from fsltool.console import results

    results.print(Pretty(details, expand_all=False), soft_wrap=True)


def _trained_column(run: dict[str, Any], unit: str) -> str:
    """How far a run went: a running one as far as it has logged (past its last checkpoint); one no longer running as
    far as its last checkpoint, where --resume continues, with the log's count beside it when a kill left the log
    further on."""
    done, logged = run[f"{unit}s_trained"], run.get("latest_logged_episode", 0)
    if run["status"].startswith("running"):
        done = max(done, logged)
    text = f"{done:,} / {run[f'{unit}s_planned']:,} {unit}s"
    return text + f" (logged to {logged:,})" if logged > done else text


def _print_runs(details: dict[str, Any]) -> None:
    """`info` on a folder of runs: one line per run, in aligned columns (grep-able, whatever the terminal width)."""
    from fsltool.info import TIME_LEFT_NOTE

    def validation(found: dict[str, Any] | None) -> str:
        if not found:
            return "-"
        return f"{found['accuracy']:.2f} ± {found['ci95']:.2f} at {found.get('episode', found.get('epoch')):,}"

    rows = [("run", "method", "status", "trained", "best validation", "latest validation", "time left")]
    root = Path(details["path"])
    for run in details["runs"]:
        name = str(Path(run["path"]).relative_to(root))
        if "error" in run:
            rows.append((name, "-", "unreadable: " + run["error"], "", "", "", ""))
            continue
        unit = "epoch" if run["stage"] == "pretrain" else "episode"
        rows.append((name, run["method"], run["status"], _trained_column(run, unit),
                     validation(run.get("best_validation")), validation(run.get("latest_validation")),
                     run.get("time_left", "-").removesuffix(TIME_LEFT_NOTE)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
