"""The GPU-facing paths, checked on the CPU (docs/gpu.md): where images are assembled and how they move (pinned,
non-blocking, uint8 until on the device: only when the target is CUDA), the prefetch thread's stream protocol,
data_on_device, the CUDA settings made in one place, work sizes per device, and ONNX Runtime's CUDA provider options.
Where CUDA itself would run, torch's CUDA calls are replaced by recorders: these tests check the calls fsltool makes,
not what a GPU does with them (scripts/gpu_check.py does that on a GPU machine)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fsltool.data.batches import MetaBatches
from fsltool.data.episodes import Episode, EpisodeShape
from fsltool.data.store import FewShotData, keeps_on_device
from fsltool.data.transfer import Prefetcher
from fsltool.device import WORK_SIZES, prepare_device, work_sizes
from fsltool.errors import FsltoolError
from fsltool.evaluate import embed_all
from fsltool.methods import build_method
from fsltool.models import build_backbone
from fsltool.recipe import load_recipe
from fsltool.runtime import CUDA_OPTIONS, bound_device, providers_for

GPU = torch.device("cuda", 1)
SHAPE = EpisodeShape(5, 2, 3)


class Moves:
    """Records host buffers asked for, pin_memory calls and ``Tensor.to`` moves, and lets a CPU tensor stand for its
    copy on the GPU (``to`` returns it unchanged): the CUDA path then runs on a machine without CUDA."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.buffers: list[tuple[torch.dtype, bool]] = []
        self.pinned: list[torch.dtype] = []
        self.moves: list[tuple[torch.dtype, torch.device, bool]] = []
        empty, to = torch.empty, torch.Tensor.to

        def fake_empty(*shape: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
            self.buffers.append((kwargs.get("dtype"), pin_memory))
            buffer = empty(*shape, **kwargs)
            buffer.pinned_here = pin_memory
            return buffer

        def fake_to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            device = args[0] if args else kwargs.get("device")
            if isinstance(device, torch.device) and device.type == "cuda":
                self.moves.append((tensor.dtype, device, kwargs.get("non_blocking", False)))
                return tensor
            return to(tensor, *args, **kwargs)

        def fake_pin(tensor: torch.Tensor) -> torch.Tensor:
            self.pinned.append(tensor.dtype)
            tensor.pinned_here = True
            return tensor

        monkeypatch.setattr(torch, "empty", fake_empty)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda tensor: getattr(tensor, "pinned_here", False))
        monkeypatch.setattr(torch.Tensor, "to", fake_to)
        monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)


@pytest.fixture
def data(synthetic_file: Path) -> Iterator[FewShotData]:
    with FewShotData(synthetic_file) as opened:
        yield opened


def indices(data: FewShotData) -> tuple[torch.Tensor, torch.Tensor]:
    return data.sampler("train", SHAPE, torch.Generator().manual_seed(0)).sample()


def test_cuda_bound_episodes_move_as_pinned_uint8_without_waiting(data: FewShotData, monkeypatch: pytest.MonkeyPatch) -> None:
    support, query = indices(data)
    on_cpu = data.episode(support, query, SHAPE)
    moves = Moves(monkeypatch)
    episode = data.episode(support, query, SHAPE, GPU)
    images = SHAPE.way * (SHAPE.shot + SHAPE.query)
    assert (torch.uint8, True) in moves.buffers  # the gather lands in a pinned host buffer
    assert moves.pinned == [torch.int64, torch.int64]  # the two label tensors are pinned before they move
    assert moves.moves[-1] == (torch.uint8, GPU, True)  # images cross as uint8, non_blocking ...
    assert episode.support.dtype == torch.float32  # ... and become float after the move
    assert all(non_blocking for _, _, non_blocking in moves.moves) and len(moves.moves) == 3
    assert len(episode.support) + len(episode.query) == images
    for key in ("support", "support_labels", "query", "query_labels"):
        assert torch.equal(getattr(episode, key), getattr(on_cpu, key))


def test_cpu_episodes_pin_nothing_and_move_nothing(data: FewShotData, monkeypatch: pytest.MonkeyPatch) -> None:
    moves = Moves(monkeypatch)
    episode = data.episode(*indices(data), SHAPE, torch.device("cpu"))
    assert moves.buffers == [(torch.uint8, False)] and moves.pinned == [] and moves.moves == []
    assert episode.support.device == torch.device("cpu") and 0.0 <= float(episode.support.min()) <= float(episode.support.max()) <= 1.0


