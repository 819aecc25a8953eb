"""The recipes that ship with fsltool: find them by name (``omniglot/protonet-5w1s``), list them, and copy one
out as a single self-contained file to edit. Base files (``*-base.yaml``) are building blocks, not listed. Some
recipes start from a checkpoint that ships with them (``init: NAME.pt``): found here too, by file name."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import yaml

from fsltool.errors import FsltoolError

PACKAGE_DIR = Path(__file__).resolve().parent


def recipes_root() -> Path:
    """Inside an installed wheel the recipes are package data (fsltool/recipes); in a source checkout or an
    editable install they are the repository's top-level recipes/ folder."""
    for candidate in (PACKAGE_DIR / "recipes", PACKAGE_DIR.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise FsltoolError(f"no built-in recipes found (looked in {PACKAGE_DIR / 'recipes'} and {PACKAGE_DIR.parent / 'recipes'})")


def starting_points_root() -> Path | None:
    """The checkpoints that ship for recipes' ``init:``: package data (fsltool/inits) inside an installed wheel, the
    repository's results/init/ folder in a source checkout or an editable install; None if neither is there."""
    for candidate in (PACKAGE_DIR / "inits", PACKAGE_DIR.parent / "results" / "init"):
        if candidate.is_dir():
            return candidate
    return None


def list_starting_points() -> list[Path]:
    root = starting_points_root()
    return sorted(root.glob("*.pt")) if root is not None else []


def shipped_starting_point(name: str) -> Path | None:
    """The checkpoint that ships with fsltool under this file name (with or without ``.pt``); None for a path or an
    unknown name."""
    if Path(name).name != name:
        return None
    return next((shipped for shipped in list_starting_points() if name in (shipped.name, shipped.stem)), None)


def init_path(text: str) -> Path:
    """What a recipe's ``init`` names: an existing run folder or checkpoint file, else a checkpoint that ships with
    fsltool, by its file name (so a built-in recipe starts from it wherever it runs, from a clone or a wheel)."""
    path = Path(text)
    if path.exists():
        return path
    shipped = shipped_starting_point(text)
    if shipped is not None:
        return shipped
    names = ", ".join(p.name for p in list_starting_points()) or "none"
    raise FsltoolError(f"{text}: no such run folder or checkpoint, nor a checkpoint that ships with fsltool (shipped: {names})")


@dataclass
class BuiltinRecipe:
    name: str  # folder/stem, e.g. omniglot/protonet-5w1s
    path: Path
    summary: str  # the file's first comment line


def _summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def list_recipes() -> list[BuiltinRecipe]:
    root = recipes_root()
    return [
        BuiltinRecipe(path.relative_to(root).with_suffix("").as_posix(), path, _summary(path))
        for path in sorted(root.glob("*/*.yaml"))
        if not path.stem.endswith("-base")
    ]


def find_recipe(name: str) -> BuiltinRecipe:
    """A built-in recipe by name (``omniglot/protonet-5w1s``, with or without ``.yaml``)."""
    wanted = name.removesuffix(".yaml")
    recipes = list_recipes()
    for recipe in recipes:
        if recipe.name == wanted:
            return recipe
    close = difflib.get_close_matches(wanted, [r.name for r in recipes], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else " (see: fsltool recipes list)"
    raise FsltoolError(f"no built-in recipe {name!r}{hint}")


def recipe_path(text: str) -> Path:
    """What a RECIPE argument names: an existing file, else a built-in recipe of that name."""
    path = Path(text)
    if path.exists():
        return path
    try:
        return find_recipe(text).path
    except FsltoolError as error:
        raise FsltoolError(f"{text}: no such recipe file, nor a built-in recipe{str(error).partition(repr(text))[2]}") from None


def flattened_text(path: Path) -> str:
    """One self-contained recipe: the comments of the file and of its ``base:`` chain, then every key resolved
    (defaults included), so the copy can be edited and run anywhere without its base files."""
    from fsltool.recipe import dump_recipe, load_recipe

    comments: list[str] = []
    current: Path | None = path
    while current is not None:
        text = current.read_text()
        comments += [f"# from {current.name}:"] + [line for line in text.splitlines() if line.startswith("#")]
        base = (yaml.safe_load(text) or {}).get("base")
        current = (current.parent / base).resolve() if isinstance(base, str) else None
    return "\n".join(comments) + "\n" + dump_recipe(load_recipe(path))


def copy_recipe(name: str, destination: Path, *, force: bool = False) -> Path:
    """Write the built-in recipe ``name`` (flattened) to ``destination`` (a file, or a folder to put it in)."""
    from fsltool.atomic import atomic_write

    recipe = find_recipe(name)
    target = destination / f"{recipe.path.stem}.yaml" if destination.is_dir() else destination
    if target.exists() and not force:
        raise FsltoolError(f"{target}: already exists (pass --force to replace it)")
    text = flattened_text(recipe.path)
    atomic_write(target, lambda file: file.write(text.encode()))
    return target
