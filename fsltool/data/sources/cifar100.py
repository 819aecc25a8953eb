"""CIFAR-FS and FC100 from the CIFAR-100 python files, read with an unpickler that cannot run code.

Both benchmarks re-split all 600 images of each CIFAR-100 class (its 500 ``train`` and 100 ``test`` images) by
class. The files are pickles, and ``pickle.load`` runs whatever a crafted file asks for, so they are read with an
unpickler that admits only the numpy array pieces these files contain.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsltool.data.sources.base import ClassSpec, SourceListing, require_folder
from fsltool.data.sources.benchmarks import assign_splits, split_provenance
from fsltool.data.splits import BenchmarkSplit, benchmark_split
from fsltool.errors import FsltoolError

PARTS = ("train", "test")
SIDE = 32
PIXELS = 3 * SIDE * SIDE  # a row of b'data': 1024 red, then 1024 green, then 1024 blue values (C, H, W order)
LAYOUT = "<root>/cifar-100-python/{meta,train,test} (the extracted cifar-100-python.tar.gz)"
FOLDERS = ("cifar-100-python", ".")  # where meta, train and test are: below the root, or the root itself

# Every global a CIFAR-100 python file needs: numpy's array reconstructor (numpy.core in numpy 1, the files' own
# naming; numpy._core in numpy 2, as arrays pickled today name it), the array type and its dtype.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside ``_GLOBALS``."""


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only ``_GLOBALS``: any other callable a pickle names (os.system, eval, ...) is refused before it
    could be called."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def read_cifar_pickle(path: str) -> dict[bytes, Any]:
    """The dict a CIFAR-100 python file holds (bytes keys, as the files were written by Python 2)."""
    try:
        with open(path, "rb") as handle:
            content = _CifarUnpickler(handle, encoding="bytes").load()
    except _RefusedGlobal as error:
        raise FsltoolError(f"{path}: refusing this pickle: it calls {error}, which no CIFAR-100 file does") from None
    except OSError as error:
        raise FsltoolError(f"{path}: cannot read ({error.strerror or error})") from None
    except Exception as error:  # a damaged pickle can fail in any of pickle's many ways; each is one bad file
        raise FsltoolError(f"{path}: not a readable CIFAR-100 pickle ({type(error).__name__}: {error})") from None
    if not isinstance(content, dict):
        raise FsltoolError(f"{path}: holds a {type(content).__name__}, not the dict of a CIFAR-100 file")
    return content


def _entry(content: dict[bytes, Any], key: bytes, path: str) -> Any:
    if key not in content:
        raise FsltoolError(f"{path}: no {key.decode()!r} entry; not a CIFAR-100 python file")
    return content[key]


def _names(meta: dict[bytes, Any], key: bytes, path: str) -> list[str]:
    names = _entry(meta, key, path)
    if not isinstance(names, list) or not all(isinstance(name, (bytes, str)) for name in names):
        raise FsltoolError(f"{path}: {key.decode()!r} is not a list of names")
    return [name.decode() if isinstance(name, bytes) else name for name in names]


@dataclass(frozen=True, eq=False)  # arrays: compared and hashed by identity
class _Part:
    """One of the files train or test: its images (N, 3072) and fine and coarse label numbers (N,)."""

    path: str
    data: np.ndarray
    fine: np.ndarray
    coarse: np.ndarray


