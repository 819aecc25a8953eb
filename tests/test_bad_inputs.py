"""The bad-input matrix: every command fed each kind of bad input answers with exactly one line ``error: ...`` that
names the file, key or value, exit code 2, no traceback, and leaves no partial output behind (the folder it
writes to is byte-for-byte as it was)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from fsltool.cli import main
from tests.conftest import quick_recipe

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """``setup(tmp, fixtures)`` prepares the bad input and returns the command's arguments; ``message`` must appear
    in the error line, with ``{tmp}`` standing for the case's folder."""

    setup: Callable[[Path, dict[str, Path]], list[str]]
    message: str


def image_folder(root: Path, classes: int = 12, per_class: int = 6, size: int = 16) -> Path:
    """``classes`` class folders of ``per_class`` random grey PNGs."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")
    return root


def prepare_folder(root: Path, tmp: Path, *extra: str) -> list[str]:
    return ["prepare", "folder", str(root), str(tmp / "out.h5"), "--channels", "1", "--shapes", "2w1s", "--query", "2",
            "--episodes", "5", "--split-ratios", "0.5,0.25,0.25", "-q", *extra]


def with_image(tmp: Path, write: Callable[[Path], None], *extra: str) -> list[str]:
    root = image_folder(tmp / "images")
    write(root / "c03" / "bad.png")
    return prepare_folder(root, tmp, *extra)


def class_of_bad_images(tmp: Path) -> list[str]:
    """Every image of class c00 is unreadable: --skip-bad skips them all, leaving the class empty."""
    root = image_folder(tmp / "images")
    for path in (root / "c00").glob("*.png"):
        path.write_bytes(b"")
    return prepare_folder(root, tmp, "--skip-bad")


def empty_folders(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("no images here")
    return root


def split_lists(tmp: Path, train: str, val: str = "c06\nc07\n", test: str = "c08\nc09\n") -> list[str]:
    root = image_folder(tmp / "images")
    lists = tmp / "lists"
    lists.mkdir()
    for split, text in (("train", train), ("val", val), ("test", test)):
        (lists / f"{split}.txt").write_text(text)
    return prepare_folder(root, tmp, "--split-lists", str(lists))


def csv_duplicate_class(tmp: Path) -> list[str]:
    images = image_folder(tmp / "images", classes=1)
    splits = tmp / "splits"
    splits.mkdir()
    (splits / "train.csv").write_text("filename,label\nc00/0.png,dup\nc00/1.png,dup\n")
    (splits / "val.csv").write_text("filename,label\nc00/2.png,dup\n")
    (splits / "test.csv").write_text("filename,label\nc00/3.png,other\n")
    return ["prepare", "csv", str(images), str(splits), str(tmp / "out.h5"), "--channels", "1", "--size", "16", "-q"]


def recipe(tmp: Path, fixtures: dict[str, Path], *overrides: str, **changes: object) -> list[str]:
    """meta-train on the synthetic fixture with a recipe file holding ``changes`` (raw YAML values)."""
    raw = quick_recipe(fixtures["data"], tmp / "run").to_dict()
    for key, value in changes.items():
        section, _, name = key.partition("__")
        (raw[section] if name else raw)[name or section] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return ["meta-train", str(path), "-q", *overrides]


def truncated(source: Path, target: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def run_copy(tmp: Path, fixtures: dict[str, Path]) -> Path:
    return Path(shutil.copytree(fixtures["run"], tmp / "run"))


def edit_checkpoint(tmp: Path, fixtures: dict[str, Path], edit: Callable[[dict], object]) -> Path:
    run = run_copy(tmp, fixtures)
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    edit(state)
    torch.save(state, run / "checkpoints" / "best.pt")
    return run


def unwritable_folder(tmp: Path) -> Path:
    """A folder this process cannot create files in: a read-only folder, or (as root, which ignores permissions)
    /sys, read-only in containers; the case is skipped where neither refuses."""
    folder = tmp / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / "fsltool-probe").touch()
        except OSError:
            return candidate
        (candidate / "fsltool-probe").unlink()
    pytest.skip("no unwritable folder on this machine")


CASES: dict[str, Case] = {
    # prepare: images
    "corrupt image": Case(lambda t, f: with_image(t, lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\nnot really")), "bad.png: unreadable image"),
    "zero-byte image": Case(lambda t, f: with_image(t, lambda p: p.write_bytes(b"")), "bad.png: unreadable image (empty file)"),
    "16-bit image": Case(lambda t, f: with_image(t, lambda p: Image.fromarray(np.full((16, 16), 4000, np.uint16)).save(p)),
                         "bad.png: unreadable image (16-bit or floating-point pixels (mode I;16)"),
    "float image": Case(lambda t, f: with_image(t, lambda p: Image.fromarray(np.zeros((16, 16), np.float32)).save(p.with_suffix(".tif"))),
                        "bad.tif: unreadable image (16-bit or floating-point pixels (mode F)"),
    "mixed sizes": Case(lambda t, f: with_image(t, lambda p: Image.new("L", (20, 16)).save(p)), "bad.png: image is 20x16 but this source's images are 16x16"),
    "a class left empty by --skip-bad": Case(lambda t, f: class_of_bad_images(t), "class 'c00' (train) has no images left after skipping"),
    "no class folder holds images": Case(lambda t, f: prepare_folder(empty_folders(t / "images"), t), "empty source"),
    "duplicate class name": Case(lambda t, f: csv_duplicate_class(t), "label dup is also in"),
    "split list names an unknown class": Case(lambda t, f: split_lists(t, "c00\nc01\nnope\n"), "class 'nope' is not a class folder"),
    "split lists name a class twice": Case(lambda t, f: split_lists(t, "c00\nc01\nc06\n"), "class 'c06' is already listed"),
    "missing image folder": Case(lambda t, f: prepare_folder(t / "nowhere", t), "nowhere: no such folder"),
    # meta-train: recipes
    "unknown recipe key": Case(lambda t, f: recipe(t, f, train__lrr=0.1), "unknown recipe key 'train.lrr' (did you mean 'train.lr'?)"),
    "unknown top-level key": Case(lambda t, f: recipe(t, f, metod="protonet"), "unknown recipe key 'metod'"),
    "wrong type": Case(lambda t, f: recipe(t, f, train__episodes="ten"), "recipe key 'train.episodes': expected int, got 'ten'"),
    "unknown device": Case(lambda t, f: recipe(t, f, device="gpu"), "recipe key 'device': 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    "wrong type for a flag": Case(lambda t, f: recipe(t, f, train__prefetch="yes"), "recipe key 'train.prefetch': expected bool, got 'yes'"),
    "zero way": Case(lambda t, f: recipe(t, f, train__shape="0w1s"), "recipe key 'train.shape': episode shape '0w1s': way must be >= 2"),
    "zero shot": Case(lambda t, f: recipe(t, f, train__shape="5w0s"), "way must be >= 2, shot and query >= 1"),
    "negative shape": Case(lambda t, f: recipe(t, f, train__shape="-5w1s"), "'-5w1s' is not of the form"),
    "zero episodes": Case(lambda t, f: recipe(t, f, train__episodes=0), "'train.episodes' must be positive, got 0"),
    "negative keep_checkpoints": Case(lambda t, f: recipe(t, f, train__keep_checkpoints=-1), "'train.keep_checkpoints' must be >= 0, got -1"),
    "negative checkpoint_minutes": Case(lambda t, f: recipe(t, f, train__checkpoint_minutes=-5),
                                       "'train.checkpoint_minutes' must be >= 0, got -5.0"),
    "unknown on_nonfinite": Case(lambda t, f: recipe(t, f, train__on_nonfinite="ignore"), "'train.on_nonfinite': 'ignore' is not one of stop, skip"),
    "way larger than the classes": Case(lambda t, f: recipe(t, f, train__shape="500w1s"), "fewer than the 500 ways"),
    "shot + query larger than a class": Case(lambda t, f: recipe(t, f, train__shape="5w15s10q"), "fewer than shot + query = 25"),
    "missing recipe": Case(lambda t, f: ["meta-train", str(t / "none.yaml")], "none.yaml"),
    "missing data file": Case(lambda t, f: recipe(t, f, data=str(t / "none.h5")), "none.h5: data file not found"),
    "truncated data file": Case(lambda t, f: recipe(t, f, data=str(truncated(f["data"], t / "cut.h5"))), "cut.h5: not a readable HDF5 file"),
    "foreign HDF5 file": Case(lambda t, f: recipe(t, f, data=str(foreign_hdf5(t / "other.h5"))), "other.h5: not an fsltool data file"),
    "resume with another method": Case(lambda t, f: ["meta-train", str(run_copy(t, f) / "recipe.yaml"), "method=maml", "--resume", "-q"],
                                       "key 'method' is 'maml' here but was 'protonet'; only train.episodes"),
    "unwritable output folder (meta-train)": Case(lambda t, f: recipe(t, f, output=str(unwritable_folder(t) / "run")), "cannot write the run folder"),
    "unwritable output folder (prepare)": Case(lambda t, f: ["prepare", "synthetic", str(unwritable_folder(t) / "out.h5"), "--classes", "40", "--shapes", "5w1s", "-q"],
                                               "cannot write here"),
    # evaluate / export / info / predict: checkpoints, data files and exported models
    "truncated checkpoint": Case(lambda t, f: ["evaluate", str(truncated(f["run"] / "checkpoints" / "best.pt", t / "cut.pt"))],
                                 "cut.pt: not a readable fsltool checkpoint"),
    "evaluate on an unknown device": Case(lambda t, f: ["evaluate", str(f["run"]), "--device", "tpu"], "--device: 'tpu' is not one of auto, cpu"),
    "foreign checkpoint": Case(lambda t, f: ["evaluate", str(foreign_checkpoint(t / "other.pt"))], "other.pt: not an fsltool checkpoint"),
    "checkpoint of another method": Case(
        lambda t, f: ["evaluate", str(edit_checkpoint(t, f, lambda s: s["model_config"].update(method="maml")))],
        "best.pt: checkpoint does not match its method (Error(s) in loading state_dict for MAML"),
    "checkpoint of a method its network does not fit": Case(
        lambda t, f: ["evaluate", str(edit_checkpoint(t, f, lambda s: s["model_config"].update(method="relationnet")))],
        "best.pt: method 'relationnet' compares feature maps"),
    "evaluate on a truncated data file": Case(lambda t, f: ["evaluate", str(f["run"]), "--data", str(truncated(f["data"], t / "cut.h5"))],
                                              "cut.h5: not a readable HDF5 file"),
    "export a truncated checkpoint": Case(lambda t, f: ["export", str(truncated(f["run"] / "checkpoints" / "best.pt", t / "cut.pt")),
                                                        "--out", str(t / "export")], "cut.pt: not a readable fsltool checkpoint"),
    "info on a truncated ONNX model": Case(lambda t, f: ["info", str(truncated(f["export"] / "classifier.onnx", t / "cut.onnx"))], "cut.onnx"),
    "predict with a truncated ONNX model": Case(
        lambda t, f: ["predict", str(cut_export(t, f)), str(image_folder(t / "support", classes=2, per_class=1, size=28)),
                      str(t / "support" / "c00" / "0.png")],
        "classifier.onnx"),
}


def foreign_hdf5(path: Path) -> Path:
    import h5py

    with h5py.File(path, "w") as file:
        file["x"] = np.zeros(3)
    return path


def foreign_checkpoint(path: Path) -> Path:
    torch.save({"weights": torch.zeros(2)}, path)
    return path


def cut_export(tmp: Path, fixtures: dict[str, Path]) -> Path:
    export = Path(shutil.copytree(fixtures["export"], tmp / "export"))
    truncated(export / "classifier.onnx", export / "classifier.onnx")
    return export


@pytest.fixture(scope="module")
def fixtures(synthetic_file: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    export = tmp_path_factory.mktemp("export") / "model"
    result = CliRunner().invoke(main, ["export", str(trained_run), "--out", str(export), "--verify-episodes", "0"])
    assert result.exit_code == 0, result.output
    return {"data": synthetic_file, "run": trained_run, "export": export}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, fixtures: dict[str, Path], tmp_path: Path) -> None:
    case = CASES[name]
    args = case.setup(tmp_path, fixtures)
    before, fixture_state = snapshot(tmp_path), {key: snapshot(path) if path.is_dir() else path.stat().st_mtime_ns for key, path in fixtures.items()}
    result = CliRunner().invoke(main, args)
    error = result.stderr
    assert result.exit_code == 2, (result.exit_code, error, result.exception)
    assert error.startswith("error: ") and error.count("\n") == 1, error  # exactly one line
    assert "Traceback" not in result.output + error
    assert case.message.replace("{tmp}", str(tmp_path)) in error, error
    assert snapshot(tmp_path) == before  # nothing written, nothing half-written, nothing removed
    assert fixture_state == {key: snapshot(path) if path.is_dir() else path.stat().st_mtime_ns for key, path in fixtures.items()}
