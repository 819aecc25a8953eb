"""Enrolled classifiers: one graph images -> scores with a support set's kept state as constants, equal to the
method's own forward on that support set (SNAIL, MANN: in the seeded order evaluation shows them; MAML, Reptile:
fsltool export's prototype classifier); classes added and removed without recomputing the others; predict with
ONNX Runtime alone; a calibration never carried onto other scores; bad input refused in one line with nothing
written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

import fsltool
from fsltool import enroll as enroll_module
from fsltool.calibration import calibrate
from fsltool.checkpoint import build_model, load_trained
from fsltool.confidence import softmax
from fsltool.data.episodes import Episode, EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.enroll import CLASS_STATES, NOT_ENROLLABLE, enroll_images
from fsltool.errors import FsltoolError
from fsltool.evaluate import episode_scores, support_orders
from fsltool.methods import Method
from fsltool.methods.adaptation import AdaptiveMethod
from fsltool.predict import predict_torch
from fsltool.runtime import create_session
from tests.conftest import quick_recipe, run_cli, trained

# The enrolled graph against the method's forward on the whole support set: the same function, but each class is
# embedded in its own batch and its state reduced alone, so float32 rounding differs a little (export's tolerance).
# Measured on the QUICK_RUNS (4 stored episodes each, ONNX Runtime CPU): at most 8.6e-6 on scores up to 14 (MAML,
# first-order MAML, Reptile), 3.6e-7 on scores up to 0.3 (SNAIL, MANN); TorchScript gave the forward's scores exactly.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-3}

# Quick runs of the other enrollable methods: (method, backbone, method_options, training shape), 8 episodes each,
# enough to move the weights and BatchNorm statistics off their initial values. Small sequence models, as in
# tests/methods; the sequence methods and MAML/Reptile at 5 label slots / head outputs.
QUICK_RUNS: dict[str, tuple[str, str, dict[str, object], str]] = {
    "matchingnet": ("matchingnet", "conv4", {}, "10w1s5q"),
    "relationnet": ("relationnet", "conv4-relation", {}, "10w1s5q"),
    "maml": ("maml", "conv4", {"way": 5}, "5w1s5q"),
    "fomaml": ("maml", "conv4", {"way": 5, "first_order": True}, "5w1s5q"),
    "reptile": ("reptile", "conv4", {"way": 5, "test_inner_steps": 2}, "5w1s5q"),
    "snail": ("snail", "conv4", {"way": 5, "sequence_length": 26, "tc_filters": 16, "attention": [[16, 8], [16, 16], [32, 16]]}, "5w5s5q"),
    "mann": ("mann", "conv4", {"way": 5, "hidden": 32, "slots": 12, "slot_size": 8, "heads": 2}, "5w5s5q"),
}
RUNS = sorted(["protonet", *QUICK_RUNS])


@pytest.fixture(scope="module")
def runs(trained_run: Path, synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained run of each enrollable method (protonet: the shared run; the others: QUICK_RUNS)."""
    root = tmp_path_factory.mktemp("runs")
    return {"protonet": trained_run} | {
        name: trained(quick_recipe(synthetic_file, root / name, method=method, backbone=backbone, method_options=options, shape=shape))
        for name, (method, backbone, options, shape) in QUICK_RUNS.items()
    }


def test_every_enrollable_method_is_tested(runs: dict[str, Path]) -> None:
    assert {load_trained(run).config["method"] for run in runs.values()} == set(CLASS_STATES)


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


def shown_order(method: Method, length: int) -> torch.Tensor:
    """The order an order-sensitive method (SNAIL, MANN) is shown a class-by-class support set of ``length``
    images: evaluation's seeded order for stored episode 0; the layout itself for the others."""
    return torch.from_numpy(support_orders(np.array([0]), length)[0]) if method.order_sensitive else torch.arange(length)


def support_set_scores(method: Method, episode: Episode, order: torch.Tensor) -> np.ndarray:
    """The support-set classifier an enrolment stands for, on ``episode``'s support shown in ``order``: the method's
    forward; for MAML and Reptile the classifier fsltool export writes (prototypes of the meta-learned body)."""
    classifier = method.exported_classifier().eval() if isinstance(method, AdaptiveMethod) else method
    with torch.inference_mode():
        return classifier(episode.support[order], episode.support_labels[order], episode.query).numpy()


