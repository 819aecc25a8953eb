"""Dataset sources on tiny generated trees, CSVs and zips, plus the real Omniglot zips when they are present."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsltool.data.sources import omniglot as omniglot_module
from fsltool.data.sources.base import SourceListing, split_by_ratios
from fsltool.data.sources.csv_splits import csv_splits, read_split_csvs
from fsltool.data.sources.folder import folder
from fsltool.data.sources.omniglot import VAL_ALPHABETS, lake_split, omniglot, vinyals_split
from fsltool.errors import BadImageError, FsltoolError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def write_image(path: Path, size: tuple[int, int] = (8, 8), mode: str = "RGB", color: int | tuple = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


# ---------------------------------------------------------------- folder


def test_folder_classes_are_leaf_folders_at_any_depth(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "2.png")
    write_image(tmp_path / "a" / "1.PNG", mode="L")  # suffix case and image mode do not matter
    write_image(tmp_path / "b" / "x.jpg")  # b holds images and a sub-folder with images: both are classes
    write_image(tmp_path / "b" / "c" / "d" / "y.png", mode="P")
    write_image(tmp_path / ".hidden" / "z.png")
    write_image(tmp_path / "a" / ".z.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()

    listing = folder(root=str(tmp_path), split_ratios=(1.0, 0.0, 0.0))

    assert [spec.name for spec in listing.classes] == ["a", "b", "b/c/d"]
    assert [Path(p).name for p in listing.classes[0].items] == ["1.PNG", "2.png"]
    assert listing.image_shape == (3, 8, 8)
    for spec in listing.classes:
        for item in spec.items:
            image = listing.load(item)
            assert image.shape == (3, 8, 8) and image.dtype == np.uint8
    assert listing.describe(listing.classes[0].items[0]) == str(tmp_path / "a" / "1.PNG")


def test_folder_split_by_ratios_is_seeded_complete_and_stable(tmp_path: Path) -> None:
    for index in range(20):
        write_image(tmp_path / f"class{index:02d}" / "0.png")

    first = folder(root=str(tmp_path), split_seed=3)
    again = folder(root=str(tmp_path), split_seed=3)
    other = folder(root=str(tmp_path), split_seed=4)

    splits = {spec.name: spec.split for spec in first.classes}
    assert splits == {spec.name: spec.split for spec in again.classes}
    assert splits != {spec.name: spec.split for spec in other.classes}
    assert sorted(splits) == [f"class{index:02d}" for index in range(20)]
    assert Counter(splits.values()) == {"train": 13, "val": 3, "test": 4}
    assert first.provenance["split_seed"] == 3
    # The permutation depends only on the names, not on the order they were found in.
    names = list(splits)
    assert split_by_ratios(names, (0.64, 0.16, 0.2), 3) == split_by_ratios(names[::-1], (0.64, 0.16, 0.2), 3)


@pytest.mark.parametrize("ratios", [(0.5, 0.5), (0.5, 0.6, 0.1), (1.2, -0.1, -0.1), ("a", 0, 1)])
def test_folder_bad_split_ratios(tmp_path: Path, ratios: tuple) -> None:
    write_image(tmp_path / "a" / "0.png")
    with pytest.raises(FsltoolError, match="split_ratios"):
        folder(root=str(tmp_path), split_ratios=ratios)


def make_lists(directory: Path, **lists: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, text in lists.items():
        (directory / f"{split}.txt").write_text(text)
    return directory


def test_folder_split_lists(tmp_path: Path) -> None:
    for name in ["a", "b", "c/d", "e"]:
        write_image(tmp_path / "root" / name / "0.png")
    lists = make_lists(tmp_path / "lists", train="a\n\nb\n", val="c/d\n", test="\n")

    listing = folder(root=str(tmp_path / "root"), split_lists=str(lists), split_ratios=(0.0, 0.0, 1.0))

    assert {spec.name: spec.split for spec in listing.classes} == {"a": "train", "b": "train", "c/d": "val"}
    assert listing.provenance["unlisted_classes"] == 1  # e is in no list: left out


def test_folder_split_list_errors(tmp_path: Path) -> None:
    write_image(tmp_path / "root" / "a" / "0.png")
    write_image(tmp_path / "root" / "b" / "0.png")
    root = str(tmp_path / "root")

    unknown = make_lists(tmp_path / "unknown", train="a\n", val="nope\n", test="")
    with pytest.raises(FsltoolError, match=r"val\.txt:1: class 'nope'"):
        folder(root=root, split_lists=str(unknown))

    twice = make_lists(tmp_path / "twice", train="a\n", val="b\n", test="\na\n")
    with pytest.raises(FsltoolError, match=r"test\.txt:2: class 'a' is already listed at .*train\.txt:1"):
        folder(root=root, split_lists=str(twice))

    empty = make_lists(tmp_path / "empty", train="\n", val="", test="")
    with pytest.raises(FsltoolError, match="name no class"):
        folder(root=root, split_lists=str(empty))

    missing = make_lists(tmp_path / "missing", train="a\n", val="b\n")
    with pytest.raises(FsltoolError, match=r"missing .*test\.txt"):
        folder(root=root, split_lists=str(missing))


def test_folder_mixed_sizes_need_size(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "0.png", size=(8, 8))
    odd = write_image(tmp_path / "a" / "1.png", size=(10, 6))

    listing = folder(root=str(tmp_path), size=None)
    assert listing.image_shape == (3, 8, 8)
    listing.load(listing.classes[0].items[0])
    with pytest.raises(FsltoolError, match=rf"{odd}: image is 10x6 .* --size"):
        listing.load(listing.classes[0].items[1])

    resized = folder(root=str(tmp_path), size=5, channels=1)
    assert resized.image_shape == (1, 5, 5)
    assert all(resized.load(item).shape == (1, 5, 5) for item in resized.classes[0].items)


def test_folder_root_and_empty_errors(tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match="no such folder"):
        folder(root=str(tmp_path / "absent"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FsltoolError, match="not a folder"):
        folder(root=str(tmp_path / "file"))
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "readme.txt").write_text("x")
    with pytest.raises(FsltoolError, match="empty source"):
        folder(root=str(tmp_path / "tree"))
    write_image(tmp_path / "flat" / "0.png")
    with pytest.raises(FsltoolError, match="holds images directly"):
        folder(root=str(tmp_path / "flat"))
    write_image(tmp_path / "tree" / "a" / "0.png")
    with pytest.raises(FsltoolError, match="channels"):
        folder(root=str(tmp_path / "tree"), channels=2)


def test_folder_corrupt_or_empty_image_raises_bad_image_on_load(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "0.png")
    (tmp_path / "a" / "1.png").write_bytes(b"not a png at all")
    (tmp_path / "a" / "2.png").write_bytes(b"")

    listing = folder(root=str(tmp_path), size=8)  # listing itself decodes nothing
    loader = pickle.loads(pickle.dumps(listing.load))  # and its load travels to worker processes
    for item in listing.classes[0].items[1:]:
        with pytest.raises(BadImageError, match=str(item)) as error:
            loader(item)
        assert error.value.path == item


# ---------------------------------------------------------------- csv


def make_csv_tree(tmp_path: Path, **csvs: str) -> tuple[Path, Path]:
    images, splits = tmp_path / "images", tmp_path / "splits"
    for name in ["n1_0.jpg", "n1_1.jpg", "n2_0.jpg", "sub/n3_0.jpg"]:
        write_image(images / name, size=(12, 10))
    texts = {
        "train": "filename,label\nn1_0.jpg,n1\nn1_1.jpg,n1\n",
        "val": "filename,label\nn2_0.jpg,n2\n",
        "test": "filename,label\nsub/n3_0.jpg,n3\n",
    }
    texts.update(csvs)
    splits.mkdir()
    for split, text in texts.items():
        (splits / f"{split}.csv").write_text(text)
    return images, splits


def test_csv_splits_happy_path(tmp_path: Path) -> None:
    images, splits = make_csv_tree(tmp_path)
    listing = csv_splits(images=str(images), splits=str(splits), size=6)
    assert [(spec.name, spec.split, len(spec.items)) for spec in listing.classes] == [
        ("n1", "train", 2),
        ("n2", "val", 1),
        ("n3", "test", 1),
    ]
    assert listing.image_shape == (3, 6, 6)
    image = listing.load(listing.classes[2].items[0])
    assert image.shape == (3, 6, 6) and image.dtype == np.uint8
    assert listing.describe(listing.classes[2].items[0]) == str(images / "sub" / "n3_0.jpg")

    original = csv_splits(images=str(images), splits=str(splits), channels=1, size=None)
    assert original.image_shape == (1, 10, 12)


@pytest.mark.parametrize(
    ("csvs", "message"),
    [
        ({"val": "file,label\nn2_0.jpg,n2\n"}, r"val\.csv:1: header"),
        ({"val": "filename,label\nn2_0.jpg\n"}, r"val\.csv:2: expected two fields"),
        ({"val": "filename,label\nn2_0.jpg,n2,extra\n"}, r"val\.csv:2: expected two fields"),
        ({"test": "filename,label\nsub/n3_0.jpg,n1\n"}, r"test\.csv:2: label n1 is also in .*train\.csv"),
        ({"val": "filename,label\nn2_0.jpg,n2\nn1_0.jpg,n2\n"}, r"val\.csv:3: n1_0\.jpg is already listed at"),
        ({"val": "filename,label\nmissing.jpg,n2\n"}, r"val\.csv:2: image .*missing\.jpg does not exist"),
        ({"val": "filename,label\n/etc/n2_0.jpg,n2\n"}, r"val\.csv:2: refusing path '/etc/n2_0\.jpg'"),
        ({"val": "filename,label\n../images/n2_0.jpg,n2\n"}, r"val\.csv:2: refusing path '\.\./images"),
    ],
)
def test_csv_splits_errors(tmp_path: Path, csvs: dict[str, str], message: str) -> None:
    images, splits = make_csv_tree(tmp_path, **csvs)
    with pytest.raises(FsltoolError, match=message):
        csv_splits(images=str(images), splits=str(splits))


def test_csv_splits_missing_file_and_folders(tmp_path: Path) -> None:
    images, splits = make_csv_tree(tmp_path)
    (splits / "test.csv").unlink()
    with pytest.raises(FsltoolError, match=r"missing .*test\.csv"):
        csv_splits(images=str(images), splits=str(splits))
    with pytest.raises(FsltoolError, match="images .*no such folder"):
        csv_splits(images=str(tmp_path / "nothing"), splits=str(splits))


def test_real_ravi_split_files() -> None:
    ravi = SHARED / "miniimagenet" / "splits" / "ravi"
    if not ravi.is_dir():
        pytest.skip(f"{ravi} is not here")
    rows = read_split_csvs(str(ravi))
    assert {split: len(labels) for split, labels in rows.items()} == {"train": 64, "val": 16, "test": 20}
    assert {len(class_rows) for labels in rows.values() for class_rows in labels.values()} == {600}


# ---------------------------------------------------------------- omniglot

FAKE_CHARACTERS = {
    "images_background": ["Gurmukhi/character41", "Gurmukhi/character42", "Hebrew/character01"],
    "images_evaluation": ["Kannada/character01"],
}


def omniglot_png() -> bytes:
    """A 105x105 mode '1' image like Omniglot's: white background, one black stroke in the top-left corner."""
    image = Image.new("1", (105, 105), 1)
    image.paste(0, (10, 10, 40, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_omniglot_zips(root: Path, extra_member: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = omniglot_png()
    for part, characters in FAKE_CHARACTERS.items():
        with zipfile.ZipFile(root / f"{part}.zip", "w") as archive:
            archive.writestr(f"{part}/", b"")
            for character in characters:
                for drawer in (1, 2):
                    archive.writestr(f"{part}/{character}/0001_{drawer:02d}.png", data)
            if extra_member and part == "images_background":
                archive.writestr(extra_member, data)
    return root


def test_vinyals_split_rule() -> None:
    assert vinyals_split("Gurmukhi", 41) == "train"
    assert [vinyals_split("Gurmukhi", n) for n in (42, 45)] == ["test", "test"]
    assert vinyals_split("Gurmukhi", 46) == "train"
    assert vinyals_split("Hebrew", 1) == "val"
    assert vinyals_split("Old_Church_Slavonic_(Cyrillic)", 3) == "test"
    assert vinyals_split("Latin", 1) == "train"


def test_omniglot_fake_zip(tmp_path: Path) -> None:
    listing = omniglot(root=str(make_omniglot_zips(tmp_path)), size=None)

    assert len(listing.classes) == 4 * 4
    splits = {spec.name: spec.split for spec in listing.classes}
    assert splits["Gurmukhi/character41/rot000"] == "train"
    assert splits["Gurmukhi/character42/rot270"] == "test"
    assert splits["Hebrew/character01/rot090"] == "val"
    assert splits["Kannada/character01/rot180"] == "test"
    assert {name.rsplit("/", 1)[1] for name in splits} == {"rot000", "rot090", "rot180", "rot270"}
    assert all(len(spec.items) == 2 for spec in listing.classes)
    assert listing.provenance["form"] == {"images_background": "zip", "images_evaluation": "zip"}

    by_name = {spec.name: spec for spec in listing.classes}
    upright = listing.load(by_name["Hebrew/character01/rot000"].items[0])
    turned = listing.load(by_name["Hebrew/character01/rot090"].items[0])
    assert upright.shape == (1, 105, 105) and upright.dtype == np.uint8
    assert upright[0, 15, 20] == 255 and upright[0, 80, 80] == 0  # inverted: the stroke is high
    np.testing.assert_array_equal(turned[0], np.rot90(upright[0]))  # counter-clockwise, lossless
    assert "images_background.zip:images_background/Hebrew/character01/0001_01.png" in listing.describe(
        by_name["Hebrew/character01/rot000"].items[0]
    )

    small = omniglot(root=str(tmp_path), rotations=False)
    assert [spec.name.endswith("/rot000") for spec in small.classes] == [True] * 4
    assert small.image_shape == (1, 28, 28)
    assert small.load(small.classes[0].items[0]).shape == (1, 28, 28)
    assert pickle.loads(pickle.dumps(small.load))(small.classes[0].items[0]).shape == (1, 28, 28)


def test_lake_split_rule() -> None:
    assert lake_split("images_evaluation", "Kannada") == "test"
    assert lake_split("images_evaluation", "Gurmukhi") == "test"  # all of it, where Vinyals tests 4 characters
    assert lake_split("images_background", "Hebrew") == "val"
    assert lake_split("images_background", "Latin") == "train"


def test_omniglot_fake_zip_lake_split(tmp_path: Path) -> None:
    root = str(make_omniglot_zips(tmp_path))
    listing = omniglot(root=root, rotations=False, split="lake")

    splits = {spec.name: spec.split for spec in listing.classes}
    assert splits == {  # by zip: Gurmukhi/character42 is in the background zip here, so it trains
        "Gurmukhi/character41/rot000": "train",
        "Gurmukhi/character42/rot000": "train",
        "Hebrew/character01/rot000": "val",
        "Kannada/character01/rot000": "test",
    }
    assert listing.provenance["split"] == "lake"
    assert omniglot(root=root).provenance["split"] == "vinyals"
    with pytest.raises(FsltoolError, match=r"omniglot --split 'koch': must be one of vinyals, lake, random"):
        omniglot(root=root, split="koch")


def test_prepare_omniglot_records_the_split(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fsltool.cli import data_protocol_of, main
    from fsltool.data.store import FewShotData

    root, out = make_omniglot_zips(tmp_path / "zips"), tmp_path / "lake.h5"
    args = ["prepare", "omniglot", str(root), str(out), "--shapes", "2w1s", "--query", "1", "--episodes", "2",
            "--episode-splits", "test", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--split", "lake"])
    assert result.exit_code == 0, result.output
    with FewShotData(out) as data:
        assert data.provenance["split"] == "lake"
        assert {split: len(classes) for split, classes in data.splits.items()} == {"train": 8, "val": 4, "test": 4}
        assert data_protocol_of(data.provenance) == {"class_split": "lake", "image_resample": "lanczos"}  # what `evaluate --json` reports
        assert len(data.images(np.arange(data.num_images)).unique()) > 2  # antialiased edges
    shuffled = tmp_path / "random.h5"
    result = CliRunner().invoke(main, [*args[:3], str(shuffled), *args[4:], "--split", "random", "--split-seed", "7",
                                       "--resample", "nearest"])
    assert result.exit_code == 0, result.output
    with FewShotData(shuffled) as data:
        assert data_protocol_of(data.provenance) == {"class_split": "random", "class_split_seed": 7, "image_resample": "nearest"}
        pixels = data.images(np.arange(data.num_images)).unique().tolist()
        assert set(pixels) == {0.0, 1.0}  # binary glyphs, as the reference code's
        assert {split: len(classes) for split, classes in data.splits.items()} == {"train": 8, "val": 4, "test": 4}

    bad = CliRunner().invoke(main, [*args, "--split", "koch"])
    assert bad.exit_code == 2 and "Invalid value for '--split': 'koch' is not one of 'vinyals', 'lake', 'random'" in bad.output
    bad = CliRunner().invoke(main, [*args, "--resample", "cubic"])
    assert bad.exit_code == 2 and "Invalid value for '--resample': 'cubic' is not one of 'lanczos', 'nearest'" in bad.output


def test_omniglot_extracted_folders_match_zips(tmp_path: Path) -> None:
    zips = make_omniglot_zips(tmp_path / "zips")
    folders = tmp_path / "folders"
    for part in FAKE_CHARACTERS:
        with zipfile.ZipFile(zips / f"{part}.zip") as archive:
            archive.extractall(folders)

    from_zips = omniglot(root=str(zips))
    from_folders = omniglot(root=str(folders))

    assert from_folders.provenance["form"] == {"images_background": "folder", "images_evaluation": "folder"}
    assert [(s.name, s.split, len(s.items)) for s in from_folders.classes] == [
        (s.name, s.split, len(s.items)) for s in from_zips.classes
    ]
    item = from_folders.classes[5].items[1]
    assert Path(from_folders.describe(item)).is_file()
    np.testing.assert_array_equal(from_folders.load(item), from_zips.load(from_zips.classes[5].items[1]))


def test_omniglot_errors(tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match=r"neither images_background\.zip nor an extracted images_background/"):
        omniglot(root=str(tmp_path))

    evil = make_omniglot_zips(tmp_path / "evil", extra_member="images_background/../../evil.png")
    with pytest.raises(FsltoolError, match=r"refusing path 'images_background/\.\./\.\./evil\.png'"):
        omniglot(root=str(evil))

    absolute = make_omniglot_zips(tmp_path / "absolute", extra_member="/tmp/evil.png")
    with pytest.raises(FsltoolError, match="refusing path '/tmp/evil.png'"):
        omniglot(root=str(absolute))

    broken = make_omniglot_zips(tmp_path / "broken")
    (broken / "images_evaluation.zip").write_bytes(b"not a zip")
    with pytest.raises(FsltoolError, match=r"images_evaluation\.zip: cannot read the zip"):
        omniglot(root=str(broken))

    flat = make_omniglot_zips(tmp_path / "flat", extra_member="images_background/Latin/0001_01.png")
    with pytest.raises(FsltoolError, match="not in the Omniglot layout"):
        omniglot(root=str(flat))


def test_omniglot_corrupt_member_raises_bad_image(tmp_path: Path) -> None:
    root = make_omniglot_zips(tmp_path, extra_member="images_background/Latin/character01/0002_01.png")
    with zipfile.ZipFile(root / "images_background.zip", "a") as archive:
        archive.writestr("images_background/Latin/character01/0002_02.png", b"garbage")
    listing = omniglot(root=str(root))
    latin = next(spec for spec in listing.classes if spec.name == "Latin/character01/rot000")
    with pytest.raises(BadImageError, match=r"images_background\.zip:images_background/Latin/character01/0002_02"):
        listing.load(latin.items[1])


def real_omniglot_listed(monkeypatch: pytest.MonkeyPatch, **options: object) -> SourceListing:
    """The real Omniglot zips of ../shared listed with ``options`` (skipped where they are absent), failing if
    listing decodes any image."""
    data = SHARED / "omniglot"
    if not (data / "images_background.zip").is_file():
        pytest.skip(f"{data} is not here")

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("listing must not decode images")

    with monkeypatch.context() as patch:
        patch.setattr(omniglot_module, "decode_image", no_decoding)
        return omniglot(root=str(data), **options)  # type: ignore[arg-type]


def test_real_omniglot_listing_matches_vinyals_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    data = SHARED / "omniglot"
    if not (data / "splits" / "vinyals").is_dir():
        pytest.skip(f"{data} is not here")
    listing = real_omniglot_listed(monkeypatch)

    counts = {}
    for split in ("train", "val", "test"):
        expected = set((data / "splits" / "vinyals" / f"{split}.txt").read_text().split())
        listed = {spec.name for spec in listing.classes if spec.split == split}
        assert listed == expected, split
        counts[split] = len(listed)
    assert counts == {"train": 4112, "val": 688, "test": 1692}
    assert {len(spec.items) for spec in listing.classes} == {20}

    image = listing.load(listing.classes[0].items[0])
    assert image.shape == (1, 28, 28) and image.dtype == np.uint8
    assert image.mean() < 64  # inverted: mostly dark background, bright strokes


def test_real_omniglot_lake_split_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lake et al.'s split on the real zips: all 964 background characters (30 alphabets) train or validate, all
    659 evaluation characters (20 alphabets) test, every character with its 20 drawers."""
    listing = real_omniglot_listed(monkeypatch, rotations=False, split="lake")

    by_split: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    parts: dict[str, set[str]] = {"images_background": set(), "images_evaluation": set()}
    for spec in listing.classes:
        by_split[spec.split].add(spec.name)
        members = [member for _, member, _ in spec.items]
        assert sorted(member[-6:-4] for member in members) == [f"{d:02d}" for d in range(1, 21)], spec.name
        (part,) = {member.split("/")[0] for member in members}
        parts[part].add(spec.name)
    alphabets = {split: {name.split("/")[0] for name in names} for split, names in by_split.items()}
    assert {split: len(names) for split, names in by_split.items()} == {"train": 792, "val": 172, "test": 659}
    assert {split: len(names) for split, names in alphabets.items()} == {"train": 25, "val": 5, "test": 20}
    assert alphabets["val"] == VAL_ALPHABETS
    assert by_split["train"] | by_split["val"] == parts["images_background"] and len(parts["images_background"]) == 964
    assert by_split["test"] == parts["images_evaluation"]
    assert listing.provenance["split"] == "lake" and listing.provenance["rotations"] is False

    rotated = real_omniglot_listed(monkeypatch, split="lake")
    assert Counter(spec.split for spec in rotated.classes) == {"train": 4 * 792, "val": 4 * 172, "test": 4 * 659}


def test_random_split_is_seeded_by_character_and_keeps_rotations_together(tmp_path: Path) -> None:
    root = str(make_omniglot_zips(tmp_path))
    listing = omniglot(root=root, split="random", split_seed=3)
    by_character: dict[str, set[str]] = {}
    for spec in listing.classes:
        by_character.setdefault(spec.name.rsplit("/", 1)[0], set()).add(spec.split)
    assert all(len(splits) == 1 for splits in by_character.values())  # a character's rotations share its split
    assert Counter(next(iter(s)) for s in by_character.values()) == {"train": 2, "val": 1, "test": 1}  # at least one each
    assert listing.provenance["split"] == "random" and listing.provenance["split_seed"] == 3
    again = omniglot(root=root, split="random", split_seed=3)
    assert [(s.name, s.split) for s in again.classes] == [(s.name, s.split) for s in listing.classes]
    seeds = {tuple(s.split for s in omniglot(root=root, rotations=False, split="random", split_seed=seed).classes) for seed in range(8)}
    assert len(seeds) > 1  # the seed decides
    assert "split_seed" not in omniglot(root=root).provenance


def test_random_split_counts_cut_the_same_shuffle_and_keep_its_test_characters(tmp_path: Path) -> None:
    """MAML's and MAML++'s codes cut the shuffle at other counts (1100/100/423, 1150/50/423): the same seed and test
    count keep the test characters; counts that do not add up, or on another protocol, are one-line errors."""
    from click.testing import CliRunner

    from fsltool.cli import data_protocol_of, main
    from fsltool.data.store import FewShotData

    root = make_omniglot_zips(tmp_path / "zips")

    def characters(listing: SourceListing) -> dict[str, set[str]]:
        by_split: dict[str, set[str]] = {}
        for spec in listing.classes:
            by_split.setdefault(spec.split, set()).add(spec.name.rsplit("/", 1)[0])
        return by_split

    default = characters(omniglot(root=str(root), split="random", split_seed=3))
    counted = omniglot(root=str(root), split="random", split_seed=3, split_counts=(1, 2, 1))
    moved = characters(counted)
    assert {split: len(names) for split, names in moved.items()} == {"train": 1, "val": 2, "test": 1}
    assert moved["test"] == default["test"] and default["val"] <= moved["val"]
    assert counted.provenance["split_counts"] == [1, 2, 1] and data_protocol_of(counted.provenance)["class_split_counts"] == [1, 2, 1]
    with pytest.raises(FsltoolError, match=r"^omniglot --split-counts 2,2,1: they add up to 5, the source has 4 characters$"):
        omniglot(root=str(root), split="random", split_counts=(2, 2, 1))
    with pytest.raises(FsltoolError, match=r"^omniglot --split-counts 3,0,1: give three positive character counts"):
        omniglot(root=str(root), split="random", split_counts=(3, 0, 1))
    with pytest.raises(FsltoolError, match=r"^omniglot --split-counts: only --split random"):
        omniglot(root=str(root), split_counts=(2, 1, 1))

    out = tmp_path / "counted.h5"
    args = ["prepare", "omniglot", str(root), str(out), "--split", "random", "--split-seed", "3", "--shapes", "2w1s",
            "--query", "1", "--episodes", "2", "--episode-splits", "val", "--no-rotations", "--quiet"]
    bad = CliRunner().invoke(main, [*args, "--split-counts", "2,2"])
    assert bad.exit_code == 2 and "--split-counts '2,2': expected three whole numbers (train,val,test)" in bad.output
    assert not out.exists()
    result = CliRunner().invoke(main, [*args, "--split-counts", "1,2,1"])
    assert result.exit_code == 0, result.output
    with FewShotData(out) as data:
        assert {split: len(classes) for split, classes in data.splits.items()} == {"train": 1, "val": 2, "test": 1}
        assert data_protocol_of(data.provenance) == {"class_split": "random", "class_split_seed": 3, "class_split_counts": [1, 2, 1],
                                                     "image_resample": "lanczos", "rotated_splits": []}  # --no-rotations: none


def test_rotated_splits_leave_the_other_splits_upright(tmp_path: Path) -> None:
    """Reptile's reference protocol: rotated training classes, upright test characters; recorded for evaluate."""
    from click.testing import CliRunner

    from fsltool.cli import data_protocol_of, main
    from fsltool.data.store import FewShotData

    root = make_omniglot_zips(tmp_path / "zips")
    listing = omniglot(root=str(root), split="random", split_seed=3, rotated_splits=("train", "val"))
    everywhere = omniglot(root=str(root), split="random", split_seed=3)
    assert Counter(spec.split for spec in listing.classes) == {"train": 8, "val": 4, "test": 1}
    assert Counter(spec.split for spec in everywhere.classes) == {"train": 8, "val": 4, "test": 4}
    assert all(spec.name.endswith("/rot000") for spec in listing.classes if spec.split == "test")
    assert listing.provenance["rotated_splits"] == ["train", "val"] and "rotated_splits" not in everywhere.provenance
    with pytest.raises(FsltoolError, match=r"omniglot --rotated-splits 'train,tset': 'tset' is not one of train, val, test"):
        omniglot(root=str(root), rotated_splits=("train", "tset"))

    out = tmp_path / "upright-test.h5"
    args = ["prepare", "omniglot", str(root), str(out), "--split", "random", "--split-seed", "3", "--shapes", "2w1s",
            "--query", "1", "--episodes", "2", "--episode-splits", "val", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--rotated-splits", "train,val"])
    assert result.exit_code == 0, result.output
    with FewShotData(out) as data:
        assert len(data.splits["test"]) == 1
        assert data_protocol_of(data.provenance)["rotated_splits"] == ["train", "val"]
    bad = CliRunner().invoke(main, [*args, "--rotated-splits", "train,tset", "--force"])
    assert bad.exit_code != 0 and "'tset' is not one of train, val, test" in bad.output


def test_random_split_of_the_real_zips_has_the_vinyals_counts_and_shares_alphabets(monkeypatch: pytest.MonkeyPatch) -> None:
    """1028 / 172 / 423 characters as the Vinyals split, but drawn across alphabets (as the Relation Network and MAML
    reference code split Omniglot): most test alphabets also have training characters, where Vinyals shares one."""
    shuffled, vinyals = real_omniglot_listed(monkeypatch, split="random"), real_omniglot_listed(monkeypatch)

    def alphabets(listing: SourceListing, split: str) -> set[str]:
        return {spec.name.split("/")[0] for spec in listing.classes if spec.split == split}

    assert Counter(spec.split for spec in shuffled.classes) == {"train": 4 * 1028, "val": 4 * 172, "test": 4 * 423}
    assert len(alphabets(vinyals, "train") & alphabets(vinyals, "test")) == 1
    assert len(alphabets(shuffled, "train") & alphabets(shuffled, "test")) >= 40
    assert {s.name for s in shuffled.classes if s.split == "test"} != {s.name for s in vinyals.classes if s.split == "test"}
