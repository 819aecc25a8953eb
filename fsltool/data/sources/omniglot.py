"""Omniglot from the official zips (or their extracted folders), split by one of three protocols.

``vinyals``: Vinyals et al. (2016), the lists published with the Prototypical Networks code, written as a rule:
1028 train / 172 val / 423 test characters drawn from both zips.

``lake``: Lake et al. (2015, 2019), the Omniglot challenge's own split (the data's background/evaluation zips):
learn from the 30 background alphabets (images_background, 964 characters), test on the 20 evaluation alphabets
(images_evaluation, 659 characters). The protocol names no validation set and allows only the background set for
model selection (brendenlake/omniglot README: only the background set may be used for "feature learning,
meta-learning, or hyperparameter inference"), so whole background alphabets are held out to validate, as public
Lake-protocol code does (tensorfreitas/Siamese-Networks-for-One-Shot-Learning: 6 of the 30, drawn anew each run).
Here they are fixed: the five background alphabets of the Vinyals validation split (Hebrew, Mkhedruli_(Georgian),
Armenian, Early_Aramaic, Bengali; 172 characters), leaving 25 (792 characters) to train, so every run validates on
the same classes, and both protocols on the same ones.

``random``: the characters of both zips shuffled with a seed and cut at the Vinyals split's counts (1028 train /
172 val / 423 test), so alphabets are shared between the splits. This is how the Relation Network, MAML and
MAML++ reference code split Omniglot (a seeded shuffle of the character folders: 1200 characters to train on,
the other 423 to test; MAML++ also holds some out to validate). Their exact lists follow the file system's listing
order and cannot be rebuilt; this split has their kind and counts, so a number measured on it can be set beside
theirs, and beside the same method's number on the alphabet-disjoint Vinyals split. ``split_counts`` (train, val,
test) cuts the same shuffle at other counts: the test characters are the first of the shuffle, so counts with the
same test count keep the same test characters (MAML's code: 1100 / 100 / 423; MAML++'s: 1150 / 50 / 423).

Resampling to 28x28: ``lanczos`` (the default) gives antialiased grey strokes. ``nearest`` gives the reference
code's images: the Prototypical Networks, MAML (and through its resized copy the Relation Network) and Reptile code
all resize the 1-bit PNGs with Pillow, which resizes a 1-bit image by nearest neighbour whatever filter is asked
(MAML asks for LANCZOS), so their 28x28 glyphs are binary, with jagged strokes.

Rotations: each character's images rotated by 90, 180 and 270 degrees are three more classes (Santoro et al.'s
augmentation, kept by every protocol above) in the splits of ``rotated_splits`` (default all). The Reptile
reference code rotates its training characters only and tests on the 423 others upright
(``rotated_splits=("train", "val")``).
"""

from __future__ import annotations

import os
import random
import re
import zipfile
import zlib
from collections.abc import Hashable, Iterator
from typing import Any

import numpy as np

from fsltool.data.images import IMAGE_SUFFIXES, RESAMPLING, decode_image
from fsltool.data.sources.base import (
    SPLITS,
    ClassSpec,
    SourceListing,
    check_image_options,
    check_image_shape,
    check_relative_path,
    require_folder,
)
from fsltool.errors import BadImageError, FsltoolError

PARTS = ("images_background", "images_evaluation")
ORIGINAL_SIZE = 105
ROTATIONS = (0, 90, 180, 270)
SPLIT_PROTOCOLS = ("vinyals", "lake", "random")
VINYALS_COUNTS = {"train": 1028, "val": 172, "test": 423}  # characters, of 1623: the random split's proportions

# The Vinyals split as published with the Prototypical Networks code (splits/vinyals/*.txt), written as a rule.
TEST_ALPHABETS = frozenset(
    {
        "Kannada",
        "Keble",
        "Malayalam",
        "Manipuri",
        "Mongolian",
        "Old_Church_Slavonic_(Cyrillic)",
        "Oriya",
        "Syriac_(Serto)",
        "Sylheti",
        "Tengwar",
        "Tibetan",
        "ULOG",
    }
)
# All five are background alphabets: the validation alphabets of the Lake split as well (module docstring).
VAL_ALPHABETS = frozenset({"Hebrew", "Mkhedruli_(Georgian)", "Armenian", "Early_Aramaic", "Bengali"})
TEST_GURMUKHI_CHARACTERS = range(42, 46)

_CHARACTER = re.compile(r"character(\d+)")

# An item: (container, member, rotation). The container is a zip path or an extracted top folder; member is the
# image's path inside it with '/' separators (the full zip member name, or the path relative to the folder).
Item = tuple[str, str, int]


def vinyals_split(alphabet: str, character: int) -> str:
    """The split of an Omniglot character (1-based number within its alphabet) in the standard Vinyals split."""
    if alphabet in TEST_ALPHABETS or (alphabet == "Gurmukhi" and character in TEST_GURMUKHI_CHARACTERS):
        return SPLITS[2]
    if alphabet in VAL_ALPHABETS:
        return SPLITS[1]
    return SPLITS[0]


