"""Data at scale: packing in bounded blocks gives the same file as packing class by class, large files are read per
episode, and several processes read one data file at once."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fsltool.data import pack as pack_module
from fsltool.data.pack import pack
from fsltool.data.sources.synthetic import synthetic
from fsltool.data.store import FewShotData
from tests.conftest import small_plan

READER = """
import hashlib, sys
from fsltool.data.store import FewShotData
with FewShotData(sys.argv[1], in_memory_limit=0) as data:
    digest = hashlib.sha256()
    for first in range(0, data.num_images, 97):
        digest.update(data.images(list(range(first, min(first + 97, data.num_images)))).numpy().tobytes())
print(digest.hexdigest())
"""


def test_packing_in_small_blocks_writes_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = synthetic(classes=30, images_per_class=20)
    pack(listing, tmp_path / "whole.h5", small_plan(), quiet=True)
    monkeypatch.setattr(pack_module, "BLOCK_BYTES", 7 * 28 * 28)  # 7 images a block: classes span several blocks
    pack(listing, tmp_path / "blocks.h5", small_plan(), quiet=True)
    with h5py.File(tmp_path / "whole.h5") as whole, h5py.File(tmp_path / "blocks.h5") as blocks:
        for key in ("images", "classes/start", "classes/count", "episodes/val/5w1s5q/support"):
            assert np.array_equal(whole[key][...], blocks[key][...]), key
        np.testing.assert_allclose(whole.attrs["normalization_std"], blocks.attrs["normalization_std"], rtol=1e-12)


def test_two_processes_read_one_file_at_once(synthetic_file: Path) -> None:
    with FewShotData(synthetic_file, in_memory_limit=0) as data:  # this process holds it open too
        assert not data.in_memory
        expected = hashlib.sha256(data.images(np.arange(data.num_images)).numpy().tobytes()).hexdigest()
        readers = [subprocess.Popen([sys.executable, "-c", READER, str(synthetic_file)], stdout=subprocess.PIPE, text=True)
                   for _ in range(2)]
        outputs = [reader.communicate(timeout=120)[0].strip() for reader in readers]
    assert [reader.returncode for reader in readers] == [0, 0]
    assert outputs == [expected, expected]
