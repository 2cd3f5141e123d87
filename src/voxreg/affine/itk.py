"""ITK/ANTs text transforms: :func:`save_itk_affine` and :func:`load_itk_affine` exchange a
fixed-RAS -> moving-RAS world matrix with ITK's LPS ``AffineTransform`` text files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from voxreg._atomic import atomic_path
from voxreg.affine.matrices import lps_flip, square_matrix

_ITK_HEADER = "#Insight Transform File V1.0"
_ITK_TYPE = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_([23])_([23])$")


def save_itk_affine(path: str | Path, world_matrix: np.ndarray,
                    center: Sequence[float] | None = None) -> Path:
    """Write a fixed-RAS -> moving-RAS affine as an ITK text transform (ANTs reads it).

    ITK works in LPS millimetres and its transform also maps a fixed-space point to the moving
    point (pull-back), so ``antsApplyTransforms -r fixed -i moving -t FILE`` (or
    ``ants.apply_transforms(fixed, moving, [FILE])``) resamples the moving image as
    :meth:`voxreg.affine.AffineResult.resample` does. The file holds
    ``AffineTransform_double_3_3`` (``_2_2`` in 2D): ``Parameters`` = the matrix row by row then
    the translation, ``FixedParameters`` = the centre ``C`` (LPS), with
    ``T(p) = M (p - C) + C + translation``.

    Args:
        path: destination (written atomically); any extension, ``.txt`` or ``.tfm`` by custom.
        world_matrix: ``(ndim+1, ndim+1)`` or ``(ndim, ndim+1)``, RAS mm, ndim 2 or 3.
        center: the centre ``C`` in **RAS** mm (default the origin; any centre gives the same
            transform, only the stored translation differs).
    """
    matrix = square_matrix(world_matrix, "world_matrix")
    ndim = matrix.shape[0] - 1
    flip = lps_flip(ndim)
    lps = flip @ matrix @ flip
    linear, offset = lps[:ndim, :ndim], lps[:ndim, ndim]
    if center is None:
        center_lps = np.zeros(ndim)
    else:
        center_ras = np.asarray(center, dtype=np.float64).reshape(-1)
        if center_ras.shape != (ndim,) or not np.all(np.isfinite(center_ras)):
            raise ValueError(f"center must be {ndim} finite numbers, got {center!r}")
        center_lps = (flip[:ndim, :ndim] @ center_ras)
    translation = offset - center_lps + linear @ center_lps
    values = list(linear.reshape(-1)) + list(translation)
    text = "\n".join([
        _ITK_HEADER,
        "#Transform 0",
        f"Transform: AffineTransform_double_{ndim}_{ndim}",
        "Parameters: " + " ".join(f"{v:.17g}" for v in values),
        "FixedParameters: " + " ".join(f"{v:.17g}" for v in center_lps),
        "",
    ])
    path = Path(path)
    with atomic_path(path, suffix=path.suffix or ".txt") as tmp:
        tmp.write_text(text)
    return path


def load_itk_affine(path: str | Path) -> np.ndarray:
    """Read an ITK text affine (``AffineTransform_*`` or ``MatrixOffsetTransformBase_*``, double
    or float, 2D or 3D) as the ``(ndim+1, ndim+1)`` fixed-RAS -> moving-RAS world matrix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ITK text transform file, not one affine transform, or the wrong
            number of parameters (the message says which).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such transform file: {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder, not a transform file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not an ITK text transform (binary file; ANTs .mat "
                         "files are not supported, convert them to .txt)") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise ValueError(f"{str(path)!r} is not an ITK text transform: it must start with "
                         f"{_ITK_HEADER!r}")
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields.setdefault(key.strip(), []).append(value.strip())
    kinds = fields.get("Transform", [])
    if len(kinds) != 1:
        raise ValueError(f"{str(path)!r} must hold exactly one transform, found {len(kinds)}")
    match = _ITK_TYPE.match(kinds[0])
    if match is None or match.group(3) != match.group(4):
        raise ValueError(f"{str(path)!r} holds a {kinds[0]!r}; only AffineTransform_double_3_3 "
                         "(or _2_2, float, MatrixOffsetTransformBase) is supported")
    ndim = int(match.group(3))
    try:
        params = np.array([float(v) for v in fields.get("Parameters", [""])[0].split()])
        fixed = np.array([float(v) for v in fields.get("FixedParameters", [""])[0].split()])
    except ValueError:
        raise ValueError(f"{str(path)!r} has non-numeric transform parameters") from None
    if params.size != ndim * ndim + ndim:
        raise ValueError(f"{str(path)!r}: a {ndim}D affine needs {ndim * ndim + ndim} Parameters, "
                         f"found {params.size}")
    if fixed.size == 0:
        fixed = np.zeros(ndim)
    if fixed.size != ndim:
        raise ValueError(f"{str(path)!r}: a {ndim}D affine needs {ndim} FixedParameters, "
                         f"found {fixed.size}")
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(fixed))):
        raise ValueError(f"{str(path)!r} has non-finite transform parameters")
    linear = params[: ndim * ndim].reshape(ndim, ndim)
    translation = params[ndim * ndim:]
    lps = np.eye(ndim + 1)
    lps[:ndim, :ndim] = linear
    lps[:ndim, ndim] = translation + fixed - linear @ fixed
    flip = lps_flip(ndim)
    return flip @ lps @ flip
