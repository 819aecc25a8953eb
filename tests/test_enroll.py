"""Enrolled classifiers: one graph images -> scores with a support set's kept state as constants, equal to the
method's own forward on that support set; classes added and removed without recomputing the others; predict with
ONNX Runtime alone; bad input refused in one line with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from fsltool import enroll as enroll_module
from fsltool.checkpoint import build_model, load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.enroll import CLASS_STATES, NOT_ENROLLABLE, enroll_images
from fsltool.errors import FsltoolError
from fsltool.predict import predict_torch
from fsltool.runtime import create_session
from tests.conftest import quick_recipe, run_cli, trained

# The enrolled graph against the method's forward on the whole support set: the same function, but each class is
# embedded in its own batch and its state reduced alone, so float32 rounding differs a little (export's tolerance).
TOLERANCE = {"rtol": 1e-4, "atol": 1e-3}


@pytest.fixture(scope="module")
def runs(trained_run: Path, synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained run of each enrollable method (protonet: the shared run; the others: 8 quick episodes)."""
    root = tmp_path_factory.mktemp("runs")
    backbones = {"matchingnet": "conv4", "relationnet": "conv4-relation"}
    return {"protonet": trained_run} | {
        method: trained(quick_recipe(synthetic_file, root / method, method=method, backbone=backbone))
        for method, backbone in backbones.items()
    }


def test_every_enrollable_method_is_tested(runs: dict[str, Path]) -> None:
    assert set(runs) == set(CLASS_STATES)


