"""Images listed by split CSV files (``filename,label``), as in the Ravi & Larochelle miniImageNet layout."""

from __future__ import annotations

import csv
import os
from typing import Any, NamedTuple

from fsltool.data.sources.base import (
    SPLITS,
    ClassSpec,
    SourceListing,
    check_image_options,
    check_relative_path,
    image_file_listing,
    require_folder,
)
from fsltool.errors import FsltoolError

HEADER = ["filename", "label"]


class CsvRow(NamedTuple):
    """One image row; ``where`` (``file:line``) lets later checks name the row."""

    filename: str
    label: str
    where: str


def csv_splits(*, images: str, splits: str, channels: int = 3, size: int | None = 84) -> SourceListing:
    """List ``<splits>/{train,val,test}.csv``; class = label, image = ``<images>/<filename>``.

    Every listed image must exist (checked by path only; nothing is decoded here).
    """
    images, splits = str(images), str(splits)
    require_folder(images, "images")
    check_image_options(channels, size)
    classes = []
    for split, labels in read_split_csvs(splits).items():
        for label in sorted(labels):
            paths = []
            for row in labels[label]:
                path = os.path.join(images, *row.filename.split("/"))
                if not os.path.exists(path):
                    raise FsltoolError(f"{row.where}: image {path} does not exist")
                paths.append(path)
            classes.append(ClassSpec(label, split, tuple(paths)))
    if not classes:
        raise FsltoolError(f"splits {splits}: empty source, the CSV files list no images")
    provenance: dict[str, Any] = {
        "source": "csv_splits",
        "images": images,
        "splits": splits,
        "channels": channels,
        "size": size,
    }
    return image_file_listing(classes, channels=channels, size=size, provenance=provenance)


def read_split_csvs(splits: str) -> dict[str, dict[str, list[CsvRow]]]:
    """Split -> label -> rows of ``<splits>/{train,val,test}.csv``, checked as text only (images are not looked at).

    Refuses a missing file, a bad header, a row without exactly two non-empty fields, an unsafe filename, a filename
    listed twice, and a label in two split files (classes must not leak between splits).
    """
    require_folder(splits, "splits")
    result: dict[str, dict[str, list[CsvRow]]] = {}
    label_file: dict[str, str] = {}
    filename_row: dict[str, str] = {}
    for split in SPLITS:
        path = os.path.join(splits, f"{split}.csv")
        if not os.path.isfile(path):
            raise FsltoolError(f"splits {splits}: missing {path}")
        labels: dict[str, list[CsvRow]] = {}
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = [field.strip() for field in next(reader, [])]
            if header != HEADER:
                raise FsltoolError(f"{path}:1: header must be 'filename,label', not {','.join(header)!r}")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row:
                    continue
                fields = [field.strip() for field in row]
                if len(fields) != 2 or not all(fields):
                    raise FsltoolError(f"{where}: expected two fields 'filename,label', got {','.join(row)!r}")
                filename, label = fields
                check_relative_path(filename, where)
                if filename in filename_row:
                    raise FsltoolError(f"{where}: {filename} is already listed at {filename_row[filename]}")
                if label_file.setdefault(label, path) != path:
                    other = label_file[label]
                    raise FsltoolError(f"{where}: label {label} is also in {other}; a class belongs to one split")
                filename_row[filename] = where
                labels.setdefault(label, []).append(CsvRow(filename, label, where))
        result[split] = labels
    return result