def lake_split(part: str, alphabet: str) -> str:
    """The split of an Omniglot alphabet from ``part`` (images_background or images_evaluation) in the Lake split:
    evaluation alphabets test, the Vinyals validation alphabets validate, the other background alphabets train."""
    if part == PARTS[1]:
        return SPLITS[2]
    return SPLITS[1] if alphabet in VAL_ALPHABETS else SPLITS[0]


def random_split(characters: list[tuple[str, str]], seed: int,
                 counts: tuple[int, int, int] | None = None) -> dict[tuple[str, str], str]:
    """The random split (module docstring): ``characters`` shuffled by Python's seeded ``random.Random`` (stable
    across Python versions), the first test, the next val, the rest train, at ``counts`` (train, val, test
    characters, which must add up to all of them) or else the Vinyals split's proportions (exactly its counts on
    the whole of Omniglot; at least one character each)."""
    order = sorted(characters)
    random.Random(seed).shuffle(order)
    if counts is None:
        total = sum(VINYALS_COUNTS.values())
        test, val = (max(1, round(len(order) * VINYALS_COUNTS[split] / total)) for split in ("test", "val"))
    else:
        _check_split_counts(counts, len(order))
        _, val, test = counts
    return {key: SPLITS[2] if i < test else SPLITS[1] if i < test + val else SPLITS[0] for i, key in enumerate(order)}


def _check_split_counts(counts: tuple[int, int, int], characters: int) -> None:
    text = ",".join(map(str, counts))
    if len(counts) != 3 or any(count < 1 for count in counts):
        raise FsltoolError(f"omniglot --split-counts {text}: give three positive character counts, train,val,test")
    if sum(counts) != characters:
        raise FsltoolError(f"omniglot --split-counts {text}: they add up to {sum(counts)}, the source has {characters} characters")


def omniglot(*, root: str, rotations: bool = True, size: int | None = 28, split: str = "vinyals", split_seed: int = 1,
             split_counts: tuple[int, int, int] | None = None, resample: str = "lanczos",
             rotated_splits: tuple[str, ...] = SPLITS) -> SourceListing:
    """List Omniglot as classes ``Alphabet/characterNN/rotDDD``: grey, inverted (ink high), resized to ``size`` by
    ``resample`` (lanczos or nearest, module docstring), split by the ``split`` protocol (``vinyals``, ``lake`` or
    ``random`` with ``split_seed`` and ``split_counts``, module docstring), with rotated classes (``rotations``) in
    ``rotated_splits``.

    Each of the two parts is read from ``<root>/<part>.zip`` when present, else from the folder ``<root>/<part>/``.
    Listing reads only the zip directories and folder names; no image is decoded.
    """
    root = str(root)
    _check_options(split, resample, rotated_splits, split_counts)
    require_folder(root, "omniglot root")
    check_image_options(1, size)
    reader = _OmniglotReader(size, resample)
    characters, part_of, forms = _characters(root, reader)
    shuffled = random_split(list(characters), split_seed, split_counts) if split == "random" else {}
    classes = []
    for (alphabet, character), items in sorted(characters.items()):
        if split == "lake":
            class_split = lake_split(part_of[alphabet, character], alphabet)
        elif split == "random":
            class_split = shuffled[alphabet, character]
        else:
            class_split = vinyals_split(alphabet, int(character.removeprefix("character")))
        items.sort()
        for degrees in ROTATIONS if rotations and class_split in rotated_splits else ROTATIONS[:1]:
            name = f"{alphabet}/{character}/rot{degrees:03d}"
            classes.append(ClassSpec(name, class_split, tuple((c, m, degrees) for c, m, _ in items)))
    side = ORIGINAL_SIZE if size is None else size
    provenance: dict[str, Any] = {
        "source": "omniglot",
        "root": root,
        "rotations": rotations,
        **({"rotated_splits": [name for name in SPLITS if name in rotated_splits]} if rotations and set(rotated_splits) != set(SPLITS) else {}),
        "size": size,
        "form": forms,
        "split": split,
        **({"split_seed": split_seed} if split == "random" else {}),
        **({"split_counts": list(split_counts)} if split_counts is not None else {}),
        "resample": resample,
        "invert": True,  # stored ink-high: a user's dark-on-white image must be inverted the same way
    }
    return SourceListing(classes, (1, side, side), reader.load, reader.describe, provenance)


def _check_options(split: str, resample: str, rotated_splits: tuple[str, ...], split_counts: tuple[int, ...] | None) -> None:
    if split not in SPLIT_PROTOCOLS:
        raise FsltoolError(f"omniglot --split {split!r}: must be one of {', '.join(SPLIT_PROTOCOLS)}")
    if split_counts is not None and split != "random":
        raise FsltoolError(f"omniglot --split-counts: only --split random is cut at chosen counts (not --split {split})")
    if resample not in RESAMPLING:
        raise FsltoolError(f"omniglot --resample {resample!r}: must be one of {', '.join(RESAMPLING)}")
    unknown = [name for name in rotated_splits if name not in SPLITS]
    if unknown:
        raise FsltoolError(f"omniglot --rotated-splits {','.join(rotated_splits)!r}: {unknown[0]!r} is not one of {', '.join(SPLITS)}")