def test_images_kept_on_the_device_are_gathered_there(synthetic_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data file read per episode and one kept whole (keep_on) give the same episodes; keeping it on a device
    (here the CPU, the only one there is) moves only the indices, never the images."""
    with FewShotData(synthetic_file, in_memory_limit=0) as lazy, FewShotData(synthetic_file, in_memory_limit=0) as kept:
        assert not kept.in_memory
        kept.keep_on(torch.device("cpu"))
        assert kept.in_memory and kept.device == torch.device("cpu")
        support, query = indices(lazy)
        assert torch.equal(lazy.episode(support, query, SHAPE).query, kept.episode(support, query, SHAPE).query)


@pytest.mark.parametrize(("setting", "device", "image_bytes", "expected"), [
    ("auto", "cpu", 10**12, False),  # the CPU: as the file opens
    (True, "cpu", 10**12, True),  # in memory whatever the size
    (False, "cpu", 10, False),
    ("auto", "cuda", 2 * 2**30, True),  # 2 of 16 GiB free: within the quarter
    ("auto", "cuda", 5 * 2**30, False),  # beyond it
    (True, "cuda", 12 * 2**30, True),  # asked for, and fits
    (False, "cuda", 10, False),
])
def test_data_on_device(setting: str | bool, device: str, image_bytes: int, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 * 2**30, 80 * 2**30))
    assert keeps_on_device(setting, torch.device(device), image_bytes) is expected


def test_data_on_device_true_that_does_not_fit_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    with pytest.raises(FsltoolError, match=r"'data_on_device': true, but the images \(3.00 GiB\) do not fit in the 1.00 GiB free on cuda:1"):
        keeps_on_device(True, GPU, 3 * 2**30)


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("auto", "auto")])
def test_data_on_device_recipe_values(text: str, expected: object, tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("data: d.h5\noutput: out\n")
    assert load_recipe(path, [f"data_on_device={text}"]).data_on_device == expected
    for bad, message in (("yes-please", "is not one of auto, true, false"), ("1", "expected str or bool, got 1")):
        with pytest.raises(FsltoolError, match=message):
            load_recipe(path, [f"data_on_device={bad}"])


class FakeStream:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def record_event(self) -> str:
        self.log.append(f"{self.name}: record event")
        return f"event of {self.name}"

    def wait_event(self, event: str) -> None:
        self.log.append(f"{self.name}: wait for {event}")


def test_prefetch_on_cuda_uses_its_own_stream_and_hands_batches_over_safely(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread assembles inside its own stream and records an event after; collecting makes the step's stream
    wait for that event and marks every tensor of the batch as used by the step's stream."""
    log: list[str] = []
    side, step = FakeStream("side", log), FakeStream("step", log)
    current = [step]

    class StreamContext:
        def __init__(self, stream: FakeStream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            current.append(self.stream)

        def __exit__(self, *exc: object) -> None:
            current.pop()

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: log.append(f"{tuple(tensor.shape)} used by {stream.name}"))

    def assemble() -> list[Episode]:
        log.append(f"assemble on {current[-1].name}")
        images, labels = torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
        return [Episode(images, labels, images[:1], labels[:1], EpisodeShape(2, 1, 1))]

    prefetcher: Prefetcher[list[Episode]] = Prefetcher(GPU)
    try:
        collect = prefetcher.submit(assemble)
        batch = collect()
    finally:
        prefetcher.close()
    assert len(batch) == 1
    assert log == ["assemble on side", "side: record event", "step: wait for event of side",
                   "(2, 1, 4, 4) used by step", "(2,) used by step", "(1, 1, 4, 4) used by step", "(1,) used by step"]


def test_prefetched_meta_batches_equal_unprefetched_ones_on_the_cpu(data: FewShotData) -> None:
    def episodes(prefetch: bool) -> list[torch.Tensor]:
        batches = MetaBatches(data, data.sampler("train", SHAPE, torch.Generator().manual_seed(3)), 2, range(2), 3,
                              prefetch=prefetch, device=torch.device("cpu"))
        try:
            return [episode.query for _ in range(3) for episode in batches.next()]
        finally:
            batches.close()

    assert all(torch.equal(a, b) for a, b in zip(episodes(True), episodes(False), strict=True))


@pytest.fixture
def cuda_settings() -> Iterator[None]:
    """Restores the process-wide settings prepare_device changes."""
    precisions = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    saved = torch.backends.cudnn.benchmark, [backend.fp32_precision for backend in precisions]
    yield
    torch.backends.cudnn.benchmark = saved[0]
    for backend, value in zip(precisions, saved[1]):
        backend.fp32_precision = value


@pytest.mark.usefixtures("cuda_settings")
def test_prepare_device_sets_tf32_off_and_the_autotuner_on_cuda_only() -> None:
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.conv.fp32_precision)
    prepare_device(torch.device("cpu"), repeating_shapes=True)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.conv.fp32_precision) == before
    prepare_device(GPU, repeating_shapes=True)
    assert torch.backends.cudnn.benchmark is True
    assert {torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision} == {"ieee"}
    prepare_device(GPU, repeating_shapes=False)
    assert torch.backends.cudnn.benchmark is False