@pytest.mark.parametrize("case", RUNS)
def test_enrolled_graph_scores_equal_the_support_set_classifier(
    case: str, runs: dict[str, Path], synthetic_file: Path, tmp_path: Path
) -> None:
    """On stored 5w5s5q test episodes: ONNX Runtime and TorchScript give the support-set classifier's scores on the
    same support set in the same order; on stored episode 0, the scores `fsltool evaluate` computes (all but MAML and
    Reptile, whose evaluation adapts the network)."""
    model = load_trained(runs[case])
    shape = EpisodeShape(5, 5, 5)
    with FewShotData(synthetic_file) as data:
        support_idx, query_idx = data.stored_episodes("test", shape)
        episodes = [data.episode(s, q, shape) for s, q in zip(support_idx[:2], query_idx[:2])]
        evaluated = episode_scores(model.method, data, shape, support_idx[:1], query_idx[:1])[0].numpy()
    order = shown_order(model.method, shape.way * shape.shot)
    for number, episode in enumerate(episodes):
        classes = {f"class-{c}": episode.support[episode.support_labels == c].numpy() for c in range(shape.way)}
        out = tmp_path / f"episode-{number}"
        report = enroll_images(model, classes, out)
        method = model.config["method"]
        assert report.classes == sorted(classes) and report.kept == CLASS_STATES[method].kept
        expected = support_set_scores(model.method, episode, order)
        got = onnx_scores(out, episode.query.numpy())
        np.testing.assert_allclose(got, expected, **TOLERANCE)
        assert (got.argmax(-1) == expected.argmax(-1)).all()
        if number == 0 and not isinstance(model.method, AdaptiveMethod):
            np.testing.assert_allclose(got, evaluated, **TOLERANCE)
        extra = {"fsltool.json": ""}
        scripted = torch.jit.load(str(out / "classifier.ts"), _extra_files=extra)
        np.testing.assert_allclose(scripted(episode.query).detach().numpy(), expected, **TOLERANCE)
        metadata = json.loads(extra["fsltool.json"])
        assert metadata["classes"] == sorted(classes) and metadata["class_state"] == CLASS_STATES[method].kept
        manifest = json.loads((out / "enrolled.json").read_text())
        if model.method.order_sensitive:  # the sequence read is written down, and the order matters to the scores
            assert manifest["support_order"] == [[f"class-{int(i) // shape.shot}", int(i) % shape.shot] for i in order]
            class_by_class = support_set_scores(model.method, episode, torch.arange(len(order)))
            assert np.abs(class_by_class - got).max() > 10 * TOLERANCE["atol"]
        else:
            assert "support_order" not in manifest


def query_images(folders: dict[str, Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.float32)[None] / 255 for p in sorted(folders["queries"].iterdir())])


def test_add_equals_enrolling_all_at_once_and_remove_drops_a_class(
    runs: dict[str, Path], folders: dict[str, Path], tmp_path: Path
) -> None:
    run, images = str(runs["protonet"]), query_images(folders)
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


@pytest.mark.parametrize("case", ["maml", "snail", "mann"])
def test_add_keeps_each_class_state_and_removing_the_added_classes_restores_the_enrolment(
    case: str, runs: dict[str, Path], folders: dict[str, Path], tmp_path: Path
) -> None:
    """MAML (body prototypes) and the sequence methods (support embeddings, read in one seeded order over all the
    enrolled items): --add reads the enrolled classes back unchanged and gives the graph of enrolling all at once;
    --remove of the added classes gives back the first enrolment's scores exactly."""
    run, images = str(runs[case]), query_images(folders)
    at_once, in_steps = tmp_path / "at-once", tmp_path / "in-steps"
    code, _, stderr = run_cli("enroll", run, str(folders["all"]), "--out", str(at_once))
    assert code == 0 and "folding" not in stderr  # the exporter's optimizer is quiet on a constant support sequence
    assert run_cli("enroll", run, str(folders["first"]), "--out", str(in_steps), "-q")[0] == 0
    first_states, first_scores = load_file(str(in_steps / "classes.safetensors")), onnx_scores(in_steps, images)
    first_manifest = json.loads((in_steps / "enrolled.json").read_text())
    assert run_cli("enroll", run, str(folders["more"]), "--out", str(in_steps), "--add", "-q")[0] == 0
    states, all_states = load_file(str(in_steps / "classes.safetensors")), load_file(str(at_once / "classes.safetensors"))
    assert sorted(states) == sorted(all_states) == sorted(p.name for p in folders["all"].iterdir())
    for name, state in states.items():
        np.testing.assert_array_equal(state, first_states.get(name, all_states[name]))
        np.testing.assert_array_equal(state, all_states[name])
    np.testing.assert_array_equal(onnx_scores(in_steps, images), onnx_scores(at_once, images))
    manifest = json.loads((in_steps / "enrolled.json").read_text())
    assert manifest.get("support_order") == json.loads((at_once / "enrolled.json").read_text()).get("support_order")

    removed = [f"--remove={p.name}" for p in folders["more"].iterdir()]
    assert run_cli("enroll", run, "--out", str(in_steps), *removed, "-q")[0] == 0
    assert json.loads((in_steps / "enrolled.json").read_text()) == first_manifest
    np.testing.assert_array_equal(onnx_scores(in_steps, images), first_scores)


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


