"""The benchmark sources (miniImageNet, tieredImageNet, CUB, CIFAR-FS, FC100) on generated fake layouts.

Each fake holds every class of the real split with 2-3 tiny images, so the real split lists and checks run as they
do on the real data; the CIFAR fakes are pickles shaped like the real cifar-100-python files.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from fsltool.data.sources.benchmarks import cub, miniimagenet, tieredimagenet
from fsltool.data.sources.cifar100 import _CifarUnpickler, cifar_fs, fc100, read_cifar_pickle
from fsltool.data.splits import PUBLISHED, SPLITS, BenchmarkSplit, PublishedCounts, _check, benchmark_split
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from tests.conftest import run_cli
from tests.data.test_sources import write_image

# ---------------------------------------------------------------- the shipped lists


@pytest.mark.parametrize("name", [name for name, counts in PUBLISHED.items() if counts.groups])
def test_superclasses_have_their_published_counts_and_stay_in_one_split(name: str) -> None:
    split = benchmark_split(name)
    assert tuple(len(split.groups[s]) for s in SPLITS) == PUBLISHED[name].groups
    superclasses = [group for s in SPLITS for group in split.groups[s]]
    assert len(set(superclasses)) == len(superclasses)
    for s in SPLITS:
        assert sorted(c for names in split.groups[s].values() for c in names) == sorted(split.classes[s])


def test_fc100_is_cifar100_by_superclass_as_in_tadam() -> None:
    groups = benchmark_split("fc100/oreshkin").groups
    coarse = sorted(g for s in SPLITS for g in groups[s])  # CIFAR-100's coarse label order is alphabetical
    tadam = {"train": {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19}, "val": {8, 11, 13, 16}, "test": {0, 7, 12, 14}}
    assert {s: {coarse.index(g) for g in groups[s]} for s in SPLITS} == tadam
    assert {len(names) for s in SPLITS for names in groups[s].values()} == {5}
    cifar_fs_classes = {c for names in benchmark_split("cifar-fs/bertinetto").classes.values() for c in names}
    assert {c for s in SPLITS for names in groups[s].values() for c in names} == cifar_fs_classes  # all 100


def test_cub_split_follows_the_closer_look_rule() -> None:
    split = benchmark_split("cub/chen").classes
    folders = sorted(c for s in SPLITS for c in split[s])
    assert [int(name.split(".")[0]) for name in folders] == list(range(1, 201))
    assert list(split["train"]) == folders[0::2]
    assert list(split["val"]) == folders[1::4]
    assert list(split["test"]) == folders[3::4]


def test_a_damaged_split_file_is_refused() -> None:
    good = benchmark_split("fc100/oreshkin")
    short = BenchmarkSplit(good.name, {**good.classes, "val": good.classes["val"][1:]}, good.groups, good.provenance)
    with pytest.raises(FsltoolError, match=r"x\.json: \(60, 19, 20\) classes per split.*damaged"):
        _check(short, PUBLISHED[good.name], "x.json")
    leaking = BenchmarkSplit(good.name, {**good.classes, "test": (good.classes["train"][0], *good.classes["test"][1:])},
                             good.groups, good.provenance)
    with pytest.raises(FsltoolError, match="listed twice"):
        _check(leaking, PUBLISHED[good.name], "x.json")
    with pytest.raises(FsltoolError, match="superclasses given"):
        _check(good, PublishedCounts((60, 20, 20)), "x.json")


# ---------------------------------------------------------------- ImageNet-style trees and CUB


def class_folders(root: Path, names: list[str], images: int = 2) -> Path:
    for name in names:
        for index in range(images):
            write_image(root / name / f"{index}.jpg", size=(6, 5), color=(index * 90, 40, 200))
    return root


def all_classes(name: str) -> list[str]:
    return [c for names in benchmark_split(name).classes.values() for c in names]


def split_counts(listing: object) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for spec in listing.classes:  # type: ignore[attr-defined]
        counts[spec.split] += 1
    return counts


@pytest.fixture(scope="module")
def tiered_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 608 tieredImageNet classes, grouped one level down by split as some copies are (train/<synset>/...)."""
    root = tmp_path_factory.mktemp("tiered")
    for split, names in benchmark_split("tieredimagenet/ren").classes.items():
        class_folders(root / split, list(names))
    return root


