"""ONNX Runtime sessions, with no torch import: this module runs where only onnxruntime and numpy exist.

CUDA is requested only when it can really run (the provider is listed AND the NVIDIA driver loads);
otherwise ORT would try, print native errors about missing CUDA libraries, and fall back anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator, Mapping

import numpy as np
import onnxruntime as ort

with contextlib.suppress(AttributeError):
    ort.disable_telemetry_events()  # ORT writes telemetry to the user's cache folder by default

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


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


def create_session(model: str | bytes, device: str = "auto") -> ort.InferenceSession:
    """A session for a model file path (or serialized bytes) on CUDA when asked for (or ``auto``) and it can run,
    else CPU; ``session_provider`` says which ran."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    use_cuda = device in ("auto", "cuda") and cuda_can_run()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = [CUDA, CPU] if use_cuda else [CPU]
    with quiet_native_stderr():
        return ort.InferenceSession(model, options, providers=providers)


def session_provider(session: ort.InferenceSession) -> str:
    """The provider that actually runs the graph (CUDA may have been asked for and silently dropped)."""
    return session.get_providers()[0]


class OnnxModel:
    """An ONNX model run with I/O binding. Inputs go to the session's device once per call and outputs are
    allocated there: on CUDA the images cross the bus in and the scores out, nothing else; with
    ``on_device=True`` the outputs stay on the device as OrtValues (e.g. embeddings from embedding.onnx) and can
    be fed to the next call as they are. On CPU the same calls bind the numpy buffers without copying."""

    def __init__(self, model: str | bytes, device: str = "auto") -> None:
        self.session = create_session(model, device)
        self.provider = session_provider(self.session)
        self.device = "cuda" if self.provider == CUDA else "cpu"
        self.output_names = [output.name for output in self.session.get_outputs()]

    def _bind(self, feeds: Mapping[str, np.ndarray | ort.OrtValue]) -> ort.IOBinding:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if not isinstance(value, ort.OrtValue):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding)
        return binding

    def run(self, feeds: Mapping[str, np.ndarray | ort.OrtValue]) -> list[np.ndarray]:
        """The outputs as numpy arrays (copied back from the device once, at the end)."""
        return self._bind(feeds).copy_outputs_to_cpu()

    def run_on_device(self, feeds: Mapping[str, np.ndarray | ort.OrtValue]) -> list[ort.OrtValue]:
        """The outputs as OrtValues left on the session's device."""
        return self._bind(feeds).get_outputs()
