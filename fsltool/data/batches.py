"""The training loops' supply: meta-batches of episodes drawn in order from one seeded sampler (meta-training), and
shuffled mini-batches of images (pretraining), each assembled on the run's device (fsltool.data.transfer);
either optionally assembled on a background thread while the previous step runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch

from fsltool.data.episodes import Episode, EpisodeSampler, EpisodeShape, TrainingShape
from fsltool.data.store import FewShotData
from fsltool.data.transfer import Prefetcher, upload

Indices = list[tuple[torch.Tensor, torch.Tensor]]
Drawn = tuple[EpisodeShape, Indices]  # one meta-batch: its shape and this process's episodes' indices
CPU = torch.device("cpu")


class MetaBatches:
    """Meta-batches of ``meta_batch`` episodes, of which this process assembles the positions in ``share`` (all of
    them in a one-process run; see fsltool.distributed). ``shapes`` gives each meta-batch's shape (a shot drawn per
    meta-batch from a range, or the sampler's one shape).

    The shape and the indices of every episode are drawn on the calling thread, in order, whatever the share and whether or not
    ``prefetch`` is on, so the episodes never depend on either. Episodes are assembled on ``device``. With
    ``prefetch`` the next meta-batch's images (HDF5 reads or a gather, the copy to the device, the float
    conversion) are assembled on a background thread while the caller trains on the current one.
    ``sampler_state`` is the generator state before the first meta-batch not yet handed out: what a checkpoint
    stores to resume exactly, prefetched or not.
    """

    def __init__(self, data: FewShotData, sampler: EpisodeSampler, meta_batch: int, share: range, count: int, *,
                 prefetch: bool, device: torch.device = CPU, shapes: TrainingShape | None = None) -> None:
        self._data, self._sampler, self._meta_batch, self._share, self._device = data, sampler, meta_batch, share, device
        shape = sampler.shape
        self._shapes = shapes or TrainingShape(shape.way, shape.shot, shape.shot, shape.query)
        self._remaining = count  # meta-batches still to hand out: nothing is drawn past the last one
        self._prefetcher: Prefetcher[list[Episode]] | None = Prefetcher(device) if prefetch else None
        self._pending: tuple[torch.Tensor, Callable[[], list[Episode]]] | None = None

    def _draw(self) -> tuple[torch.Tensor, Drawn]:
        state = self._sampler.generator.get_state()
        shape = self._shapes.draw(self._sampler.generator)
        drawn = [self._sampler.sample(shape) for _ in range(self._meta_batch)]
        return state, (shape, [drawn[position] for position in self._share])

    def _assemble(self, drawn: Drawn) -> list[Episode]:
        shape, indices = drawn
        return [self._data.episode(support, query, shape, self._device) for support, query in indices]

    def next(self) -> list[Episode]:
        """This process's episodes of the next meta-batch, on the device."""
        batch = self._pending[1]() if self._pending is not None else self._assemble(self._draw()[1])
        self._pending = None
        self._remaining -= 1
        if self._prefetcher is not None and self._remaining > 0:
            state, drawn = self._draw()
            self._pending = (state, self._prefetcher.submit(partial(self._assemble, drawn)))
        return batch

    def sampler_state(self) -> torch.Tensor:
        return self._pending[0] if self._pending is not None else self._sampler.generator.get_state()

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()


class ImageBatches:
    """Pretraining's supply: every image of ``classes`` once per epoch, in a random order drawn from (seed, epoch)
    alone, cut into batches of ``batch_size`` (the last, incomplete one dropped, so every step has the same
    BatchNorm batch size), each cut into ``micro_batches`` parts of which this process assembles those in
    ``share``. Labels number the classes in the order given. A batch is ``[(images, labels), ...]``, one pair per
    part of the share, on ``device``; with ``prefetch`` the next is assembled on a background thread during the
    step. Nothing here holds state beyond the epoch and step, so a run resumed at any step draws the same."""

    def __init__(self, data: FewShotData, classes: np.ndarray, batch_size: int, micro_batches: int, share: range,
                 seed: int, *, prefetch: bool, device: torch.device = CPU) -> None:
        self._data, self._share, self._seed, self._device = data, share, seed, device
        self._part = batch_size // micro_batches
        self._batch_size = batch_size
        starts, counts = data.class_start[classes], data.class_count[classes]
        self.indices = torch.from_numpy(np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)]))
        self.labels = torch.from_numpy(np.repeat(np.arange(len(classes)), counts))
        self.classes = len(classes)
        self.steps_per_epoch = len(self.indices) // batch_size
        self._prefetcher: Prefetcher[list[tuple[torch.Tensor, torch.Tensor]]] | None = Prefetcher(device) if prefetch else None

    def order(self, epoch: int) -> torch.Tensor:
        """The image order of ``epoch`` (1-based), from (seed, epoch) alone."""
        seed = np.random.SeedSequence([self._seed, epoch]).generate_state(1, dtype=np.uint64)[0]
        return torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(int(seed)))

    def _assemble(self, picks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parts = []
        for part in self._share:
            chosen = picks[part * self._part : (part + 1) * self._part]
            parts.append((self._data.images(self.indices[chosen], self._device), upload(self.labels[chosen], self._device)))
        return parts

    def epoch(self, epoch: int, start: int = 0) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The batches of ``epoch``, in order, from its ``start``-th (0-based: a run resumed within the epoch)."""
        order = self.order(epoch)
        picks = [order[step * self._batch_size : (step + 1) * self._batch_size] for step in range(start, self.steps_per_epoch)]
        prefetcher = self._prefetcher
        if prefetcher is None:
            yield from (self._assemble(chosen) for chosen in picks)
            return
        pending = prefetcher.submit(partial(self._assemble, picks[0])) if picks else None
        for step in range(len(picks)):
            batch = pending()  # type: ignore[misc]
            pending = prefetcher.submit(partial(self._assemble, picks[step + 1])) if step + 1 < len(picks) else None
            yield batch

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
