"""An exported model is used where fsltool is not installed: a fresh process with only onnxruntime and numpy (or
only torch for the TorchScript file) reads the contract from the file itself and gets PyTorch's predictions on
stored test episodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.export import export_run

# Blocks every import of these in the child process: the scripts below may use only what they import themselves.
BLOCK = "import sys\nfor name in {'fsltool', 'torch', 'onnxruntime'} - set(ALLOWED):\n    sys.modules[name] = None\n"

ONNX_ONLY = """
import json, sys
import numpy as np
import onnxruntime as ort
folder, episodes = sys.argv[1], np.load(sys.argv[2])
session = ort.InferenceSession(folder + "/classifier.onnx", providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map          # the contract travels inside the model
assert json.loads(meta["normalization"])["applied"] == "inside the graph" and int(meta["input_height"]) == 28
predictions = [session.run(None, {"support": s, "support_labels": episodes["labels"], "query": q})[0].argmax(-1).tolist()
               for s, q in zip(episodes["support"], episodes["query"])]
print(json.dumps({"modules": sorted(m for m in ("torch", "fsltool") if sys.modules.get(m)), "predictions": predictions}))
"""

TORCHSCRIPT_ONLY = """
import json, sys
import numpy as np
import torch
folder, episodes = sys.argv[1], np.load(sys.argv[2])
extra = {"fsltool.json": ""}
model = torch.jit.load(folder + "/classifier.ts", _extra_files=extra)
assert json.loads(extra["fsltool.json"])["input_channels"] == 1
with torch.inference_mode():
    predictions = [model(torch.from_numpy(s), torch.from_numpy(episodes["labels"]), torch.from_numpy(q)).argmax(-1).tolist()
                   for s, q in zip(episodes["support"], episodes["query"])]
print(json.dumps({"modules": sorted(m for m in ("onnxruntime", "fsltool") if sys.modules.get(m)), "predictions": predictions}))
"""


@pytest.fixture(scope="module")
def deployment(trained_run: Path, synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[list[int]]]:
    """The export folder, 10 stored 5w1s5q test episodes as plain arrays, and PyTorch's predictions on them."""
    folder = tmp_path_factory.mktemp("deploy")
    export_run(trained_run, folder / "model", verify_episodes=0)
    method = load_trained(trained_run).method
    shape = EpisodeShape(5, 1, 5)
    with FewShotData(synthetic_file) as data:
        support_idx, query_idx = data.stored_episodes("test", shape)
        episodes = [data.episode(s, q, shape) for s, q in zip(support_idx[:10], query_idx[:10])]
    np.savez(folder / "episodes.npz", support=np.stack([e.support.numpy() for e in episodes]),
             query=np.stack([e.query.numpy() for e in episodes]), labels=episodes[0].support_labels.numpy())
    with torch.inference_mode():
        expected = [method(e.support, e.support_labels, e.query).argmax(-1).tolist() for e in episodes]
    return folder / "model", folder / "episodes.npz", expected


@pytest.mark.parametrize(("script", "allowed"), [(ONNX_ONLY, ("onnxruntime",)), (TORCHSCRIPT_ONLY, ("torch",))], ids=["onnxruntime+numpy", "torch"])
def test_a_fresh_process_without_fsltool_gets_pytorchs_predictions(
    deployment: tuple[Path, Path, list[list[int]]], script: str, allowed: tuple[str, ...], tmp_path: Path
) -> None:
    model, episodes, expected = deployment
    program = tmp_path / "use_model.py"
    program.write_text(f"ALLOWED = {allowed!r}\n" + BLOCK + script)
    # -I: isolated mode, so neither the working folder nor PYTHONPATH puts fsltool on the path
    result = subprocess.run([sys.executable, "-I", str(program), str(model), str(episodes)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["modules"] == [] and report["predictions"] == expected