def test_miniimagenet_class_tree_is_split_as_ravi_at_84(tmp_path: Path) -> None:
    root = class_folders(tmp_path, all_classes("miniimagenet/ravi"))
    listing = miniimagenet(root=str(root))
    assert split_counts(listing) == {"train": 64, "val": 16, "test": 20}
    assert {spec.name: spec.split for spec in listing.classes} == benchmark_split("miniimagenet/ravi").split_of()
    assert listing.image_shape == (3, 84, 84)
    image = listing.load(listing.classes[0].items[0])
    assert image.shape == (3, 84, 84) and image.dtype == np.uint8
    assert listing.provenance["split"] == "miniimagenet/ravi"
    assert "prototypical-networks" in listing.provenance["split_source"]["source"]["repository"]


def test_a_miniimagenet_tree_with_a_full_imagenet_class_is_refused(tmp_path: Path) -> None:
    """A class folder of more than 600 images is a full ImageNet class (about 1,300), not miniImageNet's: refused
    with the folder named and the CSV layout offered, before anything is packed."""
    root = class_folders(tmp_path, all_classes("miniimagenet/ravi"))
    first = all_classes("miniimagenet/ravi")[5]
    class_folders(root, [first], images=601)
    with pytest.raises(FsltoolError, match=rf"{first}.*class '{first}' has 601 images, but a miniImageNet class has 600 .*train.csv"):
        miniimagenet(root=str(root))
    out = tmp_path / "mini.h5"
    code, _, err = run_cli("prepare", "miniimagenet", str(root), str(out))
    assert code != 0 and "has 601 images" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def ravi_layout(root: Path, move: tuple[str, str] | None = None, extra: str | None = None) -> Path:
    """ROOT/images/<synset><number>.jpg beside ROOT/{train,val,test}.csv; ``move`` = (class, csv) lists a class in
    another split's file, ``extra`` adds a class no split lists."""
    rows = {split: [] for split in SPLITS}
    for split, names in benchmark_split("miniimagenet/ravi").classes.items():
        for name in names:
            rows[move[1] if move and move[0] == name else split].append(name)
    if extra:
        rows["train"].append(extra)
    for split, names in rows.items():
        lines = ["filename,label"]
        for name in names:
            for index in range(2):
                write_image(root / "images" / f"{name}{index:08d}.jpg", size=(6, 5))
                lines.append(f"{name}{index:08d}.jpg,{name}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_miniimagenet_ravi_csv_layout(tmp_path: Path) -> None:
    listing = miniimagenet(root=str(ravi_layout(tmp_path)), size=10)
    assert split_counts(listing) == {"train": 64, "val": 16, "test": 20}
    assert {len(spec.items) for spec in listing.classes} == {2}
    assert listing.provenance["layout"] == "ravi csv" and listing.provenance["source"] == "miniimagenet"
    assert listing.load(listing.classes[-1].items[1]).shape == (3, 10, 10)


def test_miniimagenet_csv_that_disagrees_with_the_split_is_refused(tmp_path: Path) -> None:
    first = benchmark_split("miniimagenet/ravi").classes["train"][0]
    with pytest.raises(FsltoolError, match=rf"val\.csv: class '{first}' is listed for val, but the miniimagenet/ravi "
                                           "split puts it in train"):
        miniimagenet(root=str(ravi_layout(tmp_path / "moved", move=(first, "val"))))
    with pytest.raises(FsltoolError, match="class 'n99999999' is not in the miniimagenet/ravi split"):
        miniimagenet(root=str(ravi_layout(tmp_path / "extra", extra="n99999999")))


def test_tiered_from_folders_grouped_by_split(tiered_tree: Path) -> None:
    listing = tieredimagenet(root=str(tiered_tree))
    assert split_counts(listing) == {"train": 351, "val": 97, "test": 160}
    assert listing.image_shape == (3, 84, 84)
    assert Path(listing.describe(listing.classes[0].items[0])).parent.parent.name in SPLITS


def test_class_tree_errors_name_the_class(tmp_path: Path) -> None:
    names = all_classes("miniimagenet/ravi")
    root = class_folders(tmp_path / "mini", names)
    shutil.rmtree(root / names[-1])
    with pytest.raises(FsltoolError, match=rf"class '{names[-1]}' \(test\) of the miniimagenet/ravi split is missing$"):
        miniimagenet(root=str(root))

    class_folders(root, [names[-1], "n99999999", "n99999998"])
    with pytest.raises(FsltoolError, match=r"class 'n99999998' is not in the miniimagenet/ravi split \(2 such classes\); "
                                           "pass --ignore-other-classes"):
        miniimagenet(root=str(root))
    kept = miniimagenet(root=str(root), ignore_other_classes=True)
    assert len(kept.classes) == 100 and kept.provenance["other_classes_left_out"] == 2

    class_folders(root / "copy", [names[0]])
    with pytest.raises(FsltoolError, match=rf"two class folders are named '{names[0]}'"):
        miniimagenet(root=str(root))


def test_wrong_layout_says_what_was_expected(tmp_path: Path) -> None:
    cub_root = class_folders(tmp_path / "CUB_200_2011" / "images", all_classes("cub/chen")[:3])
    with pytest.raises(FsltoolError, match=r"none of the 608 classes of the tieredimagenet/ren split is here "
                                           r"\(found '001\.Black_footed_Albatross'\); expected <root>/<synset>/<image>"):
        tieredimagenet(root=str(cub_root))
    with pytest.raises(FsltoolError, match="cub root .*: no CUB_200_2011/images or images folder; expected"):
        cub(root=str(tmp_path / "CUB_200_2011" / "images"))
    with pytest.raises(FsltoolError, match="no such folder"):
        tieredimagenet(root=str(tmp_path / "absent"))


def test_cub_from_the_extracted_archive(tmp_path: Path) -> None:
    class_folders(tmp_path / "CUB_200_2011" / "images", all_classes("cub/chen"))
    listing = cub(root=str(tmp_path))
    assert split_counts(listing) == {"train": 100, "val": 50, "test": 50}
    splits = {spec.name: spec.split for spec in listing.classes}
    assert [splits[n] for n in ("001.Black_footed_Albatross", "002.Laysan_Albatross", "004.Groove_billed_Ani")] == [
        "train", "val", "test"]
    assert [spec.name for spec in cub(root=str(tmp_path / "CUB_200_2011")).classes] == list(splits)

    shutil.rmtree(tmp_path / "CUB_200_2011" / "images" / "200.Common_Yellowthroat")
    with pytest.raises(FsltoolError, match=r"class '200\.Common_Yellowthroat' \(test\) of the cub/chen split is missing"):
        cub(root=str(tmp_path))


# ---------------------------------------------------------------- CIFAR-100 pickles

FINE = sorted(all_classes("cifar-fs/bertinetto"))  # CIFAR-100's label names are in alphabetical order
SUPERCLASS = {c: g for groups in benchmark_split("fc100/oreshkin").groups.values() for g, names in groups.items()
              for c in names}
COARSE = sorted(set(SUPERCLASS.values()))


def cifar_files(root: Path, *, per_class: dict[str, int] | None = None, superclass: dict[str, str] | None = None,
                fine: list[str] = FINE) -> Path:
    """ROOT/cifar-100-python/{meta,train,test} like the real files: bytes keys, fine and coarse label lists and a
    uint8 (N, 3072) array; 2 train and 1 test image per class. ``train`` is written as the real files name numpy's
    reconstructor (numpy.core), ``test`` as numpy 2 pickles it today (numpy._core)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    superclass = superclass or SUPERCLASS
    meta = {b"fine_label_names": [n.encode() for n in fine], b"coarse_label_names": [n.encode() for n in COARSE]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    for part, count in (("train", 2), ("test", 1)):
        labels = [i for i, name in enumerate(fine) for _ in range((per_class or {}).get(name, count))]
        content = {
            b"batch_label": f"{part} batch".encode(),
            b"fine_labels": labels,
            b"coarse_labels": [COARSE.index(superclass.get(fine[i], COARSE[0])) for i in labels],
            b"data": np.arange(len(labels) * 3072, dtype=np.int64).reshape(-1, 3072).astype(np.uint8),
        }
        data = pickle.dumps(content, protocol=3)
        if part == "train":
            data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / part).write_bytes(data)
    return root


def test_cifar_fs_uses_both_files(tmp_path: Path) -> None:
    listing = cifar_fs(root=str(cifar_files(tmp_path)))
    assert split_counts(listing) == {"train": 64, "val": 16, "test": 20}
    assert {len(spec.items) for spec in listing.classes} == {3}
    assert listing.image_shape == (3, 32, 32)
    apple = next(spec for spec in listing.classes if spec.name == "apple")
    assert [item[0] for item in apple.items] == ["train", "train", "test"]
    image = listing.load(apple.items[0])
    assert image.shape == (3, 32, 32) and image.dtype == np.uint8
    np.testing.assert_array_equal(image.reshape(-1), (np.arange(3072) % 256).astype(np.uint8))  # rows are C, H, W
    assert listing.describe(apple.items[2]).endswith(os.path.join("cifar-100-python", "test") + " image 0")
    assert [spec.name for spec in cifar_fs(root=str(tmp_path / "cifar-100-python")).classes] == [
        spec.name for spec in listing.classes]


def test_fc100_splits_by_superclass_and_checks_the_data_agrees(tmp_path: Path) -> None:
    listing = fc100(root=str(cifar_files(tmp_path / "good")))
    assert split_counts(listing) == {"train": 60, "val": 20, "test": 20}
    assert listing.provenance["split"] == "fc100/oreshkin"

    wrong = {**SUPERCLASS, "apple": "flowers"}
    with pytest.raises(FsltoolError, match="class 'apple' is in superclass 'flowers' here, but the fc100/oreshkin "
                                           "split lists it under 'fruit_and_vegetables'"):
        fc100(root=str(cifar_files(tmp_path / "wrong", superclass=wrong)))


class RunsCommand:
    """Unpickles as a call of os.system: what a malicious data file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_a_command_is_refused(tmp_path: Path) -> None:
    root = cifar_files(tmp_path / "cifar")
    marker = tmp_path / "ran"
    (root / "cifar-100-python" / "train").write_bytes(pickle.dumps({b"data": RunsCommand(marker)}))
    with pytest.raises(FsltoolError, match=r"train: refusing this pickle: it calls (posix|nt)\.system, which no "
                                           "CIFAR-100 file does"):
        fc100(root=str(root))
    code, out, err = run_cli("prepare", "cifar-fs", str(root), str(tmp_path / "out.h5"))
    assert code == 2 and "refusing this pickle" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out.h5").exists()


def test_the_unpickler_admits_only_numpy_arrays() -> None:
    for module, name in [("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy", "ndarray"), ("numpy", "dtype")]:
        assert _CifarUnpickler.find_class(None, module, name) is not None  # type: ignore[arg-type]
    for module, name in [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")]:
        with pytest.raises(pickle.UnpicklingError):
            _CifarUnpickler.find_class(None, module, name)  # type: ignore[arg-type]


def python2_pickle(rows: bytes) -> bytes:
    """{b'data': uint8 array (2, 3072), b'fine_labels': [5, 7]} pickled as Python 2 and numpy 1 wrote the real
    files (protocol 2, py2 strings, numpy.core names), which Python 3 cannot write: its opcodes spelled out."""

    def string(value: bytes) -> bytes:  # BINSTRING: a Python 2 str, read back as bytes
        return b"T" + struct.pack("<i", len(value)) + value

    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
             + b"(K\x01K\x02M\x00\x0c\x86" + dtype + b"\x89" + string(rows) + b"tb")
    return b"\x80\x02}(" + string(b"data") + array + string(b"fine_labels") + b"]K\x05aK\x07au."


def test_a_python2_pickle_like_the_real_files_loads(tmp_path: Path) -> None:
    rows = bytes(range(256)) * 24
    (tmp_path / "train").write_bytes(python2_pickle(rows))
    content = read_cifar_pickle(str(tmp_path / "train"))
    assert content[b"fine_labels"] == [5, 7]
    assert content[b"data"].dtype == np.uint8 and content[b"data"].shape == (2, 3072)
    assert content[b"data"].tobytes() == rows


def test_cifar_layout_and_content_errors(tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match=r"no meta, train and test files; expected <root>/cifar-100-python/"):
        cifar_fs(root=str(tmp_path))

    root = cifar_files(tmp_path / "truncated")
    train = root / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:200])
    with pytest.raises(FsltoolError, match="train: not a readable CIFAR-100 pickle"):
        cifar_fs(root=str(root))

    root = cifar_files(tmp_path / "nometa")
    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"label_names": []}))
    with pytest.raises(FsltoolError, match="meta: no 'fine_label_names' entry; not a CIFAR-100 python file"):
        cifar_fs(root=str(root))

    root = cifar_files(tmp_path / "list")
    (root / "cifar-100-python" / "test").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(FsltoolError, match="test: holds a list, not the dict"):
        cifar_fs(root=str(root))

    with pytest.raises(FsltoolError, match=r"class 'apple' \(train\) of the cifar-fs/bertinetto split is missing"):
        cifar_fs(root=str(cifar_files(tmp_path / "noapple", per_class={"apple": 0})))

    with pytest.raises(FsltoolError, match="class 'zebra' is not in the cifar-fs/bertinetto split; these are not the "
                                           "CIFAR-100 files"):
        cifar_fs(root=str(cifar_files(tmp_path / "zebra", fine=sorted([*FINE, "zebra"]))))


