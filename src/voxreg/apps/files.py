"""File-level helpers shared by the pipelines of :mod:`voxreg.apps` (and so by the ``voxreg``
command): turning a path, a nibabel image or a :class:`voxreg.io.Image` into an image, grid
checks and resampling onto the fixed grid, the normalised image pair a model reads, the model
itself, lists of image files, the pairs CSV of ``voxreg eval`` and CSV tables of results.

Every error names the argument it is about (by its command-line spelling, ``--inverse-warp`` for
``inverse_warp``) and says what to do. Nothing here writes an image; :func:`write_csv` writes a
table atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import glob as globlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from voxreg import io
from voxreg._atomic import atomic_path
from voxreg.checkpoint import load_model

__all__ = [
    "ImageLike",
    "ModelLike",
    "NORMALIZE_METHODS",
    "PAIR_COLUMNS",
    "PathLike",
    "as_image",
    "describe",
    "fit_rank",
    "format_value",
    "gather_images",
    "glob_files",
    "grid_difference",
    "grid_error",
    "mean_sd",
    "model_normalize",
    "network_features",
    "onto_grid",
    "prepare_pair",
    "read_list",
    "read_pairs",
    "resolve_model",
    "source_path",
    "write_csv",
]

#: A file name.
PathLike = str | os.PathLike
#: What the pipelines accept as an image: a file path, a nibabel image or a voxreg.io.Image.
ImageLike = str | os.PathLike | nib.spatialimages.SpatialImage | io.Image
#: What they accept as a model: a checkpoint file, a shipped model name or a module.
ModelLike = str | os.PathLike | nn.Module

NORMALIZE_METHODS = ("percentile", "minmax", "none")
#: The columns of a pairs CSV (:func:`read_pairs`).
PAIR_COLUMNS = ("moving", "fixed", "moving_labels", "fixed_labels")


# --------------------------------------------------------------------------------------------
# images and models
# --------------------------------------------------------------------------------------------


def source_path(value: Any) -> Path | None:
    """The file ``value`` stands for or was read from: a path itself, a nibabel image's file
    name, an :class:`io.Image`'s ``path``; ``None`` for data held only in memory."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    if isinstance(value, io.Image):
        return None if value.path is None else Path(value.path)
    if isinstance(value, nib.spatialimages.SpatialImage):
        name = value.get_filename()
        return None if name is None else Path(name)
    return None


def _from_nibabel(image: nib.spatialimages.SpatialImage, name: str) -> io.Image:
    """An in-memory nibabel image as :func:`io.load_image` reads its file (4D: channels first)."""
    data = np.asarray(image.dataobj)
    if data.dtype == object or not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise ValueError(f"{name} holds no numeric image (dtype {data.dtype})")
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    channels = data.ndim == 4
    if channels:
        data = np.moveaxis(data, -1, 0)
    if data.ndim < 2 or data.ndim - channels > 3:
        raise ValueError(f"{name} has shape {image.shape}; voxreg reads 2D and 3D images")
    path = source_path(image)
    return io.Image(np.ascontiguousarray(data), np.asarray(image.affine, dtype=np.float64),
                    image.header, path, channels)


def as_image(value: ImageLike, name: str, labels: bool = False) -> io.Image:
    """``value`` as a :class:`voxreg.io.Image` the caller may change (the caller's own object is
    never modified: an :class:`io.Image` is copied, shallowly).

    Args:
        value: a file path (read with :func:`io.load_image`, or :func:`io.load_labels` with
            ``labels``), a nibabel image (its data as stored, scaling applied; a 4D image is
            ``(C, *spatial)`` with ``channels``) or an :class:`io.Image`.
        name: the argument's name, for the messages.

    Raises:
        TypeError: ``value`` is none of these.
        FileNotFoundError, ValueError: as :func:`io.load_image`.

    >>> import numpy as np
    >>> as_image(io.Image(np.zeros((4, 5))), "moving").shape
    (4, 5)
    """
    if isinstance(value, io.Image):
        return dataclasses.replace(value)
    if isinstance(value, nib.spatialimages.SpatialImage):
        image = _from_nibabel(value, name)
        if labels and image.data.dtype == np.bool_:
            image.data = image.data.astype(np.uint8)
        elif labels and not np.issubdtype(image.data.dtype, np.integer):
            data = image.data
            if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
                raise ValueError(f"{name} is not a label map: it holds non-integer values")
            image.data = data.astype(np.int32)
        return image
    if isinstance(value, (str, os.PathLike)):
        return io.load_labels(value) if labels else io.load_image(value)
    raise TypeError(f"{name} must be a file path, a nibabel image or a voxreg.io.Image, "
                    f"got {type(value).__name__}")


