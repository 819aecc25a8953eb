"""The Python API (import fsltool): images as arrays, PIL images or files preprocessed exactly as predict reads files;
runs, exports and enrolled folders give the CLI's answers; classes enrolled in memory save as fsltool enroll
writes them; enrolled and exported models predict without torch; bad input is one line naming the value."""

from __future__ import annotations

import doctest
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

import fsltool
from fsltool.api import EnrolledClasses, EnrolledModel, ExportedModel, RunModel, preprocess
from fsltool.calibration import calibrate
from fsltool.checkpoint import load_trained
from fsltool.confidence import softmax
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.data.unknowns import add_unknowns
from fsltool.errors import FsltoolError
from fsltool.export import ExportReport, export_run
from fsltool.predict import Prediction, load_batch, predict_enrolled, predict_onnx, predict_torch, torch_scores
from fsltool.pretrain import pretrain
from tests.conftest import run_cli
from tests.test_enroll import checkpoint_of
from tests.test_pretrain import pretrain_recipe

DOCS = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
CLASSES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Path:
    return trained_run


@pytest.fixture(scope="module")
def folders(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three test classes as a user has them: ``support`` (a sub-folder of 3 PNGs per class) and ``queries`` (2
    other PNGs of each class, named ``<class>-<i>.png``)."""
    root = tmp_path_factory.mktemp("images")
    (root / "queries").mkdir()
    with FewShotData(synthetic_file) as data:
        for name, cls in zip(CLASSES, data.splits["test"]):
            start = int(data.class_start[cls])
            pixels = (data.images(np.arange(start, start + 5)).numpy() * 255).round().astype(np.uint8)
            (root / "support" / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(pixels[i, 0]).save(root / "support" / name / f"{i}.png")
            for i in (3, 4):
                Image.fromarray(pixels[i, 0]).save(root / "queries" / f"{name}-{i}.png")
    return {"support": root / "support", "queries": root / "queries"}


def pixels_of(folder: Path) -> np.ndarray:
    """The PNGs of ``folder`` as one NxHxW uint8 array, in sorted order."""
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.iterdir())])


def test_arrays_pil_images_and_paths_are_preprocessed_as_predict_reads_files(run: Path, folders: dict[str, Path], tmp_path: Path) -> None:
    model = fsltool.load(run)
    png = sorted(folders["queries"].iterdir())[0]
    expected = load_batch([png], model.contract)
    grey = np.asarray(Image.open(png))
    assert grey.shape == (28, 28) and grey.dtype == np.uint8
    same_image = {
        "HxW uint8": grey, "HxWx1": grey[..., None], "HxWx3 (grey as RGB)": np.repeat(grey[..., None], 3, -1),
        "1xHxWx1": grey[None, ..., None], "float64 in [0, 1]": grey / 255.0, "float32 in [0, 1]": grey.astype(np.float32) / 255,
        "PIL image": Image.open(png), "path as str": str(png), "Path": png, "list of one": [grey],
    }
    for kind, images in same_image.items():
        np.testing.assert_array_equal(model.preprocess(images), expected, err_msg=kind)
    # another size and channel count: converted and LANCZOS-resized exactly as the same image in a file
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(model.preprocess(rgb), load_batch([tmp_path / "rgb.png"], model.contract))
    # a model whose contract inverts (Omniglot's dark ink) inverts arrays as it inverts files
    inverted = {**model.contract, "invert": True}
    np.testing.assert_array_equal(preprocess(grey, inverted)[0], load_batch([png], inverted))
    np.testing.assert_allclose(preprocess(grey, inverted)[0], 1 - expected, atol=1e-6)
    # a batch and a mixed list: images in order, named by path or by position
    queries = sorted(folders["queries"].iterdir())
    batch, names = preprocess([str(folders["queries"]), pixels_of(folders["queries"])[..., None], Image.open(png)], model.contract)
    np.testing.assert_array_equal(batch, np.concatenate([load_batch(queries, model.contract)] * 2 + [expected]))
    assert names == [str(p) for p in queries] + [str(i) for i in range(len(queries), 2 * len(queries) + 1)]


def test_a_run_and_its_export_predict_and_embed_as_the_cli(
    run: Path, exported: tuple[Path, ExportReport], folders: dict[str, Path]
) -> None:
    support = {name: folders["support"] / name for name in CLASSES}
    queries = str(folders["queries"])
    model, export = fsltool.load(run), fsltool.load(exported[0], device="cpu")
    assert isinstance(model, RunModel) and isinstance(export, ExportedModel)
    for got, want in ((model.predict(support, queries, top=2), predict_torch(run, str(folders["support"]), [queries], top=2)),
                      (export.predict(support, queries, top=2), predict_onnx(exported[0], str(folders["support"]), [queries], "cpu", 2)[0])):
        assert [p.to_json() for p in got] == [p.to_json() for p in want]
    arrays = {name: pixels_of(folder)[..., None] for name, folder in support.items()}
    as_arrays = model.predict(arrays, pixels_of(folders["queries"])[..., None])
    assert [(p.label, p.probability) for p in as_arrays] == [(p.label, p.probability) for p in model.predict(support, queries)]
    assert [p.query for p in as_arrays] == [str(i) for i in range(6)]

    with torch.inference_mode():
        expected = model.trained.method.embed(torch.from_numpy(load_batch(sorted(folders["queries"].iterdir()), model.contract))).numpy()
    embeddings = model.embed(queries)
    assert embeddings.shape == (6, 64)
    np.testing.assert_array_equal(embeddings, expected)
    np.testing.assert_allclose(export.embed(queries), expected, rtol=1e-4, atol=1e-4)


def test_classes_enrolled_in_memory_predict_and_save_as_fsltool_enroll(run: Path, folders: dict[str, Path], tmp_path: Path) -> None:
    queries = str(folders["queries"])
    cli = tmp_path / "cli"
    assert run_cli("enroll", str(run), str(folders["support"]), "--out", str(cli), "-q")[0] == 0
    cli_predictions, _ = predict_enrolled(cli, [queries], "cpu", top=3)

    model = fsltool.load(run)
    enrolled = model.enroll({name: list(pixels_of(folders["support"] / name)) for name in reversed(CLASSES)})
    assert isinstance(enrolled, EnrolledClasses) and enrolled.classes == list(CLASSES)
    in_memory = enrolled.predict(queries, top=3)
    assert [p.label for p in in_memory] == [p.label for p in cli_predictions]
    assert [[r.label for r in p.top] for p in in_memory] == [[r.label for r in p.top] for p in cli_predictions]
    np.testing.assert_allclose([[r.probability for r in p.top] for p in in_memory],
                               [[r.probability for r in p.top] for p in cli_predictions], atol=1e-5)

    report = enrolled.save(tmp_path / "api")
    assert report.classes == report.added == list(CLASSES)
    for name, state in load_file(str(cli / "classes.safetensors")).items():
        np.testing.assert_array_equal(load_file(str(tmp_path / "api" / "classes.safetensors"))[name], state)
    manifests = [json.loads((folder / "enrolled.json").read_text()) for folder in (cli, tmp_path / "api")]
    cli_manifest, api_manifest = ({key: m[key] for key in ("classes", "class_images", "model")} for m in manifests)
    assert cli_manifest == api_manifest
    loaded = fsltool.load(tmp_path / "api", device="cpu")
    assert isinstance(loaded, EnrolledModel) and loaded.classes == list(CLASSES)
    assert [p.to_json() for p in loaded.predict(queries, top=3)] == [p.to_json() for p in cli_predictions]

    # remove and add back: the same classifier; save with add=True merges into an enrolment on disk
    enrolled.remove("beta")
    assert enrolled.classes == ["alpha", "gamma"] and {p.label for p in enrolled.predict(queries)} <= {"alpha", "gamma"}
    enrolled.add({"beta": str(folders["support"] / "beta")})
    np.testing.assert_allclose([p.probability for p in enrolled.predict(queries)], [p.probability for p in in_memory], atol=1e-6)
    model.enroll({"alpha": folders["support"] / "alpha"}).save(tmp_path / "steps")
    model.enroll({name: folders["support"] / name for name in CLASSES[1:]}).save(tmp_path / "steps", add=True)
    assert json.loads((tmp_path / "steps" / "enrolled.json").read_text())["classes"] == list(CLASSES)
    for name, state in load_file(str(cli / "classes.safetensors")).items():
        np.testing.assert_array_equal(load_file(str(tmp_path / "steps" / "classes.safetensors"))[name], state)
    with pytest.raises(FsltoolError, match="already holds an enrolment"):
        enrolled.save(tmp_path / "steps")
    with pytest.raises(FsltoolError, match="class 'Beta' is already enrolled"):
        enrolled.add({"Beta": folders["support"] / "beta"})


def test_enrolled_and_exported_models_predict_without_torch_and_import_fsltool_is_light(
    run: Path, exported: tuple[Path, ExportReport], folders: dict[str, Path], tmp_path: Path
) -> None:
    enrolled = tmp_path / "enrolled"
    fsltool.load(run).enroll({name: folders["support"] / name for name in CLASSES}).save(enrolled)
    support = {name: str(folders["support"] / name) for name in CLASSES}
    code = (
        "import json, sys\n"
        "import fsltool\n"
        "heavy = {'torch', 'onnxruntime', 'onnx', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "from PIL import Image\n"
        f"enrolled = fsltool.load({str(enrolled)!r}, device='cpu').predict({str(folders['queries'])!r}, top=2)\n"
        f"exported = fsltool.load({str(exported[0])!r}, device='cpu').predict({support!r}, {str(folders['queries'])!r})\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(json.dumps([[p.to_json() for p in enrolled], [p.to_json() for p in exported]]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    enrolled_json, exported_json = json.loads(result.stdout)
    assert enrolled_json == [p.to_json() for p in predict_enrolled(enrolled, [str(folders["queries"])], "cpu", top=2)[0]]
    assert exported_json == [p.to_json() for p in predict_onnx(exported[0], str(folders["support"]), [str(folders["queries"])], "cpu")[0]]


def test_a_run_s_calibration_reaches_every_prediction_and_travels_with_its_export_and_enrolments(
    run: Path, folders: dict[str, Path], synthetic_file: Path, tmp_path: Path
) -> None:
    """fsltool calibrate's temperature and open-set threshold: applied by the run, carried by an export and by an
    enrolment saved from memory, with the CLI's probabilities and unknown flags everywhere."""
    calibrated = tmp_path / "run"
    shutil.copytree(run, calibrated)
    add_unknowns(synthetic_file, tmp_path / "open.h5")
    with FewShotData(tmp_path / "open.h5") as data:
        fit = calibrate(load_trained(calibrated), data, EpisodeShape(5, 1, 5), reject_rate=0.2)
    assert fit.calibration.open_set is not None and fit.calibration.temperature != 1
    support = {name: folders["support"] / name for name in CLASSES}
    queries = str(folders["queries"])
    model = fsltool.load(calibrated)
    assert model.calibration == fit.calibration
    predictions = model.predict(support, queries, top=3)
    scores = torch_scores(model.trained.method, np.concatenate([model.preprocess(folder) for folder in support.values()]),
                          np.repeat(np.arange(3), 3), model.preprocess(queries))
    temperature = fit.calibration.temperature
    np.testing.assert_allclose([[r.probability for r in p.top] for p in predictions], -np.sort(-softmax(scores, temperature)), rtol=1e-6)
    assert [p.unknown for p in predictions] == (~fit.calibration.open_set.accepted(scores, temperature)).tolist()
    assert [p.to_json() for p in predictions] == [p.to_json() for p in predict_torch(calibrated, str(folders["support"]), [queries], top=3)]

    export = fsltool.load(export_run(calibrated, tmp_path / "export", verify_episodes=0).out_dir, device="cpu")
    assert export.calibration == fit.calibration
    assert [p.to_json() for p in export.predict(support, queries)] == [
        p.to_json() for p in predict_onnx(tmp_path / "export", str(folders["support"]), [queries], "cpu")[0]]

    enrolled = model.enroll(support)
    enrolled.save(tmp_path / "enrolled")
    loaded = fsltool.load(tmp_path / "enrolled", device="cpu")
    assert loaded.calibration == fit.calibration
    assert [p.to_json() for p in loaded.predict(queries)] == [p.to_json() for p in predict_enrolled(tmp_path / "enrolled", [queries], "cpu")[0]]
    assert [p.unknown for p in enrolled.predict(queries)] == [p.unknown for p in loaded.predict(queries)]


def test_a_pretraining_run_embeds_enrols_and_recognises_its_own_examples(synthetic_file: Path, tmp_path: Path) -> None:
    pretrain(pretrain_recipe(synthetic_file, tmp_path / "pretrain", epochs=1), quiet=True)
    model = fsltool.load(tmp_path / "pretrain")
    with FewShotData(synthetic_file) as data:
        images = (data.images(np.arange(0, 200, 20)).numpy()[:, 0] * 255).round().astype(np.uint8)  # one image of 10 classes
    assert model.embed(images[..., None]).shape == (10, 64)
    enrolled = model.enroll({f"class-{c}": image for c, image in enumerate(images)})
    predictions = enrolled.predict(images[..., None])
    assert [p.label for p in predictions] == [f"class-{c}" for c in range(10)]  # a one-image class's prototype is that image
    assert all(isinstance(p, Prediction) and 0 < p.probability <= 1 and p.score == pytest.approx(0, abs=1e-3) for p in predictions)


GREY = np.zeros((28, 28), dtype=np.uint8)


def write_notes(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")


BAD: dict[str, tuple[Callable[[RunModel, dict[str, Path], Path, Path], object], str]] = {
    # name: (a call on (the run's model, support classes, the run folder, a scratch folder) that must fail, its message)
    "NxHxW grey stack": (lambda m, s, r, t: m.embed(np.zeros((5, 28, 28), dtype=np.uint8)),
                         "images: an array of shape (5, 28, 28) is not HxW, HxWxC or NxHxWxC"),
    "5-D array": (lambda m, s, r, t: m.embed(np.zeros((1, 1, 28, 28, 1), dtype=np.uint8)), "(1, 1, 28, 28, 1) is not HxW"),
    "uint16 array": (lambda m, s, r, t: m.embed(GREY.astype(np.uint16)), "images: pixels of type uint16; give uint8"),
    "float above 1": (lambda m, s, r, t: m.embed(GREY + 1.5), "images: float pixels must lie in [0, 1], got 1.5..1.5"),
    "NaN pixels": (lambda m, s, r, t: m.embed(np.full((28, 28), np.nan)), "float pixels must lie in [0, 1], got nan"),
    "16-bit PIL image": (lambda m, s, r, t: m.embed(Image.fromarray(GREY.astype(np.uint16))), "images: 16-bit or floating-point pixels"),
    "a dict among images": (lambda m, s, r, t: m.embed([GREY, {}]), "images[1]: cannot read a dict as images"),
    "no images": (lambda m, s, r, t: m.embed([]), "no images given"),
    "missing file": (lambda m, s, r, t: m.embed(t / "nope.png"), "nope.png: query image or folder not found"),
    "one support class": (lambda m, s, r, t: m.predict({"alpha": GREY}, GREY), "a support set needs at least 2 classes, got 1"),
    "class without images": (lambda m, s, r, t: m.predict({**s, "empty": []}, GREY), "class 'empty': no images given"),
    "class name not a string": (lambda m, s, r, t: m.enroll({3: GREY}), "class name 3: must be a non-empty string"),
    "top 0": (lambda m, s, r, t: m.predict(s, GREY, top=0), "--top must be at least 1, got 0"),
    "nothing enrolled": (lambda m, s, r, t: m.enroll({}).predict(GREY), "no class is enrolled"),
    "unknown class to remove": (lambda m, s, r, t: m.enroll({"alpha": GREY}).remove("beta"), "--remove 'beta': no such enrolled class"),
    "method that cannot enrol": (lambda m, s, r, t: fsltool.load(checkpoint_of(r, t, "baseline", {})).enroll({"alpha": GREY}),
                                 "method 'baseline' cannot be enrolled"),
    "run whose method does not embed alone": (lambda m, s, r, t: fsltool.load(checkpoint_of(r, t, "matchingnet", {"fce": True})).embed(GREY),
                                              "method 'matchingnet' does not embed an image on its own"),
    "no such model": (lambda m, s, r, t: fsltool.load(t / "nowhere"), "nowhere: no such run folder or checkpoint"),
    "save into a folder that is not an enrolment": (lambda m, s, r, t: write_notes(t / "mine") or m.enroll({"alpha": GREY}).save(t / "mine"),
                                                    "mine: exists and is not an enrolled folder"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_one_line_error_naming_the_value(case: str, run: Path, folders: dict[str, Path], tmp_path: Path) -> None:
    call, message = BAD[case]
    support = {name: folders["support"] / name for name in CLASSES}
    with pytest.raises(FsltoolError) as error:
        call(fsltool.load(run), support, run, tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize(("page", "least"), [(DOCS, 20), (DOCS.parent.parent / "README.md", 5)], ids=["python-api.md", "README.md"])
def test_the_python_api_examples_run(page: Path, least: int, run: Path, exported: tuple[Path, ExportReport], folders: dict[str, Path],
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/python-api.md's and the README's Python examples, run as doctests in a folder laid out as they assume: a
    run, its export, a support folder of classes and a folder of queries."""
    shutil.copytree(run, tmp_path / "runs" / "omniglot" / "protonet-5w1s")
    shutil.copytree(exported[0], tmp_path / "models" / "protonet")
    shutil.copytree(folders["support"], tmp_path / "my_classes")
    shutil.copytree(folders["queries"], tmp_path / "queries")
    monkeypatch.chdir(tmp_path)
    result = doctest.testfile(str(page), module_relative=False, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                              report=True, verbose=False)
    assert result.attempted >= least and result.failed == 0, result
