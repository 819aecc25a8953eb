"""Moving assembled images to the run's device.

Bound for CUDA, images are gathered as uint8 into pinned (page-locked) host memory, copied with ``non_blocking``
(an asynchronous copy the host does not wait for; from pageable memory the same call waits) and converted to float
on the device: a quarter of float32's bytes cross the bus. On the CPU nothing moves and nothing is pinned (pinned
memory needs an accelerator): the same gather and conversion as ever. The prefetch thread assembles the next batch
on a CUDA stream of its own, so its copies overlap the step's kernels, and the step's stream waits for them (an
event) before it reads the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


def pins(device: torch.device) -> bool:
    """Whether host buffers bound for ``device`` are pinned: only for CUDA."""
    return device.type == "cuda"


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor to assemble data bound for ``device`` in (pinned for CUDA)."""
    return torch.empty(shape, dtype=dtype, pin_memory=pins(device))


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: itself where it already is; to CUDA from pinned memory, without waiting; anywhere
    else with a plain copy (a non-blocking copy to the CPU could be read before it has landed)."""
    if tensor.device == device:
        return tensor
    if not pins(device):
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def unit_float(raw: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1], computed where ``raw`` lives (normalisation happens inside the model)."""
    return raw.float().div_(255.0)


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a batch: a tensor, or lists, tuples and dataclasses (Episode) of them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from tensors_in(getattr(value, field.name))


class Prefetcher(Generic[T]):
    """Runs batch assembly on one background thread while the caller trains on the previous batch.

    For a CUDA ``device`` the thread issues its copies and conversions on a stream of its own and records an event
    after them. Collecting a batch makes the caller's current stream wait for that event (the host does not wait)
    and marks each of the batch's tensors as used on that stream (``record_stream``): they were allocated on the
    side stream, and without it the caching allocator could hand their memory to the next prefetch while the step
    still reads them. Every tensor of an assembled batch must be on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fsltool-prefetch")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def submit(self, assemble: Callable[[], T]) -> Callable[[], T]:
        """Start ``assemble`` on the thread; the returned callable waits for its batch and hands it over."""
        future = self._executor.submit(self._run, assemble)
        return lambda: self._collect(*future.result())

    def _run(self, assemble: Callable[[], T]) -> tuple[T, torch.cuda.Event | None]:
        if self._stream is None:
            return assemble(), None
        with torch.cuda.stream(self._stream):
            return assemble(), self._stream.record_event()

    def _collect(self, batch: T, ready: torch.cuda.Event | None) -> T:
        if ready is not None:
            consumer = torch.cuda.current_stream(self._device)
            consumer.wait_event(ready)
            for tensor in tensors_in(batch):
                tensor.record_stream(consumer)
        return batch

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