def save_class(folder: Path, pixels: np.ndarray) -> None:
    """(K, 1, H, W) uint8 images as PNGs in ``folder``."""
    folder.mkdir(parents=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image[0]).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def folders(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five test classes as a user has them: ``first`` (3 classes x 3 PNGs; one class stored as 40x40 RGB, which
    the contract converts as predict does), ``more`` (2 other classes), ``all`` (the five), and ``queries``."""
    root = tmp_path_factory.mktemp("images")
    (root / "queries").mkdir()
    with FewShotData(synthetic_file) as data:
        for index, cls in enumerate(data.splits["test"][:5]):
            name = data.class_names[cls].replace("/", "_")
            start = int(data.class_start[cls])
            pixels = (data.images(np.arange(start, start + 5)).numpy() * 255).round().astype(np.uint8)
            for group in ("first" if index < 3 else "more", "all"):
                save_class(root / group / name, pixels[:3])
            if index == 1:  # another size and channel count: resized and converted to grey, like predict's support
                for group in ("first", "all"):
                    for i in range(3):
                        Image.fromarray(pixels[i, 0]).convert("RGB").resize((40, 40)).save(root / group / name / f"{i}.png")
            for i in (3, 4):
                Image.fromarray(pixels[i, 0]).save(root / "queries" / f"{name}-{i}.png")
    return {group: root / group for group in ("first", "more", "all", "queries")}


def onnx_scores(folder: Path, images: np.ndarray) -> np.ndarray:
    return create_session(str(folder / "classifier.onnx"), "cpu").run(None, {"images": images})[0]


@pytest.mark.parametrize("method", sorted(CLASS_STATES))
def test_enrolled_graph_scores_equal_the_support_set_classifier(
    method: str, runs: dict[str, Path], synthetic_file: Path, tmp_path: Path
) -> None:
    """On stored 5w5s5q test episodes: ONNX Runtime and TorchScript give the forward's scores on the same support set."""
    model = load_trained(runs[method])
    shape = EpisodeShape(5, 5, 5)
    with FewShotData(synthetic_file) as data:
        support_idx, query_idx = data.stored_episodes("test", shape)
        episodes = [data.episode(s, q, shape) for s, q in zip(support_idx[:2], query_idx[:2])]
    for number, episode in enumerate(episodes):
        classes = {f"class-{c}": episode.support[episode.support_labels == c].numpy() for c in range(shape.way)}
        out = tmp_path / f"episode-{number}"
        report = enroll_images(model, classes, out)
        assert report.classes == sorted(classes) and report.kept == CLASS_STATES[method].kept
        with torch.inference_mode():
            expected = model.method(episode.support, episode.support_labels, episode.query).numpy()
        got = onnx_scores(out, episode.query.numpy())
        np.testing.assert_allclose(got, expected, **TOLERANCE)
        assert (got.argmax(-1) == expected.argmax(-1)).all()
        extra = {"fsltool.json": ""}
        scripted = torch.jit.load(str(out / "classifier.ts"), _extra_files=extra)
        np.testing.assert_allclose(scripted(episode.query).detach().numpy(), expected, **TOLERANCE)
        assert json.loads(extra["fsltool.json"])["classes"] == sorted(classes)


def test_add_equals_enrolling_all_at_once_and_remove_drops_a_class(
    runs: dict[str, Path], folders: dict[str, Path], tmp_path: Path
) -> None:
    run, queries = str(runs["protonet"]), folders["queries"]
    images = np.stack([np.asarray(Image.open(p), dtype=np.float32)[None] / 255 for p in sorted(queries.iterdir())])
    at_once, in_steps = tmp_path / "at-once", tmp_path / "in-steps"
    assert run_cli("enroll", run, str(folders["all"]), "--out", str(at_once), "-q")[0] == 0
    assert run_cli("enroll", run, str(folders["first"]), "--out", str(in_steps), "-q")[0] == 0
    first_states = load_file(str(in_steps / "classes.safetensors"))
    code, out, _ = run_cli("enroll", run, str(folders["more"]), "--out", str(in_steps), "--add", "--json")
    assert code == 0 and json.loads(out)["added"] == sorted(p.name for p in folders["more"].iterdir())
    manifest = json.loads((in_steps / "enrolled.json").read_text())
    assert manifest["classes"] == json.loads((at_once / "enrolled.json").read_text())["classes"] == sorted(p.name for p in folders["all"].iterdir())
    states, all_states = load_file(str(in_steps / "classes.safetensors")), load_file(str(at_once / "classes.safetensors"))
    for name, state in states.items():  # the first classes read back, not recomputed; the new ones as if at once
        np.testing.assert_array_equal(state, first_states.get(name, all_states[name]))
        np.testing.assert_array_equal(state, all_states[name])
    np.testing.assert_array_equal(onnx_scores(in_steps, images), onnx_scores(at_once, images))

    dropped = manifest["classes"][1]
    code, out, _ = run_cli("enroll", run, "--out", str(in_steps), "--remove", dropped, "--json")
    assert code == 0 and json.loads(out)["removed"] == [dropped]
    kept = [c for c, name in enumerate(manifest["classes"]) if name != dropped]
    assert json.loads((in_steps / "enrolled.json").read_text())["classes"] == [manifest["classes"][c] for c in kept]
    np.testing.assert_array_equal(onnx_scores(in_steps, images), onnx_scores(at_once, images)[:, kept])


def test_enrolled_prediction_needs_no_torch_and_matches_the_support_folder(
    runs: dict[str, Path], folders: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "enrolled"
    assert run_cli("enroll", str(runs["protonet"]), str(folders["all"]), "--out", str(out), "-q")[0] == 0
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "from fsltool.cli import main\n"
        f"main(['predict', {str(out)!r}, {str(folders['queries'])!r}, '--json', '--device', 'cpu', '--top', '3'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    enrolled = json.loads(result.stdout)
    assert enrolled["provider"] == "CPUExecutionProvider"
    # the support-set classifier (PyTorch, the same folder converted by predict's contract) gives the same answers
    expected = predict_torch(runs["protonet"], str(folders["all"]), [str(folders["queries"])], top=3)
    for got, want in zip(enrolled["predictions"], expected, strict=True):
        assert got["label"] == want.label and [r["label"] for r in got["top"]] == [r.label for r in want.top]
        np.testing.assert_allclose([r["probability"] for r in got["top"]], [r.probability for r in want.top], atol=1e-4)
    code, text, _ = run_cli("predict", str(out), str(folders["queries"]), "--top", "2", "-q")
    assert code == 0 and all(len(line.split("\t")) == 5 for line in text.splitlines())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under the parent of ``folder`` (so a leftover staging folder, or a sibling a case made, shows too)."""
    return {str(p.relative_to(folder.parent)): p.read_bytes() for p in sorted(folder.parent.rglob("*")) if p.is_file()}


def checkpoint_of(run: Path, tmp: Path, method: str, options: dict[str, object]) -> Path:
    """A checkpoint of ``method`` with the run's backbone and data, its weights freshly initialised."""
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    state["model_config"] = {**state["model_config"], "method": method, "method_options": options}
    if method in NOT_ENROLLABLE or options:
        state["model"] = build_model(state["model_config"]).state_dict()
    path = tmp / f"{method}.pt"
    torch.save(state, path)
    return path


def write_broken_class(root: Path) -> None:
    (root / "ok").mkdir(parents=True)
    Image.new("L", (28, 28)).save(root / "ok" / "0.png")
    (root / "bad").mkdir()
    (root / "bad" / "broken.png").write_bytes(b"not a png")


def write_case_twins(root: Path) -> None:
    for name in ("Cat", "cat"):
        (root / name).mkdir(parents=True)
        Image.new("L", (28, 28)).save(root / name / "0.png")


def write_notes(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")


def write_16_bit_class(root: Path) -> None:
    (root / "deep").mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), dtype=np.uint16)).save(root / "deep" / "0.png")


