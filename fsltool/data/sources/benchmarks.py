"""miniImageNet, tieredImageNet and CUB-200-2011 from the layouts their users have, split by the published lists.

The class lists come from ``fsltool.data.splits``; a source here only finds each listed class on disk and refuses a
tree that does not match its split (a missing class, a class the split does not list, the wrong folder level), so
a packed file is the benchmark exactly or is not written at all.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fsltool.data.sources.base import ClassSpec, SourceListing, check_image_options, image_file_listing, require_folder
from fsltool.data.sources.csv_splits import csv_splits
from fsltool.data.sources.folder import find_class_folders
from fsltool.data.splits import BenchmarkSplit, benchmark_split
from fsltool.errors import FsltoolError

BENCHMARK_SIZE = 84  # the side the mini/tieredImageNet and CUB few-shot papers resize to

IMAGENET_TREE = "<root>/<synset>/<image> (class folders named by ImageNet synset, at any depth)"
RAVI_CSV = "<root>/images/<image> beside <root>/train.csv, val.csv and test.csv (filename,label)"
MINIIMAGENET_PER_CLASS = 600  # images per class in Ravi & Larochelle's CSVs; a full ImageNet class folder has ~1,300
CUB_TREE = "<root>/CUB_200_2011/images/<NNN.Class_name>/<image> (or <root>/images/... inside CUB_200_2011)"
CUB_IMAGES = ("CUB_200_2011/images", "images")  # where the class folders are, for a root above or at CUB_200_2011
IGNORE_HINT = "; pass --ignore-other-classes to leave such classes out"


def assign_splits(found: Iterable[str], split: BenchmarkSplit, where: str, *, ignore_other_classes: bool,
                  layout: str, other_hint: str = IGNORE_HINT) -> dict[str, str]:
    """Class -> split for the classes ``found`` under ``where``: every listed class must be there, and an unlisted
    one is refused, its message ending in ``other_hint`` (or, with ``ignore_other_classes``, left out: e.g. the rest
    of ImageNet around tieredImageNet); ``layout`` says what was expected when no listed class is there at all."""
    present = set(found)
    split_of = split.split_of()
    if not present & split_of.keys():
        example = f" (found {sorted(present)[0]!r})" if present else ""
        raise FsltoolError(f"{where}: none of the {len(split_of)} classes of the {split.name} split is here{example}; "
                           f"expected {layout}")
    missing = [name for name in split_of if name not in present]
    if missing:
        more = f" ({len(missing)} classes missing)" if len(missing) > 1 else ""
        raise FsltoolError(f"{where}: class {missing[0]!r} ({split_of[missing[0]]}) of the {split.name} split is "
                           f"missing{more}")
    others = sorted(present - split_of.keys())
    if others and not ignore_other_classes:
        more = f" ({len(others)} such classes)" if len(others) > 1 else ""
        raise FsltoolError(f"{where}: class {others[0]!r} is not in the {split.name} split{more}{other_hint}")
    return {name: split_of[name] for name in sorted(present & split_of.keys())}


def split_provenance(split: BenchmarkSplit, classes_found: int, classes_kept: int) -> dict[str, Any]:
    """What a packed file records of its split: which published list, where it comes from, and what was left out."""
    return {"split": split.name, "split_source": split.provenance, "other_classes_left_out": classes_found - classes_kept}


def class_tree(root: str, split: BenchmarkSplit, *, source: str, size: int, ignore_other_classes: bool,
               layout: str, other_hint: str = IGNORE_HINT) -> SourceListing:
    """A tree whose class folders are named as the split names its classes, at any depth below ``root``.

    Matching folders by their own name, not their path, reads the same classes from ``root/<class>/`` and from
    trees grouped one level deeper (``root/train/<class>/``, as some copies of tieredImageNet are); two folders
    of one name are refused, as the class they belong to would be ambiguous.
    """
    require_folder(root, f"{source} root")
    check_image_options(3, size)
    images = _by_folder_name(find_class_folders(root), root)
    splits = assign_splits(images, split, root, ignore_other_classes=ignore_other_classes, layout=layout,
                           other_hint=other_hint)
    classes = [ClassSpec(name, splits[name], tuple(images[name])) for name in splits]
    provenance = {"source": source, "layout": "class folders", "root": root, "size": size,
                  **split_provenance(split, len(images), len(splits))}
    return image_file_listing(classes, channels=3, size=size, provenance=provenance)


def _by_folder_name(classes: dict[str, list[str]], root: str) -> dict[str, list[str]]:
    """Class path under ``root`` -> images, re-keyed by the class folder's own name."""
    by_name: dict[str, list[str]] = {}
    path_of: dict[str, str] = {}
    for path, images in classes.items():
        name = Path(path).name
        if name in path_of:
            raise FsltoolError(f"{root}: two class folders are named {name!r} ({path_of[name]} and {path})")
        by_name[name], path_of[name] = images, path
    return by_name


