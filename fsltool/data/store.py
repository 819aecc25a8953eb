"""Reading a packed HDF5 data file: images, the class index, splits and stored episodes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from fsltool.data.episodes import Episode, EpisodeSampler, EpisodeShape, check_split_fits, episode_labels
from fsltool.data.transfer import host_buffer, unit_float, upload
from fsltool.errors import FsltoolError

FORMAT_NAME = "fsltool-fewshot"
FORMAT_VERSION = 1
# Bytes of images loaded whole (Omniglot at 28x28: 25 MB). Larger image sets (miniImageNet: 1.3 GB) are read from
# HDF5 per episode, so a training or evaluation process holds only its episodes and HDF5's chunk cache.
IN_MEMORY_LIMIT = 512 * 2**20
# Recipe key data_on_device, auto: the whole image array on a GPU when it takes at most this share of the GPU's free
# memory (the rest is the training step's: activations, gradients, optimizer state).
DEVICE_MEMORY_SHARE = 0.25


class FewShotData:
    """An open data file. Small image sets live in memory as one uint8 tensor (a gather is then the whole
    cost of assembling an episode); larger ones are read from HDF5 per episode with sorted indices."""

    def __init__(self, path: str | Path, in_memory_limit: int = IN_MEMORY_LIMIT) -> None:
        self.path = str(path)
        if not Path(path).is_file():
            raise FsltoolError(f"{path}: data file not found")
        try:
            # No HDF5 file lock: several processes (torchrun ranks, parallel evaluations) read one file at once, on
            # file systems without lock support too; a data file is never modified in place (pack writes a new
            # file and renames it), so a reader cannot see a half-written one.
            self._file = h5py.File(path, "r", locking=False)
        except OSError as error:
            raise FsltoolError(f"{path}: not a readable HDF5 file ({error})") from None
        try:
            self._read_index()
        except (KeyError, OSError, ValueError) as error:
            self._file.close()
            raise FsltoolError(f"{path}: damaged fsltool data file ({error})") from None
        dataset = self._file["images"]
        self._images: torch.Tensor | None = None
        self._lazy = dataset
        if dataset.size <= in_memory_limit:
            try:
                self._images = torch.from_numpy(dataset[...])
            except OSError as error:
                raise FsltoolError(f"{path}: damaged image data ({error})") from None

    def _read_index(self) -> None:
        attrs = self._file.attrs
        if attrs.get("format") != FORMAT_NAME:
            raise FsltoolError(f"{self.path}: not an fsltool data file (no '{FORMAT_NAME}' format attribute)")
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise FsltoolError(f"{self.path}: format version {version}, this fsltool reads {FORMAT_VERSION}")
        self.provenance: dict[str, Any] = json.loads(attrs["provenance"])
        self.mean = [float(v) for v in attrs["normalization_mean"]]
        self.std = [float(v) for v in attrs["normalization_std"]]
        self.image_shape = tuple(int(v) for v in self._file["images"].shape[1:])
        self.class_names = [name.decode() if isinstance(name, bytes) else name for name in self._file["classes/names"][...]]
        self.class_start = self._file["classes/start"][...].astype(np.int64)
        self.class_count = self._file["classes/count"][...].astype(np.int64)
        self.splits = {name: self._file[f"splits/{name}"][...].astype(np.int64) for name in self._file["splits"]}

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FewShotData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_memory(self) -> bool:
        """Whether the images were loaded whole (below the in-memory limit, or by keep_on) rather than read per episode."""
        return self._images is not None

    @property
    def device(self) -> torch.device:
        """Where the image array is kept: the CPU unless keep_on moved it."""
        return self._images.device if self._images is not None else torch.device("cpu")

    @property
    def image_bytes(self) -> int:
        return int(self._lazy.size)  # uint8: one byte per value

    def keep_on(self, device: torch.device) -> None:
        """Hold the whole image array on ``device`` (recipe key data_on_device), read from the file in blocks of at
        most IN_MEMORY_LIMIT bytes when it was not in memory, so the host never holds a second whole copy."""
        if self._images is not None:
            self._images = self._images.to(device)
            return
        kept = torch.empty(tuple(self._lazy.shape), dtype=torch.uint8, device=device)
        rows = max(1, IN_MEMORY_LIMIT // int(np.prod(self.image_shape)))
        try:
            for start in range(0, self.num_images, rows):
                kept[start : start + rows] = torch.from_numpy(self._lazy[start : start + rows])
        except OSError as error:
            raise FsltoolError(f"{self.path}: damaged image data ({error})") from None
        self._images = kept

    @property
    def num_images(self) -> int:
        return int(self._lazy.shape[0])

    def split_classes(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise FsltoolError(f"{self.path}: unknown split {split!r} (has: {', '.join(sorted(self.splits))})")
        return self.splits[split]

    def classes_of(self, splits: str | Sequence[str]) -> np.ndarray:
        """The classes of one split, or of several together (e.g. train + val, to retrain on both)."""
        names = [splits] if isinstance(splits, str) else list(splits)
        if len(set(names)) != len(names):
            raise FsltoolError(f"{self.path}: split list {names} names a split twice")
        return np.concatenate([self.split_classes(name) for name in names])

    def sampler(self, splits: str | Sequence[str], shape: EpisodeShape, generator: torch.Generator) -> EpisodeSampler:
        """An on-the-fly sampler over a split's classes (or several splits'), after checking every class can supply
        the shape."""
        classes = self.classes_of(splits)
        name = splits if isinstance(splits, str) else "+".join(splits)
        check_split_fits(name, shape, self.class_names, self.class_count, classes)
        return EpisodeSampler(self.class_start, self.class_count, classes, shape, generator)

    def stored_shapes(self, split: str) -> list[EpisodeShape]:
        group = self._file.get(f"episodes/{split}")
        return [] if group is None else [EpisodeShape.parse(name) for name in group]

    def stored_episodes(self, split: str, shape: EpisodeShape) -> tuple[np.ndarray, np.ndarray]:
        """Index arrays (episodes, way*shot) and (episodes, way*query) of a stored episode set."""
        key = f"episodes/{split}/{shape}"
        if key not in self._file:
            have = ", ".join(str(s) for s in self.stored_shapes(split)) or "none"
            raise FsltoolError(f"{self.path}: no stored {split} episodes of shape {shape} (stored: {have})")
        group = self._file[key]
        return group["support"][...].astype(np.int64), group["query"][...].astype(np.int64)

    def images(self, indices: torch.Tensor | np.ndarray, device: torch.device | None = None) -> torch.Tensor:
        """Images at ``indices`` as float32 in [0, 1] on ``device`` (default: where the array is kept), gathered as
        uint8 (into pinned memory when bound for CUDA), moved, and converted to float on ``device``."""
        target = self.device if device is None else device
        return unit_float(upload(self._gather(torch.as_tensor(indices, dtype=torch.long), target), target))

    def _gather(self, indices: torch.Tensor, target: torch.device) -> torch.Tensor:
        """uint8 images at ``indices``: on the array's device where it is kept whole, else in a host buffer for
        ``target``."""
        if self._images is not None and self._images.device != torch.device("cpu"):
            return self._images[upload(indices, self._images.device)]
        raw = host_buffer((len(indices), *self.image_shape), torch.uint8, target)
        if self._images is not None:
            return torch.index_select(self._images, 0, indices, out=raw)
        order = torch.argsort(indices)
        unique, inverse = torch.unique(indices[order], return_inverse=True)
        try:
            block = torch.from_numpy(self._read_rows(unique.numpy()))
        except OSError as error:
            raise FsltoolError(f"{self.path}: damaged image data ({error})") from None
        raw[order] = block[inverse]
        return raw

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Images at sorted, distinct ``rows``, read as one slice per run of consecutive rows: h5py's fancy
        indexing with a list measured 5x slower (100 random 84x84 RGB images: 410 ms against 84 ms)."""
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
        return np.concatenate([self._lazy[run[0] : run[-1] + 1] for run in runs])

    def episode(self, support: torch.Tensor | np.ndarray, query: torch.Tensor | np.ndarray, shape: EpisodeShape,
                device: torch.device | None = None) -> Episode:
        """Assemble an episode from index arrays (ordered class by class), on ``device`` (default: where the array
        is kept)."""
        target = self.device if device is None else device
        support_labels, query_labels = (upload(labels, target) for labels in episode_labels(shape))
        both = torch.cat([torch.as_tensor(support), torch.as_tensor(query)])
        images = self.images(both, target)
        n_support = shape.way * shape.shot
        return Episode(images[:n_support], support_labels, images[n_support:], query_labels, shape)

    def describe(self) -> dict[str, Any]:
        """A summary for `info` and logs."""
        return {
            "path": self.path,
            "images": self.num_images,
            "image_shape": list(self.image_shape),
            "classes": len(self.class_names),
            "splits": {name: len(classes) for name, classes in self.splits.items()},
            "stored_episodes": {split: [str(s) for s in self.stored_shapes(split)] for split in self.splits},
            "provenance": self.provenance,
        }