def test_a_calibration_fitted_on_the_adapted_network_is_not_carried_into_a_maml_enrolment_or_export(
    runs: dict[str, Path], folders: dict[str, Path], synthetic_file: Path, tmp_path: Path
) -> None:
    """MAML's calibration is fitted on its adapted network's scores; its enrolled graph computes prototype scores on
    the body. The enrolment leaves the calibration out and says so (manifest, metadata, output); predict and the
    Python API then give the plain softmax of the graph's scores."""
    run = tmp_path / "maml"
    shutil.copytree(runs["maml"], run)
    with FewShotData(synthetic_file) as data:
        fitted = calibrate(load_trained(run), data, EpisodeShape(5, 1, 5), episodes=10)
    assert abs(fitted.calibration.temperature - 1) > 0.01  # so a calibrated softmax would differ from a plain one
    out = tmp_path / "enrolled"
    code, stdout, _ = run_cli("enroll", str(run), str(folders["all"]), "--out", str(out), "--json")
    note = json.loads(stdout)["calibration_left_out"]
    assert code == 0 and note.startswith(f"{run / 'calibration.json'} not carried: it was fitted on the method's own scores")
    manifest = json.loads((out / "enrolled.json").read_text())
    metadata = create_session(str(out / "classifier.onnx"), "cpu").get_modelmeta().custom_metadata_map
    assert "calibration" not in manifest and "calibration" not in metadata
    assert manifest["calibration_left_out"] == metadata["calibration_left_out"] == note
    code, _, stderr = run_cli("enroll", str(run), str(folders["all"]), "--out", str(out), "--force")
    assert code == 0 and "note: " in stderr and "not carried" in " ".join(stderr.split())

    code, stdout, _ = run_cli("predict", str(out), str(folders["queries"]), "--json", "--top", "5", "--device", "cpu")
    predictions = json.loads(stdout)["predictions"]
    scores = onnx_scores(out, query_images(folders))
    assert code == 0 and all("unknown" not in p for p in predictions)
    plain = softmax(scores, 1.0)
    for prediction, row, probabilities in zip(predictions, scores, plain, strict=True):
        got = {r["label"]: r["probability"] for r in prediction["top"]}
        np.testing.assert_allclose([got[name] for name in manifest["classes"]], probabilities, rtol=1e-5)
        assert prediction["score"] == pytest.approx(float(row.max()), rel=1e-6)
    in_memory = fsltool.load(run).enroll({p.name: p for p in sorted(folders["all"].iterdir())})
    np.testing.assert_allclose([p.probability for p in in_memory.predict(folders["queries"])], plain.max(-1), rtol=1e-4)
    # fsltool export writes the same body-prototype classifier: the calibration stays out of it too
    code, _, _ = run_cli("export", str(run), "--out", str(tmp_path / "export"), "--verify-episodes", "0")
    sidecar = json.loads((tmp_path / "export" / "model.json").read_text())
    assert code == 0 and "calibration" not in sidecar and sidecar["calibration_left_out"] == note


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
    f"{method}: more classes than label slots": (
        lambda t, r, f, m=method: [str(checkpoint_of(r, t, m, {"way": 4})), str(f["all"]), "--out", str(t / "out" / "new")],
        f"5 classes to enrol, but method {method!r} reads at most method_options.way = 4")
    for method in ("snail", "mann")
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
