"""The training loop's supply of episodes: meta-batches drawn in order from one seeded sampler, optionally
assembled on a background thread while the previous meta-step runs."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fsltool.data.episodes import Episode, EpisodeSampler
from fsltool.data.store import FewShotData

Indices = list[tuple[torch.Tensor, torch.Tensor]]


class MetaBatches:
    """Meta-batches of ``meta_batch`` episodes, of which this process assembles the positions in ``share`` (all of
    them in a one-process run; see fsltool.distributed).

    The indices of every episode are drawn on the calling thread, in order, whatever the share and whether or not
    ``prefetch`` is on, so the episodes never depend on either. With ``prefetch`` the next meta-batch's images
    (HDF5 reads or an in-memory gather, then the float conversion) are assembled on a background thread while the
    caller trains on the current one. ``sampler_state`` is the generator state before the first meta-batch not yet
    handed out: what a checkpoint stores to resume exactly, prefetched or not.
    """

    def __init__(
        self, data: FewShotData, sampler: EpisodeSampler, meta_batch: int, share: range, count: int, *, prefetch: bool
    ) -> None:
        self._data, self._sampler, self._meta_batch, self._share = data, sampler, meta_batch, share
        self._remaining = count  # meta-batches still to hand out: nothing is drawn past the last one
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fsltool-prefetch") if prefetch else None
        self._pending: tuple[torch.Tensor, Future[list[Episode]]] | None = None

    def _draw(self) -> tuple[torch.Tensor, Indices]:
        state = self._sampler.generator.get_state()
        drawn = [self._sampler.sample() for _ in range(self._meta_batch)]
        return state, [drawn[position] for position in self._share]

    def _assemble(self, indices: Indices) -> list[Episode]:
        return [self._data.episode(support, query, self._sampler.shape) for support, query in indices]

    def next(self) -> list[Episode]:
        """This process's episodes of the next meta-batch."""
        if self._pending is not None:
            batch = self._pending[1].result()
        else:
            batch = self._assemble(self._draw()[1])
        self._pending = None
        self._remaining -= 1
        if self._executor is not None and self._remaining > 0:
            state, indices = self._draw()
            self._pending = (state, self._executor.submit(self._assemble, indices))
        return batch

    def sampler_state(self) -> torch.Tensor:
        return self._pending[0] if self._pending is not None else self._sampler.generator.get_state()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
