"""ONNX Runtime sessions, with no torch import: this module runs where only onnxruntime and numpy exist.

CUDA is requested only when it can really run (the provider is listed AND the NVIDIA driver loads);
otherwise ORT would try, print native errors about missing CUDA libraries, and fall back anyway. On CUDA the
session runs on the GPU ``--device cuda:N`` names, with options for graphs whose shapes change from call to call
(way, shot, batch): cuDNN's heuristic convolution choice, not ORT's default exhaustive search, which would be rerun
for every new input shape; and TF32 off, as in PyTorch (fsltool.device.prepare_device): fp32 means fp32.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from fsltool.errors import FsltoolError

with contextlib.suppress(AttributeError):
    ort.disable_telemetry_events()  # ORT writes telemetry to the user's cache folder by default

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICE_NAME = re.compile(r"auto|cpu|cuda(?::(\d+))?")  # as fsltool.device's, which imports torch
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence what native libraries write straight to file descriptor 2 (Python's stderr is unaffected)."""
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def cuda_can_run() -> bool:
    if CUDA not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    with quiet_native_stderr(), contextlib.suppress(Exception):
        ort.preload_dlls()  # finds CUDA/cuDNN libraries shipped by pip packages (e.g. torch's)
    return True


def device_index(device: str) -> int:
    """The GPU a device name asks for: N of ``cuda:N``; 0 for ``cuda`` and ``auto``."""
    match = DEVICE_NAME.fullmatch(device)
    if match is None:
        raise FsltoolError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    return int(match[1] or 0)


def providers_for(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """The execution providers a session on ``device`` asks for: CUDA (with its options) then the CPU where
    ``auto`` or ``cuda[:N]`` is asked for and CUDA can run, else the CPU alone."""
    index = device_index(device)
    if device == "cpu" or not cuda_can_run():
        return [CPU]
    return [(CUDA, {"device_id": str(index), **CUDA_OPTIONS}), CPU]


def create_session(model: str | bytes, device: str = "auto", *, spinning: bool = True) -> ort.InferenceSession:
    """A session for a model file path (or serialized bytes) on CUDA when asked for (or ``auto``) and it can run,
    else CPU; ``session_provider`` says which ran. ``spinning=False`` stops ONNX Runtime's CPU threads from
    busy-waiting between calls: right when other work (PyTorch's) runs between them, as in evaluation, where the
    spinning threads took the cores from it (600 Omniglot episodes: 4.6-5.7 s with spinning, 3.2-3.8 s without)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = providers_for(device)
    with quiet_native_stderr():
        return ort.InferenceSession(model, options, providers=providers)


def session_provider(session: ort.InferenceSession) -> str:
    """The provider that actually runs the graph (CUDA may have been asked for and silently dropped)."""
    return session.get_providers()[0]


def bound_device(session: ort.InferenceSession) -> tuple[str, int]:
    """Where a session's inputs and outputs are bound: ("cuda", the GPU it runs on) or ("cpu", 0)."""
    if session_provider(session) != CUDA:
        return "cpu", 0
    options: dict[str, Any] = session.get_provider_options()[CUDA]
    return "cuda", int(options["device_id"])


class OnnxModel:
    """An ONNX model run with I/O binding. Inputs go to the session's device once per call and outputs are
    allocated there: on CUDA the images cross the bus in and the scores out, nothing else; with
    ``on_device=True`` the outputs stay on the device as OrtValues (e.g. embeddings from embedding.onnx) and can
    be fed to the next call as they are. On CPU the same calls bind the numpy buffers without copying."""

    def __init__(self, model: str | bytes, device: str = "auto", *, spinning: bool = True) -> None:
        self.session = create_session(model, device, spinning=spinning)
        self.provider = session_provider(self.session)
        self.device, self.device_id = bound_device(self.session)
        self.output_names = [output.name for output in self.session.get_outputs()]

    def _bind(self, feeds: Mapping[str, np.ndarray | ort.OrtValue]) -> ort.IOBinding:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if not isinstance(value, ort.OrtValue):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, self.device_id)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        return binding

    def run(self, feeds: Mapping[str, np.ndarray | ort.OrtValue]) -> list[np.ndarray]:
        """The outputs as numpy arrays (copied back from the device once, at the end)."""
        return self._bind(feeds).copy_outputs_to_cpu()

    def run_on_device(self, feeds: Mapping[str, np.ndarray | ort.OrtValue]) -> list[ort.OrtValue]:
        """The outputs as OrtValues left on the session's device."""
        return self._bind(feeds).get_outputs()