def miniimagenet(*, root: str, split: str = "ravi", size: int = BENCHMARK_SIZE,
                 ignore_other_classes: bool = False) -> SourceListing:
    """miniImageNet in the Ravi layout (``root/images`` beside the split CSVs, read by ``csv_splits``) when
    ``root/train.csv`` exists, else a class-per-folder tree of synsets; split by the built-in ``split``.

    A tree is taken whole, so a class folder with more than miniImageNet's 600 images is refused: its classes'
    folders in full ImageNet hold about 1,300, and only the CSVs say which 600 are miniImageNet's.
    """
    root = str(root)
    builtin = benchmark_split(f"miniimagenet/{split}")
    require_folder(root, "miniimagenet root")
    if not os.path.isfile(os.path.join(root, "train.csv")):
        tree = class_tree(root, builtin, source="miniimagenet", size=size, ignore_other_classes=ignore_other_classes,
                          layout=f"{IMAGENET_TREE}, or {RAVI_CSV}")
        for spec in tree.classes:
            if len(spec.items) > MINIIMAGENET_PER_CLASS:
                raise FsltoolError(f"{os.path.dirname(tree.describe(spec.items[0]))}: class {spec.name!r} has {len(spec.items)} images, but a miniImageNet "
                                   f"class has {MINIIMAGENET_PER_CLASS} (a full ImageNet folder?); give the layout {RAVI_CSV}, "
                                   "whose CSVs name miniImageNet's images")
        return tree
    listing = csv_splits(images=os.path.join(root, "images"), splits=root, channels=3, size=size)
    in_csv = {spec.name: spec.split for spec in listing.classes}
    splits = assign_splits(in_csv, builtin, root, ignore_other_classes=ignore_other_classes, layout=RAVI_CSV)
    for name, expected in splits.items():
        if in_csv[name] != expected:
            raise FsltoolError(f"{os.path.join(root, in_csv[name] + '.csv')}: class {name!r} is listed for "
                               f"{in_csv[name]}, but the {builtin.name} split puts it in {expected}")
    provenance = {**listing.provenance, "source": "miniimagenet", "layout": "ravi csv",
                  **split_provenance(builtin, len(in_csv), len(splits))}
    return dataclasses.replace(listing, classes=[spec for spec in listing.classes if spec.name in splits],
                               provenance=provenance)


def tieredimagenet(*, root: str, size: int = BENCHMARK_SIZE, ignore_other_classes: bool = False) -> SourceListing:
    """tieredImageNet (Ren et al. 2018) from a class-per-folder tree of synsets, such as ImageNet's training set
    (with ``ignore_other_classes``, as tieredImageNet uses 608 of its 1,000 classes)."""
    return class_tree(str(root), benchmark_split("tieredimagenet/ren"), source="tieredimagenet", size=size,
                      ignore_other_classes=ignore_other_classes, layout=IMAGENET_TREE)


def cub(*, root: str, size: int = BENCHMARK_SIZE) -> SourceListing:
    """CUB-200-2011 as extracted from CUB_200_2011.tgz, with the Chen et al. (2019) split of its 200 classes."""
    root = str(root)
    require_folder(root, "cub root")
    images = next((os.path.join(root, sub) for sub in CUB_IMAGES if os.path.isdir(os.path.join(root, sub))), None)
    if images is None:
        raise FsltoolError(f"cub root {root}: no {' or '.join(CUB_IMAGES)} folder; expected {CUB_TREE}")
    return class_tree(images, benchmark_split("cub/chen"), source="cub", size=size, ignore_other_classes=False,
                      layout=CUB_TREE, other_hint="; CUB-200-2011 has 200 class folders, no others")