def describe(image: io.Image) -> str:
    """How messages name an image: its file (quoted), or ``<in memory>``."""
    return repr(str(image.path)) if image.path is not None else "<in memory>"


def resolve_model(model: ModelLike, device: torch.device) -> nn.Module:
    """A model to run: a checkpoint file or shipped model name loaded onto ``device``
    (:func:`voxreg.checkpoint.load_model`), or the module itself (unchanged here).

    Raises:
        TypeError: ``model`` is none of these.
        FileNotFoundError, CheckpointError: as :func:`voxreg.checkpoint.load_model`.
    """
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device=device)
    raise TypeError("model must be a checkpoint file, a shipped model name or a torch.nn.Module, "
                    f"got {type(model).__name__}")


def model_normalize(model: nn.Module, chosen: str | None) -> str:
    """The intensity normalisation to use: ``chosen``, else the one the model's metadata names
    (what it was trained with), else ``"percentile"``."""
    if chosen is not None:
        return chosen
    meta = getattr(model, "metadata", None) or {}
    value = meta.get("normalize") if isinstance(meta, dict) else None
    return value if value in NORMALIZE_METHODS else "percentile"


def fit_rank(image: io.Image, model_ndim: int, what: str) -> io.Image:
    """``image`` with the model's spatial rank: a 2D model reads a 3D image whose last axis has
    size 1 as 2D (``image.data`` is replaced). Raises ValueError for any other mismatch."""
    if image.ndim == 3 and model_ndim == 2 and image.shape[-1] == 1:
        image.data = image.data[..., 0]
    if image.ndim != model_ndim:
        raise ValueError(
            f"{what} {describe(image)} is {image.ndim}D (shape {image.shape}) but the model is "
            f"{model_ndim}D"
        )
    return image


def network_features(enc: Sequence[int] | None, dec: Sequence[int] | None) -> list[list[int]]:
    """``[enc, dec]``, the UNet features of a new model, as lists of ints; a ValueError naming
    ``--enc``/``--dec`` when one is empty."""
    for option, values in (("--enc", enc), ("--dec", dec)):
        if values is None or len(values) == 0:
            raise ValueError(f"{option} must hold at least one integer")
    return [[int(v) for v in enc], [int(v) for v in dec]]


# --------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------


def grid_error(a: io.Image, b: io.Image, a_name: str, b_name: str) -> str:
    """The message saying that ``a`` and ``b`` lie on different grids, and how."""
    if a.shape != b.shape:
        what = f"shapes {a.shape} and {b.shape} differ"
    else:
        what = f"affines differ by up to {float(np.abs(a.affine - b.affine).max()):.3g} mm"
    return f"{a_name} {describe(a)} and {b_name} {describe(b)} are on different grids ({what})"


def grid_difference(shape: Sequence[int], affine: np.ndarray, ref_shape: Sequence[int],
                    ref_affine: np.ndarray) -> str | None:
    """How a grid differs from a reference grid (``"shape A vs B"`` or ``"same shape, different
    affine"``, affines compared to 1e-3 mm), or ``None`` when it is the same grid."""
    if tuple(shape) != tuple(ref_shape):
        return f"shape {tuple(shape)} vs {tuple(ref_shape)}"
    if not np.allclose(affine, ref_affine, atol=1e-3, rtol=0):
        return "same shape, different affine"
    return None


def onto_grid(image: io.Image, fixed: io.Image, name: str, fixed_name: str, resample: bool,
              interp: str) -> io.Image:
    """``image`` on ``fixed``'s grid: as it is when the grids match, resampled through the
    affines (:func:`io.resample_to`, ``interp``) with ``resample``; else a ValueError saying
    which grids differ and to pass ``--resample``."""
    if io.same_grid(image, fixed):
        return image
    if not resample:
        raise ValueError(
            grid_error(image, fixed, name, fixed_name)
            + f"; pass --resample to resample the {name} onto the {fixed_name} grid"
        )
    return io.resample_to(image, fixed, interp)


def prepare_pair(moving: ImageLike, fixed: ImageLike, resample: bool, normalize: str,
                 model_ndim: int) -> tuple[io.Image, io.Image]:
    """The pair a model reads: ``moving`` on ``fixed``'s grid (resampled, linear, only with
    ``resample``), both normalised (:func:`io.normalize`) and of the model's rank
    (:func:`fit_rank`). Returns new :class:`io.Image` objects ``(moving, fixed)``."""
    fix = as_image(fixed, "fixed")
    mov = onto_grid(as_image(moving, "moving"), fix, "moving", "fixed", resample, "linear")
    mov.data = io.normalize(mov.data, normalize)
    fix.data = io.normalize(fix.data, normalize)
    fit_rank(mov, model_ndim, "moving image")
    fit_rank(fix, model_ndim, "fixed image")
    return mov, fix


