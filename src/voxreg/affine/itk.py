"""ITK/ANTs affine files: :func:`save_itk_affine` and :func:`load_itk_affine` exchange a
fixed-RAS -> moving-RAS world matrix with ITK's LPS ``AffineTransform`` files, as text
(``.txt``/``.tfm``) or as the MATLAB v4 binary ``.mat`` that ANTs writes (``0GenericAffine.mat``).

ITK works in LPS millimetres (RAS with ``x`` and ``y`` negated) and its transform also maps a
fixed-space point to the moving point (pull-back). Both layouts hold ``AffineTransform_double_3_3``
(or ``_float_``, or ``MatrixOffsetTransformBase_``; 2D ``_2_2``): the parameters are the matrix
``M`` row by row then the translation ``t``, the fixed parameters the centre ``C`` (LPS), and the
map is ``p -> M (p - C) + C + t``. In a ``.mat`` the parameters are the variable named after the
transform type, ``(ndim * (ndim + 1), 1)``, and the centre the variable ``fixed``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io

from voxreg._atomic import atomic_path
from voxreg.affine.matrices import lps_flip, square_matrix
from voxreg.io import check_input_file

__all__ = ["itk_from_world", "load_itk_affine", "save_itk_affine", "world_from_itk"]

_ITK_HEADER = "#Insight Transform File V1.0"
_ITK_TYPE = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_([23])_([23])$")
_SUPPORTED = "AffineTransform_double_3_3 (or _2_2, float, MatrixOffsetTransformBase)"


def _name(path: Path) -> str:
    return repr(str(path))


def world_from_itk(params: np.ndarray, fixed: np.ndarray, ndim: int, source: str = "the transform"
                   ) -> np.ndarray:
    """ITK affine parameters -> the ``(ndim+1, ndim+1)`` fixed-RAS -> moving-RAS world matrix.

    Args:
        params: ``ndim * (ndim + 1)`` numbers, ``M`` by rows then ``t`` (LPS).
        fixed: the centre ``C`` (LPS), ``ndim`` numbers, or none (the origin).
        source: how messages name where the numbers come from (a file).

    Raises:
        ValueError: the wrong number of parameters, or non-finite ones.

    >>> # 2D: scale 2 about the LPS centre (10, 0), then shift (1, 1): LPS offset (-9, 1)
    >>> world_from_itk(np.array([2.0, 0, 0, 2, 1, 1]), np.array([10.0, 0]), 2)  # RAS (9, -1)
    array([[ 2.,  0.,  9.],
           [ 0.,  2., -1.],
           [ 0.,  0.,  1.]])
    """
    params = np.asarray(params, dtype=np.float64).reshape(-1)
    fixed = np.asarray(fixed, dtype=np.float64).reshape(-1)
    if params.size != ndim * (ndim + 1):
        raise ValueError(f"{source}: a {ndim}D affine needs {ndim * (ndim + 1)} Parameters, "
                         f"found {params.size}")
    if fixed.size not in (0, ndim):
        raise ValueError(f"{source}: a {ndim}D affine needs {ndim} FixedParameters, "
                         f"found {fixed.size}")
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(fixed))):
        raise ValueError(f"{source} has non-finite transform parameters")
    center = fixed if fixed.size else np.zeros(ndim)
    linear = params[: ndim * ndim].reshape(ndim, ndim)
    lps = np.eye(ndim + 1)
    lps[:ndim, :ndim] = linear
    lps[:ndim, ndim] = params[ndim * ndim:] + center - linear @ center
    flip = lps_flip(ndim)
    return flip @ lps @ flip


def itk_from_world(world_matrix: np.ndarray, center: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-RAS -> moving-RAS world matrix as ITK's ``(parameters, fixed parameters)`` (LPS).

    ``center``: ITK's centre ``C`` in **RAS** mm (default the origin; any centre gives the same
    map, only the stored translation differs). The inverse of :func:`world_from_itk`.

    >>> params, fixed = itk_from_world(np.array([[1.0, 0, 3], [0, 1, 4], [0, 0, 1]]))
    >>> params, fixed                              # a RAS shift (3, 4) is (-3, -4) in LPS
    (array([ 1.,  0.,  0.,  1., -3., -4.]), array([0., 0.]))
    """
    matrix = square_matrix(world_matrix, "world_matrix")
    ndim = matrix.shape[0] - 1
    flip = lps_flip(ndim)
    lps = flip @ matrix @ flip
    linear = lps[:ndim, :ndim]
    if center is None:
        center_lps = np.zeros(ndim)
    else:
        center_ras = np.asarray(center, dtype=np.float64).reshape(-1)
        if center_ras.shape != (ndim,) or not np.all(np.isfinite(center_ras)):
            raise ValueError(f"center must be {ndim} finite numbers, got {center!r}")
        center_lps = flip[:ndim, :ndim] @ center_ras
    translation = lps[:ndim, ndim] - center_lps + linear @ center_lps
    return np.concatenate([linear.reshape(-1), translation]) + 0.0, center_lps + 0.0