def _characters(root: str, reader: _OmniglotReader) -> tuple[dict[tuple[str, str], list[Item]], dict[tuple[str, str], str], dict[str, str]]:
    """Every (alphabet, character)'s images, the part (background or evaluation) it is in, and each part's form
    (zip or folder). A character in both parts, or no character at all, is refused."""
    characters: dict[tuple[str, str], list[Item]] = {}
    part_of: dict[tuple[str, str], str] = {}
    forms: dict[str, str] = {}
    for part in PARTS:
        zip_path, folder = os.path.join(root, f"{part}.zip"), os.path.join(root, part)
        if os.path.isfile(zip_path):
            forms[part], found = "zip", _zip_images(reader.zip_file(zip_path), zip_path, part)
        elif os.path.isdir(folder):
            forms[part], found = "folder", _folder_images(folder)
        else:
            raise FsltoolError(f"omniglot root {root}: neither {part}.zip nor an extracted {part}/ folder is there")
        part_characters: dict[tuple[str, str], list[Item]] = {}
        for alphabet, character, item in found:
            part_characters.setdefault((alphabet, character), []).append(item)
        for key in part_characters:
            if key in characters:
                raise FsltoolError(f"omniglot root {root}: character {'/'.join(key)} is in both {PARTS[0]} and {part}")
        characters.update(part_characters)
        part_of.update(dict.fromkeys(part_characters, part))
    if not characters:
        raise FsltoolError(f"omniglot root {root}: empty source, no character images found")
    return characters, part_of, forms


def _image_path(parts: list[str], where: str) -> tuple[str, str] | None:
    """(alphabet, characterNN) of ``<top>/<Alphabet>/characterNN/<image>``; None for files that are not images.

    Anything else that is an image is refused rather than skipped, so a wrong layout cannot drop data silently.
    """
    name = parts[-1]
    if name.startswith(".") or "__MACOSX" in parts or not name.lower().endswith(IMAGE_SUFFIXES):
        return None
    if len(parts) != 4 or not _CHARACTER.fullmatch(parts[2]):
        raise FsltoolError(f"{where}: not in the Omniglot layout <top>/<Alphabet>/characterNN/<image>")
    return parts[1], parts[2]


def _zip_images(archive: zipfile.ZipFile, zip_path: str, part: str) -> Iterator[tuple[str, str, Item]]:
    """Images in an official zip (top folder ``part``), from its central directory only."""
    for member in archive.namelist():
        where = f"{zip_path}:{member}"
        check_relative_path(member, where)
        if member.endswith("/"):
            continue
        parts = member.split("/")
        found = _image_path(parts, where)
        if found is not None:
            if parts[0] != part:
                raise FsltoolError(f"{where}: expected the top folder {part}/ of the official zip")
            yield found[0], found[1], (zip_path, member, 0)


def _folder_images(folder: str) -> Iterator[tuple[str, str, Item]]:
    """Images in an extracted top folder: ``<folder>/<Alphabet>/characterNN/<image>``."""
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        relative = os.path.relpath(directory, folder).replace(os.sep, "/")
        prefix = [os.path.basename(folder)] + ([] if relative == "." else relative.split("/"))
        for name in files:
            found = _image_path(prefix + [name], os.path.join(directory, name))
            if found is not None:
                yield found[0], found[1], (folder, "/".join(prefix[1:] + [name]), 0)


class _OmniglotReader:
    """``load`` and ``describe`` for Omniglot items: one ZipFile per zip per process, opened when first needed.

    The process id guards against a ZipFile inherited through fork (its file offset would be shared), and open zips
    are dropped when pickled to a worker process.
    """

    def __init__(self, size: int | None, resample: str) -> None:
        self.size = size
        self.resample = resample
        self.shape = (1, size or ORIGINAL_SIZE, size or ORIGINAL_SIZE)
        self._pid = os.getpid()
        self._zips: dict[str, zipfile.ZipFile] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zips": {}}

    def zip_file(self, path: str) -> zipfile.ZipFile:
        if self._pid != os.getpid():
            self._pid, self._zips = os.getpid(), {}
        if path not in self._zips:
            try:
                self._zips[path] = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as error:
                raise FsltoolError(f"{path}: cannot read the zip ({error})") from None
        return self._zips[path]

    def describe(self, item: Hashable) -> str:
        container, member, _ = item  # type: ignore[misc]
        if container.endswith(".zip"):
            return f"{container}:{member}"
        return os.path.join(container, *member.split("/"))

    def load(self, item: Hashable) -> np.ndarray:
        container, member, rotation = item  # type: ignore[misc]
        origin = self.describe(item)
        try:
            if container.endswith(".zip"):
                data = self.zip_file(container).read(member)
            else:
                with open(origin, "rb") as handle:
                    data = handle.read()
        except (zipfile.BadZipFile, zlib.error, KeyError, OSError) as error:
            raise BadImageError(origin, str(error) or type(error).__name__) from None
        array = decode_image(data, origin, channels=1, size=self.size, invert=True, rotation=rotation, resample=self.resample)
        check_image_shape(array, self.shape, origin)
        return array
