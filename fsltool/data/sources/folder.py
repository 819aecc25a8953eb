"""A class-per-folder image tree: every folder that directly holds images is a class."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fsltool.data.images import IMAGE_SUFFIXES
from fsltool.data.sources.base import (
    SPLITS,
    ClassSpec,
    SourceListing,
    check_image_options,
    image_file_listing,
    require_folder,
    split_by_ratios,
)
from fsltool.errors import FsltoolError


def folder(
    *,
    root: str,
    channels: int = 3,
    size: int | None = None,
    split_ratios: tuple[float, float, float] | None = (0.64, 0.16, 0.2),
    split_seed: int = 0,
    split_lists: str | None = None,
) -> SourceListing:
    """List a class-per-folder tree; classes are named by their path under ``root`` with '/' separators.

    Splits come from ``split_lists`` (a folder with train.txt, val.txt, test.txt) when given, and then
    ``split_ratios`` is ignored; otherwise from ``split_ratios`` cut over a ``split_seed`` permutation of the classes.
    With ``size`` None all images must share one size.
    """
    root = str(root)
    require_folder(root, "folder root")
    check_image_options(channels, size)
    images = find_class_folders(root)
    if not images:
        raise FsltoolError(f"folder root {root}: empty source, no folder holds images ({' '.join(IMAGE_SUFFIXES)})")
    provenance: dict[str, Any] = {"source": "folder", "root": root, "channels": channels, "size": size}
    if split_lists is not None:
        splits = read_split_lists(str(split_lists), set(images))
        provenance.update(split_lists=str(split_lists), unlisted_classes=len(images) - len(splits))
    elif split_ratios is not None:
        splits = split_by_ratios(images, split_ratios, split_seed)
        provenance.update(split_ratios=list(split_ratios), split_seed=split_seed)
    else:
        raise FsltoolError("folder source: give split_ratios or split_lists")
    classes = [ClassSpec(name, splits[name], tuple(images[name])) for name in sorted(splits)]
    return image_file_listing(classes, channels=channels, size=size, provenance=provenance)


def find_class_folders(root: str) -> dict[str, list[str]]:
    """Class name -> sorted image paths, for every non-hidden folder under ``root`` that directly holds images.

    Symbolic links to folders are followed (datasets are often assembled from links), each real folder once.
    """
    classes: dict[str, list[str]] = {}
    seen: set[str] = set()
    for directory, subdirectories, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subdirectories[:] = []
            continue
        seen.add(real)
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        names = sorted(
            name for name in files if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)
        )
        if not names:
            continue
        name = Path(directory).relative_to(root).as_posix()
        if name == ".":
            raise FsltoolError(f"folder root {root}: holds images directly; put each class's images in its own folder")
        classes[name] = [os.path.join(directory, image) for image in names]
    return classes


def read_split_lists(lists: str, known: set[str]) -> dict[str, str]:
    """Class name -> split from ``<lists>/{train,val,test}.txt`` (one class per line); unlisted classes are left out."""
    require_folder(lists, "split_lists")
    splits: dict[str, str] = {}
    where: dict[str, str] = {}
    for split in SPLITS:
        path = os.path.join(lists, f"{split}.txt")
        if not os.path.isfile(path):
            raise FsltoolError(f"split_lists {lists}: missing {path}")
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                name = line.strip().rstrip("/")
                if not name:
                    continue
                here = f"{path}:{number}"
                if name not in known:
                    raise FsltoolError(f"{here}: class {name!r} is not a class folder under the root")
                if name in where:
                    raise FsltoolError(f"{here}: class {name!r} is already listed at {where[name]}")
                splits[name], where[name] = split, here
    if not splits:
        raise FsltoolError(f"split_lists {lists}: the lists name no class")
    return splits