# ---------------------------------------------------------------- the prepare commands, end to end


@pytest.mark.parametrize(
    ("command", "layout", "counts", "shape"),
    [
        ("miniimagenet", "tree", (64, 16, 20), (3, 8, 8)),
        ("miniimagenet", "csv", (64, 16, 20), (3, 8, 8)),
        ("tieredimagenet", "tiered", (351, 97, 160), (3, 8, 8)),
        ("cub", "cub", (100, 50, 50), (3, 8, 8)),
        ("cifar-fs", "cifar", (64, 16, 20), (3, 32, 32)),
        ("fc100", "cifar", (60, 20, 20), (3, 32, 32)),
    ],
)
def test_prepare_benchmark_commands(tmp_path: Path, tiered_tree: Path, command: str, layout: str,
                                    counts: tuple[int, int, int], shape: tuple[int, int, int]) -> None:
    roots = {
        "tree": lambda: class_folders(tmp_path / "mini", all_classes("miniimagenet/ravi")),
        "csv": lambda: ravi_layout(tmp_path / "mini"),
        "tiered": lambda: tiered_tree,
        "cub": lambda: class_folders(tmp_path / "CUB_200_2011" / "images", all_classes("cub/chen")).parents[1],
        "cifar": lambda: cifar_files(tmp_path),
    }
    options = ["--size", "8"] if shape[1] == 8 else []
    code, _, err = run_cli("prepare", command, str(roots[layout]()), str(tmp_path / "out.h5"), *options,
                           "--shapes", "5w1s", "--query", "1", "--episodes", "3", "-q")
    assert code == 0, err
    with FewShotData(tmp_path / "out.h5") as data:
        assert tuple(len(data.splits[s]) for s in SPLITS) == counts
        assert data.image_shape == shape
        assert data.provenance["source"] == command
        assert data.provenance["split_source"]["source"]["repository"].startswith("https://github.com/")
        assert [str(s) for s in data.stored_shapes("val")] == ["5w1s1q"] == [str(s) for s in data.stored_shapes("test")]
        support, query = data.stored_episodes("test", data.stored_shapes("test")[0])
        assert support.shape == (3, 5) and query.shape == (3, 5)


def test_prepare_benchmark_defaults_and_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fsltool.cli import main

    help_text = CliRunner().invoke(main, ["prepare", "miniimagenet", "--help"]).output
    assert "[default: 5w1s,5w5s]" in help_text and "Example:" in help_text
    code, _, err = run_cli("prepare", "miniimagenet", str(tmp_path), str(tmp_path / "out.h5"), "--split", "vinyals")
    assert code == 2 and "no built-in split 'miniimagenet/vinyals'" in err
    code, _, err = run_cli("prepare", "cub", str(tmp_path), str(tmp_path / "out.h5"))
    assert code == 2 and "no CUB_200_2011/images or images folder" in err and len(err.strip().splitlines()) == 1