def save_itk_affine(path: str | Path, world_matrix: np.ndarray,
                    center: Sequence[float] | None = None) -> Path:
    """Write a fixed-RAS -> moving-RAS affine as an ITK transform that ANTs reads, atomically.

    ``antsApplyTransforms -r fixed -i moving -t FILE`` (or ``ants.apply_transforms(fixed,
    moving, [FILE])``) then resamples the moving image as
    :meth:`voxreg.affine.AffineResult.resample` does.

    Args:
        path: ``.mat``: MATLAB v4 binary, ``AffineTransform_double_3_3`` + ``fixed``, as ANTs
            writes; any other extension (``.txt``/``.tfm`` by custom): ITK text,
            ``Transform: AffineTransform_double_3_3`` (``_2_2`` in 2D), ``Parameters`` and
            ``FixedParameters`` (module doc).
        world_matrix: ``(ndim+1, ndim+1)`` or ``(ndim, ndim+1)``, RAS mm, ndim 2 or 3.
        center: the centre ``C`` in **RAS** mm (default the origin; any centre gives the same
            transform, only the stored translation differs).
    """
    params, center_lps = itk_from_world(world_matrix, center)
    ndim = center_lps.size
    kind = f"AffineTransform_double_{ndim}_{ndim}"
    path = Path(path)
    if path.name.lower().endswith(".mat"):
        with atomic_path(path, suffix=".mat") as tmp, open(tmp, "wb") as handle:
            scipy.io.savemat(handle, {kind: params[:, None], "fixed": center_lps[:, None]},
                             format="4")
        return path
    text = "\n".join([
        _ITK_HEADER,
        "#Transform 0",
        f"Transform: {kind}",
        "Parameters: " + " ".join(f"{v:.17g}" for v in params),
        "FixedParameters: " + " ".join(f"{v:.17g}" for v in center_lps),
        "",
    ])
    with atomic_path(path, suffix=path.suffix or ".txt") as tmp:
        tmp.write_text(text)
    return path


def _read_mat(path: Path) -> np.ndarray:
    try:
        content = scipy.io.loadmat(str(path))
    except Exception as err:  # noqa: BLE001 - scipy raises many kinds for non-MATLAB files
        raise ValueError(f"{_name(path)} is not an ITK/ANTs .mat transform (MATLAB v4 binary; "
                         f"FSL's text .mat files are not supported): {err}") from None
    keys = [k for k in content if not k.startswith("__")]
    found = [(k, m) for k in keys if (m := _ITK_TYPE.match(k)) and m[3] == m[4]]
    if len(found) != 1:
        raise ValueError(f"{_name(path)} holds {', '.join(keys) or 'nothing'}: not an affine "
                         f"transform ({_SUPPORTED})")
    (key, match), = found
    fixed = content.get("fixed", np.zeros(0))
    return world_from_itk(content[key], fixed, int(match[3]), _name(path))


def _read_text(path: Path) -> np.ndarray:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{_name(path)} is not an ITK text transform (a binary file; an ANTs "
                         "transform in binary form must be named .mat)") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise ValueError(f"{_name(path)} is not an ITK text transform: it must start with "
                         f"{_ITK_HEADER!r}")
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields.setdefault(key.strip(), []).append(value.strip())
    kinds = fields.get("Transform", [])
    if len(kinds) != 1:
        raise ValueError(f"{_name(path)} must hold exactly one transform, found {len(kinds)}")
    match = _ITK_TYPE.match(kinds[0])
    if match is None or match[3] != match[4]:
        raise ValueError(f"{_name(path)} holds a {kinds[0]!r}; only {_SUPPORTED} is supported")
    try:
        params = np.array([float(v) for v in fields.get("Parameters", [""])[0].split()])
        fixed = np.array([float(v) for v in fields.get("FixedParameters", [""])[0].split()])
    except ValueError:
        raise ValueError(f"{_name(path)} has non-numeric transform parameters") from None
    return world_from_itk(params, fixed, int(match[3]), _name(path))


def load_itk_affine(path: str | Path) -> np.ndarray:
    """Read an ITK affine (``AffineTransform_*`` or ``MatrixOffsetTransformBase_*``, double or
    float, 2D or 3D) as the ``(ndim+1, ndim+1)`` fixed-RAS -> moving-RAS world matrix: a ``.mat``
    as MATLAB v4 binary (ANTs' ``0GenericAffine.mat``), any other file as ITK text.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ITK transform file (FSL's text ``.mat`` files are refused), not one
            affine transform (e.g. an ``Euler3DTransform``), or the wrong number of parameters
            (the message names the file and says which).
    """
    path = check_input_file(Path(path), "transform file")
    return _read_mat(path) if path.name.lower().endswith(".mat") else _read_text(path)