def test_work_sizes_follow_the_device(data: FewShotData, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's sizes are the ones measured there; a GPU gets its own; evaluation embeds in the device's batches."""
    assert work_sizes(torch.device("cpu")) is WORK_SIZES["cpu"] and work_sizes(GPU) is WORK_SIZES["cuda"]
    assert work_sizes(torch.device("meta")) is WORK_SIZES["cpu"]
    method = build_method("protonet", build_backbone("conv4", 1, [0.5], [0.5], hidden=4), {}).eval()
    sizes: list[int] = []
    embed = method.embed
    monkeypatch.setattr(method, "embed", lambda images: sizes.append(len(images)) or embed(images))
    count = 2 * WORK_SIZES["cpu"].embed_images + 7
    embed_all(method, data, np.arange(count), frozen=False)
    assert sizes == [WORK_SIZES["cpu"].embed_images] * 2 + [7]


def test_embedding_reads_blocks_and_embeds_their_passes_back_to_back(data: FewShotData, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation reads images a block of gather_bytes at a time (whole passes) and embeds the block's passes
    with nothing read between them; the embeddings are those of one call on all the images."""
    image_bytes = 4 * int(np.prod(data.image_shape))
    monkeypatch.setitem(WORK_SIZES, "cpu", dataclasses.replace(WORK_SIZES["cpu"], embed_images=4, gather_bytes=9 * image_bytes))
    method = build_method("protonet", build_backbone("conv4", 1, [0.5], [0.5], hidden=4), {}).eval()
    events: list[tuple[str, int]] = []
    read, embed = data.images, method.embed
    monkeypatch.setattr(data, "images", lambda indices, device=None: events.append(("read", len(indices))) or read(indices, device))
    monkeypatch.setattr(method, "embed", lambda images: events.append(("embed", len(images))) or embed(images))
    embeddings = embed_all(method, data, np.arange(19), frozen=False)
    assert events == [("read", 8), ("embed", 4), ("embed", 4), ("read", 8), ("embed", 4), ("embed", 4), ("read", 3), ("embed", 3)]
    with torch.inference_mode():
        assert torch.allclose(embeddings, embed(read(np.arange(19))), atol=1e-6)


def test_onnx_runtime_cuda_provider_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda:N runs on GPU N with the options for changing shapes (heuristic convolution search, TF32 off)."""
    monkeypatch.setattr("fsltool.runtime.cuda_can_run", lambda: True)
    assert providers_for("cuda:1") == [("CUDAExecutionProvider", {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}),
                                       "CPUExecutionProvider"]
    assert providers_for("cuda")[0] == ("CUDAExecutionProvider", {"device_id": "0", **CUDA_OPTIONS})
    assert providers_for("auto")[0][1]["device_id"] == "0"  # type: ignore[index]
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr("fsltool.runtime.cuda_can_run", lambda: False)
    assert providers_for("cuda:1") == ["CPUExecutionProvider"]  # reported by session_provider, as before
    with pytest.raises(FsltoolError, match="device 'gpu' is not one of auto, cpu, cuda, cuda:N"):
        providers_for("gpu")


def test_io_binding_follows_the_session_gpu() -> None:
    class Session:
        def __init__(self, providers: list[str], options: dict[str, dict[str, str]]) -> None:
            self.providers, self.options = providers, options

        def get_providers(self) -> list[str]:
            return self.providers

        def get_provider_options(self) -> dict[str, dict[str, str]]:
            return self.options

    cuda = Session(["CUDAExecutionProvider", "CPUExecutionProvider"], {"CUDAExecutionProvider": {"device_id": "1"}})
    assert bound_device(cuda) == ("cuda", 1)  # type: ignore[arg-type]
    assert bound_device(Session(["CPUExecutionProvider"], {})) == ("cpu", 0)  # type: ignore[arg-type]