BAD = {
    # name: (prepare(tmp, run, folders) -> enroll arguments after the command, expected message)
    "empty class folder": (lambda t, r, f: (t / "support" / "empty").mkdir(parents=True) or [str(r), str(t / "support")],
                           "empty: class folder has no images"),
    "unreadable image": (lambda t, r, f: write_broken_class(t / "support") or [str(r), str(t / "support")],
                         "broken.png: unreadable image"),
    "names differing in case": (lambda t, r, f: write_case_twins(t / "support") or [str(r), str(t / "support")],
                                "classes 'Cat' and 'cat' differ only in case"),
    "16-bit image": (lambda t, r, f: write_16_bit_class(t / "support") or [str(r), str(t / "support")],
                     "0.png: unreadable image (16-bit"),
    "class already enrolled": (lambda t, r, f: [str(r), str(f["first"]), "--add"], "is already enrolled"),
    "unknown method": (lambda t, r, f: [str(checkpoint_of(r, t, "nosuch", {})), str(f["more"]), "--add"], "unknown method 'nosuch'"),
    "matchingnet with fce": (lambda t, r, f: [str(checkpoint_of(r, t, "matchingnet", {"fce": True})), str(f["more"])],
                             "'matchingnet' cannot be enrolled with its method_options"),
    "other weights": (lambda t, r, f: [str(checkpoint_of(r, t, "protonet", {"distance": "cosine"})), str(f["more"]), "--add"],
                      "enrolled with other weights"),
    "unknown class to remove": (lambda t, r, f: [str(r), "--remove", "nosuch"], "--remove 'nosuch': no such enrolled class"),
    "existing enrolment": (lambda t, r, f: [str(r), str(f["more"])], "already holds an enrolment (--add or --remove"),
    "--force on a folder that is not an enrolment": (lambda t, r, f: write_notes(t / "out" / "mine") or [
        str(r), str(f["more"]), "--force", "--out", str(t / "out" / "mine")], "mine: exists and is not an enrolled folder"),
    "missing support folder": (lambda t, r, f: [str(r), str(t / "nowhere"), "--add"], "nowhere: support folder not found"),
} | {
    f"{method} (not enrollable)": (lambda t, r, f, m=method: [str(checkpoint_of(r, t, m, {})), str(f["more"])],
                                   f"method {method!r} cannot be enrolled: {reason}")
    for method, reason in NOT_ENROLLABLE.items()
}


@pytest.fixture(scope="module")
def enrolled_first(runs: dict[str, Path], folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``first`` classes enrolled with the protonet run (copied by the tests that try to change it)."""
    out = tmp_path_factory.mktemp("enrolled") / "first"
    assert run_cli("enroll", str(runs["protonet"]), str(folders["first"]), "--out", str(out), "-q")[0] == 0
    return out


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    case: str, runs: dict[str, Path], folders: dict[str, Path], enrolled_first: Path, tmp_path: Path
) -> None:
    prepare, message = BAD[case]
    out = tmp_path / "out" / "enrolled"
    out.mkdir(parents=True)
    for source in enrolled_first.iterdir():
        (out / source.name).write_bytes(source.read_bytes())
    arguments = prepare(tmp_path, runs["protonet"], folders)
    before = snapshot(out)
    code, stdout, stderr = run_cli("enroll", "--out", str(out), *arguments)  # a case's own --out comes last and wins
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert snapshot(out) == before


def test_a_failure_while_writing_leaves_the_enrolled_folder_as_it_was(
    runs: dict[str, Path], folders: dict[str, Path], enrolled_first: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "enrolled"
    out.mkdir()
    for source in enrolled_first.iterdir():
        (out / source.name).write_bytes(source.read_bytes())
    before = snapshot(out)

    def fail(*args: object) -> None:
        raise FsltoolError("classifier.ts: disk full")

    monkeypatch.setattr(enroll_module, "export_torchscript", fail)  # after classifier.onnx is written to the staging folder
    with pytest.raises(FsltoolError, match="disk full"):
        enroll_module.enroll(runs["protonet"], folders["more"], out, add=True)
    assert snapshot(out) == before


def test_predict_without_an_enrolment_needs_a_support_folder(trained_run: Path, folders: dict[str, Path]) -> None:
    code, _, stderr = run_cli("predict", str(trained_run), str(folders["queries"]))
    assert code == 2 and "not an enrolled folder, so give a SUPPORT folder and then QUERIES" in stderr
