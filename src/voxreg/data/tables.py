"""Tables of subjects: file identifiers and per-image attributes read from CSV files."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["image_id", "read_attributes"]


def image_id(path: str | os.PathLike) -> str:
    """A file's name without its image extension: ``sub/IXI012-HH-1211.nii.gz`` ->
    ``IXI012-HH-1211``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mgz", ".mgh", ".npz", ".npy"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def read_attributes(table: str | os.PathLike, columns: Sequence[str] | str,
                    images: Sequence[str | os.PathLike]) -> np.ndarray:
    """The attribute values of each image from a CSV table.

    Rows are matched to images by an ``id`` (or ``subject``) column holding the file names
    without extension (see :func:`image_id`), or by a ``path`` (or ``image``) column holding the
    files (relative paths are taken from the table's folder).

    Args:
        table: the CSV file (with a header row).
        columns: the attribute column(s), e.g. ``"age"``.
        images: the image files, in training order.

    Returns:
        ``(N, len(columns))`` float64.

    Raises:
        FileNotFoundError, ValueError: a missing table, column, image row or number (the message
        names the file, the column and the image).
    """
    table = Path(table)
    columns = [columns] if isinstance(columns, str) else [str(c) for c in columns]
    if not columns:
        raise ValueError("give at least one attribute column")
    if not table.is_file():
        raise FileNotFoundError(f"attributes table {str(table)!r} does not exist")
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        header = [(c or "").strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"attributes table {str(table)!r} has no column {missing[0]!r} "
                         f"(columns: {', '.join(header)})")
    key = next((c for c in ("id", "subject", "path", "image") if c in header), None)
    if key is None:
        raise ValueError(f"attributes table {str(table)!r} needs an 'id' (file name without "
                         "extension) or 'path' column to match its rows to the images")
    by_key: dict[str, tuple[int, dict[str, str]]] = {}
    for number, row in enumerate(rows, start=2):
        value = row.get(key, "")
        if not value:
            continue
        if key in ("path", "image"):
            path = Path(value).expanduser()
            value = str((path if path.is_absolute() else table.parent / path).resolve())
        by_key.setdefault(value, (number, row))
    out = np.empty((len(images), len(columns)))
    for i, image in enumerate(images):
        lookup = image_id(image) if key in ("id", "subject") else str(Path(image).resolve())
        if lookup not in by_key:
            raise ValueError(f"image {str(image)!r} has no row in {str(table)!r} (looked for "
                             f"{key} = {lookup!r})")
        number, row = by_key[lookup]
        for j, column in enumerate(columns):
            text = row.get(column, "")
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not math.isfinite(value):
                raise ValueError(f"{str(table)!r} line {number}: {column} of image "
                                 f"{str(image)!r} is {text!r}, not a number")
            out[i, j] = value
    return out