def _read_part(path: str, fine_classes: int, coarse_classes: int) -> _Part:
    """Read and check one file: uint8 rows of 3072 pixels, and one in-range fine and coarse label per row."""
    content = read_cifar_pickle(path)
    data = _entry(content, b"data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise FsltoolError(f"{path}: 'data' is not a uint8 array of {PIXELS} values per image")
    labels = []
    for key, count in ((b"fine_labels", fine_classes), (b"coarse_labels", coarse_classes)):
        values = np.asarray(_entry(content, key, path))
        if values.shape != (len(data),) or values.dtype.kind not in "iu" or not ((0 <= values) & (values < count)).all():
            raise FsltoolError(f"{path}: {key.decode()!r} is not one label in 0..{count - 1} per image")
        labels.append(values)
    return _Part(path, data, *labels)


def _cifar_folder(root: str) -> str:
    require_folder(root, "cifar root")
    for sub in FOLDERS:
        folder = os.path.normpath(os.path.join(root, sub))
        if all(os.path.isfile(os.path.join(folder, name)) for name in ("meta", *PARTS)):
            return folder
    raise FsltoolError(f"cifar root {root}: no meta, train and test files; expected {LAYOUT}")


def _check_superclasses(split: BenchmarkSplit, folder: str, parts: list[_Part], fine: list[str],
                        coarse: list[str]) -> None:
    """Where the split is defined by superclasses (FC100), each class must be in the superclass it is listed
    under, as these files label it: the shipped lists and the data must tell one story."""
    pairs = np.unique(np.concatenate([np.stack([part.fine, part.coarse]) for part in parts], axis=1), axis=1)
    superclass: dict[str, str] = {}
    for f, c in pairs.T:
        if fine[f] in superclass:
            raise FsltoolError(f"{folder}: class {fine[f]!r} is labelled with two superclasses")
        superclass[fine[f]] = coarse[c]
    for groups in split.groups.values():
        for group, names in groups.items():
            for name in names:
                if superclass.get(name, group) != group:
                    raise FsltoolError(f"{folder}: class {name!r} is in superclass {superclass[name]!r} here, "
                                       f"but the {split.name} split lists it under {group!r}")


@dataclass(frozen=True, eq=False)
class _CifarImages:
    """``load`` and ``describe`` for items (part, row)."""

    folder: str
    data: dict[str, np.ndarray]

    def load(self, item: Hashable) -> np.ndarray:
        part, row = item  # type: ignore[misc]
        return self.data[part][row].reshape(3, SIDE, SIDE)

    def describe(self, item: Hashable) -> str:
        part, row = item  # type: ignore[misc]
        return f"{os.path.join(self.folder, part)} image {row}"


def cifar100_benchmark(*, root: str, split: str, source: str) -> SourceListing:
    """The CIFAR-100 images of both files split by the built-in ``split``, at their 32x32 size."""
    root = str(root)
    builtin = benchmark_split(split)
    folder = _cifar_folder(root)
    meta_path = os.path.join(folder, "meta")
    meta = read_cifar_pickle(meta_path)
    fine, coarse = _names(meta, b"fine_label_names", meta_path), _names(meta, b"coarse_label_names", meta_path)
    parts = [_read_part(os.path.join(folder, part), len(fine), len(coarse)) for part in PARTS]
    if builtin.groups:
        _check_superclasses(builtin, folder, parts, fine, coarse)
    items: dict[str, list[tuple[str, int]]] = {}
    for name, part in zip(PARTS, parts):
        for row, label in enumerate(part.fine.tolist()):
            items.setdefault(fine[label], []).append((name, row))
    splits = assign_splits(items, builtin, folder, ignore_other_classes=False, layout=LAYOUT,
                           other_hint="; these are not the CIFAR-100 files (their 100 classes are all in the split)")
    classes = [ClassSpec(name, splits[name], tuple(items[name])) for name in splits]
    images = _CifarImages(folder, {name: part.data for name, part in zip(PARTS, parts)})
    provenance = {"source": source, "root": root, "files": [p.path for p in parts],
                  **split_provenance(builtin, len(items), len(splits))}
    return SourceListing(classes, (3, SIDE, SIDE), images.load, images.describe, provenance)


def cifar_fs(*, root: str) -> SourceListing:
    """CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20 CIFAR-100 classes."""
    return cifar100_benchmark(root=root, split="cifar-fs/bertinetto", source="cifar-fs")


def fc100(*, root: str) -> SourceListing:
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 12 / 4 / 4 superclasses of 5 classes each."""
    return cifar100_benchmark(root=root, split="fc100/oreshkin", source="fc100")