# --------------------------------------------------------------------------------------------
# lists of files
# --------------------------------------------------------------------------------------------


def read_list(listing: str | os.PathLike, what: str) -> list[str]:
    """The paths listed in a text file, one per line (blank lines and ``#`` comments skipped),
    relative ones taken from the file's folder. ``what`` names the file in the error raised when
    it does not exist (FileNotFoundError)."""
    if not Path(listing).exists():
        raise FileNotFoundError(f"{what} {str(listing)!r} does not exist")
    listing = Path(listing)
    paths = []
    for line in listing.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line).expanduser()
            paths.append(str(path if path.is_absolute() else listing.parent / path))
    return paths


def glob_files(pattern: str, option: str) -> list[str]:
    """The files ``pattern`` matches (``~`` expanded, ``**`` recursive), sorted; a
    FileNotFoundError naming ``option`` when there is none."""
    found = sorted(globlib.glob(os.path.expanduser(pattern), recursive=True))
    if not found:
        raise FileNotFoundError(f"{option} {pattern!r} matches no file")
    return found


def gather_images(images: Iterable[str | os.PathLike], list_file: str | os.PathLike | None,
                  pattern: str | None) -> list[str]:
    """Training images from paths, a list file (:func:`read_list`) and a glob pattern, in that
    order. Raises ValueError when there is none, FileNotFoundError for a missing one."""
    paths = [str(p) for p in images]
    if list_file is not None:
        paths += read_list(list_file, "list file")
    if pattern is not None:
        paths += glob_files(pattern, "--glob")
    if not paths:
        raise ValueError("no training images: give IMAGES, --list FILE or --glob PATTERN")
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"training image {path!r} does not exist")
    return paths


def _pair_rows(rows: Iterable[Mapping[str, Any]], where: str, base: Path | None) -> list[dict]:
    out = []
    for number, row in rows:
        row = {(k or "").strip(): str(v or "").strip() for k, v in row.items()}
        if not any(row.get(c) for c in PAIR_COLUMNS):
            continue
        entry = {}
        for column in PAIR_COLUMNS:
            if not row.get(column):
                raise ValueError(f"{where} line {number}: empty {column!r}")
            path = Path(row[column]).expanduser()
            entry[column] = str(path if path.is_absolute() or base is None else base / path)
            if not Path(entry[column]).exists():
                raise FileNotFoundError(
                    f"{where} line {number}: {column} {entry[column]!r} does not exist"
                )
        out.append(entry)
    if not out:
        raise ValueError(f"{where} lists no pairs")
    return out


def read_pairs(pairs: str | os.PathLike | Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The labelled pairs of an evaluation: one dict per pair with the keys of
    :data:`PAIR_COLUMNS` (``moving``, ``fixed``, ``moving_labels``, ``fixed_labels``), each an
    existing file.

    Args:
        pairs: a CSV file with (at least) those columns -- relative paths are taken from the
            CSV's folder, blank rows skipped -- or a sequence of such mappings.

    Raises:
        FileNotFoundError: the CSV, or a file it names, does not exist (the message gives the
            line).
        ValueError: a missing column, an empty cell, or no pair at all.
    """
    if not isinstance(pairs, (str, os.PathLike)):
        rows = list(pairs)
        missing = sorted({c for row in rows for c in PAIR_COLUMNS if c not in row})
        if missing:
            raise ValueError(f"pairs must have the keys {', '.join(PAIR_COLUMNS)}; missing: "
                             f"{', '.join(missing)}")
        return _pair_rows(enumerate(rows, start=1), "pairs", None)
    path = Path(pairs)
    if not path.exists():
        raise FileNotFoundError(f"pairs file {str(path)!r} does not exist")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in PAIR_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{str(path)!r} must have the columns {', '.join(PAIR_COLUMNS)}; "
                             f"missing: {', '.join(missing)}")
        return _pair_rows(enumerate(reader, start=2), repr(str(path)), path.parent)


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def format_value(value: Any) -> Any:
    """A CSV cell: floats with 6 significant digits (``nan`` for NaN), anything else as is."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
              columns: Sequence[str], fmt: Callable[[Any], Any] = format_value) -> Path:
    """Write ``rows`` (missing cells empty) under the header ``columns``, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: fmt(row.get(k, "")) for k in columns})
    return path


def mean_sd(values: Iterable[Any]) -> str:
    """``"mean ± sd"`` of the finite floats among ``values`` (sample SD; 0 for one value),
    ``"nan"`` when there is none.

    >>> mean_sd([0.5, 0.7])
    '0.6 ± 0.141'
    """
    finite = np.array([v for v in values if isinstance(v, float) and math.isfinite(v)])
    if finite.size == 0:
        return "nan"
    sd = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return f"{float(finite.mean()):.4g} ± {sd:.3g}"
