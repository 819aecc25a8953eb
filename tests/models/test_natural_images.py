"""The natural-image pipeline end to end on the embedded RGB set: prepare --colour, meta-train a ResNet-12
ProtoNet with augmentation and the modern optimisation keys, evaluate, export, and ONNX Runtime agreeing with
PyTorch at dynamic way, shot and query."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from fsltool.checkpoint import load_trained
from fsltool.export import export_run
from fsltool.runtime import create_session


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rgb")
    data = root / "rgb.h5"
    code, _, err = run_cli("prepare", "synthetic", str(data), "--colour", "--size", "32", "--classes", "40",
                           "--images-per-class", "8", "--episodes", "10", "--shapes", "5w1s", "--query", "5", "--quiet")
    assert code == 0, err
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""
data: {data}
output: {root / "run"}
backbone: resnet12
backbone_options: {{widths: [8, 12, 16, 20], drop_rate: 0.1}}
train: {{shape: 5w1s3q, episodes: 6, log_every: 3, optimizer: adamw, weight_decay: 0.0005, lr_schedule: cosine, warmup: 2,
         clip_grad_norm: 5.0, augment: {{kind: natural}}}}
validation: {{shape: 5w1s5q, every: 6, episodes: 10}}
test_shape: 5w1s5q
""")
    code, _, err = run_cli("meta-train", str(recipe), "--quiet")
    assert code == 0, err
    return root / "run"


def test_rgb_resnet12_run_evaluates(rgb_run: Path) -> None:
    code, out, err = run_cli("evaluate", str(rgb_run))
    assert code == 0, err
    assert "5w1s5q" in out and "stored test episodes" in out


@pytest.mark.parametrize(("way", "shot", "query"), [(2, 1, 1), (5, 1, 15), (7, 3, 4)])
def test_resnet12_export_matches_pytorch_at_dynamic_shapes(rgb_run: Path, tmp_path: Path, way: int, shot: int, query: int) -> None:
    report = export_run(rgb_run, tmp_path, verify_episodes=5)
    assert report.verification.agreement == 1.0  # type: ignore[attr-defined]
    method = load_trained(rgb_run).method
    generator = torch.Generator().manual_seed(way + shot)
    support, queries = torch.rand(way * shot, 3, 32, 32, generator=generator), torch.rand(query, 3, 32, 32, generator=generator)
    labels = torch.arange(way).repeat_interleave(shot)
    with torch.inference_mode():
        expected = method(support, labels, queries).numpy()
    session = create_session(str(tmp_path / "classifier.onnx"), "cpu")
    got = session.run(None, {"support": support.numpy(), "support_labels": labels.numpy(), "query": queries.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