def keeps_on_device(setting: str | bool, device: torch.device, image_bytes: int) -> bool:
    """Whether recipe key ``data_on_device`` keeps an image array of ``image_bytes`` whole on ``device``. ``auto``:
    on a CUDA device when it takes at most DEVICE_MEMORY_SHARE of its free memory; on the CPU, as the file opens
    (in memory up to IN_MEMORY_LIMIT, else read per episode). ``true``: on ``device`` whatever its size (on the
    CPU: in memory even above the limit; on a GPU: an error when it does not fit in free memory). ``false``: never
    on a GPU, and on the CPU as the file opens."""
    if setting is False or (setting == "auto" and device.type == "cpu"):
        return False
    if device.type != "cuda":
        return True
    free = torch.cuda.mem_get_info(device)[0]
    if setting == "auto":
        return image_bytes <= DEVICE_MEMORY_SHARE * free
    if image_bytes > free:
        raise FsltoolError(f"recipe key 'data_on_device': true, but the images ({image_bytes / 2**30:.2f} GiB) do not fit in "
                           f"the {free / 2**30:.2f} GiB free on {device}; use auto or false")
    return True


def open_for_run(path: str | Path, data_on_device: str | bool, device: torch.device) -> FewShotData:
    """A training run's data file, its image array placed as recipe key ``data_on_device`` says."""
    data = FewShotData(path)
    try:
        if keeps_on_device(data_on_device, device, data.image_bytes):
            data.keep_on(device)
    except BaseException:
        data.close()
        raise
    return data
