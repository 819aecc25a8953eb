from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fsltool.checkpoint import load_trained
from fsltool.errors import FsltoolError
from fsltool.export import export_run
from fsltool.runtime import OnnxModel, create_session, session_provider
from tests.conftest import assert_exported_classifier_matches


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("export")
    report = export_run(trained_run, out, verify_episodes=10)
    return out, report


def test_export_writes_onnx_torchscript_and_contract_and_verifies(exported: tuple[Path, object]) -> None:
    out, report = exported
    assert {p.name for p in out.iterdir()} == {"embedding.onnx", "embedding.ts", "classifier.onnx", "classifier.ts", "model.json"}
    verification = report.verification  # type: ignore[attr-defined]
    assert verification.episodes == 10 and verification.agreement == 1.0 and verification.max_abs_diff < 1e-3
    assert verification.provider == "CPUExecutionProvider" and 20 <= verification.accuracy <= 100
    contract = json.loads((out / "model.json").read_text())
    assert contract["input_height"] == 28 and contract["input_channels"] == 1 and contract["method"] == "protonet"
    metadata = {p.key: p.value for p in onnx.load(out / "classifier.onnx").metadata_props}
    assert metadata["method"] == "protonet" and json.loads(metadata["normalization"])["applied"] == "inside the graph"


@pytest.mark.parametrize(("way", "shot", "query"), [(2, 1, 1), (5, 1, 15), (7, 3, 4), (20, 5, 30)])
def test_classifier_graphs_have_dynamic_way_shot_query(exported: tuple[Path, object], trained_run: Path, way: int, shot: int, query: int) -> None:
    out, _ = exported
    assert_exported_classifier_matches(out, load_trained(trained_run).method, way, shot, query)


def test_embedding_graph_has_dynamic_batch(exported: tuple[Path, object], trained_run: Path) -> None:
    out, _ = exported
    method = load_trained(trained_run).method
    session = create_session(str(out / "embedding.onnx"), "cpu")
    assert session_provider(session) == "CPUExecutionProvider"
    for batch in (1, 37):
        images = torch.rand(batch, 1, 28, 28)
        with torch.inference_mode():
            expected = method.embed(images).numpy()
        np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], expected, rtol=1e-4, atol=1e-4)


def test_io_bound_runs_equal_plain_runs_and_chain_on_device(exported: tuple[Path, object]) -> None:
    """OnnxModel binds inputs and outputs to the session's device: same scores as a plain run, and embeddings
    kept on the device (OrtValues) feed the next call without a round trip through numpy."""
    out, _ = exported
    classifier, embedding = OnnxModel(str(out / "classifier.onnx"), "cpu"), OnnxModel(str(out / "embedding.onnx"), "cpu")
    support, labels, query = (np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32), np.arange(5),
                              np.random.default_rng(1).random((9, 1, 28, 28), dtype=np.float32))
    feeds = {"support": support, "support_labels": labels, "query": query}
    plain = create_session(str(out / "classifier.onnx"), "cpu").run(None, feeds)[0]
    np.testing.assert_array_equal(classifier.run(feeds)[0], plain)
    (on_device,) = embedding.run_on_device({"images": query})
    assert on_device.device_name() == "cpu" and on_device.shape()[0] == 9
    np.testing.assert_array_equal(on_device.numpy(), embedding.run({"images": query})[0])
    # an OrtValue input (here a CPU one) is bound as it is, without a copy
    np.testing.assert_array_equal(embedding.run({"images": ort.OrtValue.ortvalue_from_numpy(query)})[0], on_device.numpy())


def test_runtime_never_imports_torch() -> None:
    code = "import sys, fsltool.runtime; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_of_a_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match="no such run folder or checkpoint"):
        export_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FsltoolError, match="no best checkpoint in this run folder"):
        export_run(tmp_path / "empty")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(FsltoolError, match="not an fsltool checkpoint"):
        export_run(foreign)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(FsltoolError, match="not a readable fsltool checkpoint"):
        export_run(truncated)
