"""Prediction from an exported model with ONNX Runtime alone, and from a run with PyTorch: same answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.export import export_run
from fsltool.predict import predict_torch


@pytest.fixture(scope="module")
def image_folders(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A support folder (3 test classes x 2 PNGs) and a query folder (2 more images of each), as a user has them."""
    root = tmp_path_factory.mktemp("images")
    support, queries, truth = root / "support", root / "queries", []
    queries.mkdir()
    with FewShotData(synthetic_file) as data:
        for cls in data.splits["test"][:3]:
            name = data.class_names[cls].replace("/", "_")
            (support / name).mkdir(parents=True)
            start = int(data.class_start[cls])
            pixels = (data.images(np.arange(start, start + 4)).numpy() * 255).round().astype(np.uint8)
            for i in range(2):
                Image.fromarray(pixels[i, 0]).save(support / name / f"{i}.png")
            for i in range(2, 4):
                Image.fromarray(pixels[i, 0]).save(queries / f"{name}-{i}.png")
                truth.append(name)
    return support, queries, truth


def test_onnx_prediction_needs_no_torch_and_matches_pytorch(trained_run: Path, image_folders: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    export_dir = tmp_path / "export"
    export_run(trained_run, export_dir, verify_episodes=0)
    support, queries, _ = image_folders
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "from fsltool.cli import main\n"
        f"main(['predict', {str(export_dir)!r}, {str(support)!r}, {str(queries)!r}, '--json', '--device', 'cpu'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    onnx = json.loads(result.stdout)
    assert onnx["provider"] == "CPUExecutionProvider"
    torch_predictions = predict_torch(trained_run, str(support), [str(queries)])
    assert [p["label"] for p in onnx["predictions"]] == [p.label for p in torch_predictions]
    np.testing.assert_allclose([p["probability"] for p in onnx["predictions"]], [p.probability for p in torch_predictions], atol=1e-4)
    assert all(0 < p["probability"] <= 1 for p in onnx["predictions"])


def test_prediction_input_errors(trained_run: Path, image_folders: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    support, queries, _ = image_folders
    with pytest.raises(FsltoolError, match="support folder not found"):
        predict_torch(trained_run, str(tmp_path / "none"), [str(queries)])
    lonely = tmp_path / "lonely"
    (lonely / "only").mkdir(parents=True)
    with pytest.raises(FsltoolError, match="class folder has no images"):
        predict_torch(trained_run, str(lonely), [str(queries)])
    with pytest.raises(FsltoolError, match="query image or folder not found"):
        predict_torch(trained_run, str(support), [str(tmp_path / "q.png")])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    with pytest.raises(FsltoolError, match="broken.png: unreadable image"):
        predict_torch(trained_run, str(support), [str(broken)])
