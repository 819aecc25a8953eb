"""The ONNX Runtime commands' --device (auto | cpu | cuda | cuda:N): a bad name is one line, exit 2, before any work."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize("command", [["predict", "model", "support", "query.png"], ["export", "run"]])
def test_a_bad_onnx_runtime_device_is_one_line(command: list[str]) -> None:
    code, _, err = run_cli(*command, "--device", "gpu:1")
    assert code == 2 and "device 'gpu:1' is not one of auto, cpu, cuda, cuda:N" in err and len(err.strip().splitlines()) == 1
