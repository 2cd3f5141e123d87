"""World-space transform files: displacement fields with a stated convention, ITK/ANTs affines,
and chains of them in ANTs order, resampled with one interpolation.

Every transform here pulls back (``docs/conventions.md`` rules 4, 5, 12): it maps a point of the
fixed (reference, output) space to the moving point whose value the output shows. World
coordinates are NIfTI RAS mm; ITK and ANTs use LPS (``x`` and ``y`` negated).

Displacement fields. ``d``: voxreg's field ``(ndim, *spatial)`` in voxels of the fixed grid
(``ij``); ``W``: the linear part of the fixed affine (voxel -> RAS mm); ``F = diag(-1, -1, 1)``.
Each file stores the fixed grid's affine and a fixed-point -> moving-point displacement:

==========  =========  ======================================================================
convention  values     file layout (:func:`save_displacement`) and readers
==========  =========  ======================================================================
``lps-mm``  ``F W d``  ANTs/ITK: 5D NIfTI ``(X, Y, Z, 1, 3)`` (2D ``(X, Y, 1, 1, 2)``), float32,
                       intent ``vector``. ``antsApplyTransforms -d 3 -i moving.nii.gz -r
                       fixed.nii.gz -t warp.nii.gz -o moved.nii.gz``; SimpleITK:
                       ``sitk.DisplacementFieldTransform(sitk.ReadImage("warp.nii.gz",
                       sitk.sitkVectorFloat64))``; FreeSurfer: ``mri_warp_convert --inlps``.
``ras-mm``  ``W d``    FreeSurfer/mri_synthmorph/NiftyReg: 4D NIfTI ``(X, Y, Z, 3)`` (2D ``(X, Y,
                       1, 2)``) or MGZ/MGH with 3 frames. ``mri_synthmorph apply warp.mgz
                       moving.mgz moved.mgz``; ``mri_warp_convert --inras warp.mgz ...``. Never
                       give one to ANTs: ITK reads a 4D file as a scalar image and
                       ``antsApplyTransforms`` applies it without error, wrongly.
``voxel``   ``d``      voxreg's own: ``.npz`` only (``disp`` float32, ``affine``, ``convention``).
                       ANTs takes any vector NIfTI for LPS mm (and a 4D one wrongly), FreeSurfer
                       a 3-frame NIfTI/MGZ for RAS mm; none opens ``.npz``, so no tool can
                       misapply a voxel field silently.
==========  =========  ======================================================================

NIfTI files record the convention in ``intent_name`` and ``descrip`` (``voxreg:lps-mm``,
``voxreg:ras-mm``); :func:`voxreg.io.save_warp`'s tags (``ants:lps-mm``, ``voxreg:mm``,
``voxreg:vox``) are understood. MGH has no free-text field that both nibabel and FreeSurfer
keep, so an MGZ is untagged (voxreg writes MGZ as ``ras-mm`` only). Reading an untagged file: a
5D NIfTI is ITK's displacement layout, which ITK defines as LPS mm, so it is ``lps-mm``; any
other needs ``convention=`` (CLI: ``--warp-convention lps-mm|ras-mm|voxel``), never a guess.

Affines. :func:`load_affine` / :func:`save_affine` exchange the world matrix ``(ndim+1,
ndim+1)``, fixed RAS mm -> moving RAS mm (:attr:`voxreg.affine.AffineResult.world_matrix`), with
ITK's ``.mat`` (MATLAB v4 binary as ANTs writes ``0GenericAffine.mat``: ``(12, 1)``
``AffineTransform_double_3_3`` or ``_float_3_3`` = matrix by rows then translation ``t``, and
``fixed`` = centre ``C``; 2D ``_2_2``) and ``.txt``/``.tfm`` (:mod:`voxreg.affine.itk`). ITK's
map is ``p -> M (p - C) + C + t`` in LPS. ``sitk.ReadTransform`` and ``ants.read_transform``
read what voxreg writes; FSL's text ``.mat`` files are refused.

Chains are lists in ANTs command-line order: ``[A, B]`` = ``antsApplyTransforms -t A -t B`` =
``ants.apply_transforms(fixed, moving, [A, B])`` maps a reference point ``y`` to the moving
point ``B(A(y))`` (the first entry acts first on points, the last first on images), so a
registration's ``[warp.nii.gz, affine.mat]`` is ``y -> affine(warp(y))``; in SimpleITK,
``sitk.CompositeTransform([B, A])``. Entries: a path (``.mat/.txt/.tfm`` affine, else a field),
``"[path,1]"`` or ``(path, True)`` for the inverse, an :class:`AffineMap`, a :class:`FieldMap` or
a world matrix. Fields are interpolated linearly (border value within half a voxel of the grid)
and, as in ITK, move no point off their grid; a field's inverse is solved on its grid
(:func:`voxreg.transforms.invert`; ANTs cannot invert fields). :func:`apply_transforms` maps the
points through the whole chain, then samples the image once (:func:`voxreg.transforms.warp`;
``fill_value`` outside it); :func:`compose_to_displacement` gives the chain as one voxreg field,
which :func:`save_displacement` writes as one ANTs warp.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import scipy.io
import torch

from voxreg import _checks
from voxreg._atomic import atomic_path
from voxreg.affine.itk import load_itk_affine, save_itk_affine
from voxreg.affine.matrices import grid_affine, lps_flip, square_matrix
from voxreg.io import Image, load_image, read_grid
from voxreg.transforms import invert, warp, warp_points

__all__ = [
    "CONVENTIONS",
    "AffineMap",
    "FieldMap",
    "TransformChain",
    "apply_transforms",
    "chain_points",
    "compose_to_displacement",
    "load_affine",
    "load_displacement",
    "load_transform",
    "parse_entry",
    "save_affine",
    "save_displacement",
]

Convention = Literal["lps-mm", "ras-mm", "voxel"]
CONVENTIONS = ("lps-mm", "ras-mm", "voxel")
_TAGS = {f"voxreg:{c}": c for c in CONVENTIONS}
_TAGS.update({"ants:lps-mm": "lps-mm", "voxreg:mm": "ras-mm", "voxreg:vox": "voxel"})  # io
_NIFTI = (".nii.gz", ".nii")
_MGH = (".mgz", ".mgh")
_FIELD_EXTS = _NIFTI + _MGH + (".npz", ".npy")
_LAYOUTS = {"lps-mm": (_NIFTI, "ANTs/ITK read LPS fields from 5D NIfTI only"),
            "ras-mm": (_NIFTI + _MGH, "FreeSurfer reads RAS fields from NIfTI or MGZ"),
            "voxel": ((".npz",), "ANTs or FreeSurfer would read a NIfTI/MGZ field as millimetres")}
_AFFINE_EXTS = (".mat", ".txt", ".tfm")
_MAT_KEY = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_([23])_([23])$")
_ENTRY = re.compile(r"^\[\s*([^\]]+?)\s*(?:,\s*([01]))?\s*\]$")
_CHUNK = 1 << 20  # points mapped per pass


def _name(path: Path) -> str:
    return repr(str(path))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no such transform file: {_name(path)}")
    if path.is_dir():
        raise IsADirectoryError(f"{_name(path)} is a folder, not a transform file")


def _check_convention(convention: str | None) -> None:
    if convention is not None and convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")


def _check_affine4(affine: object, name: str = "affine") -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{name} must be a finite (4, 4) voxel-to-world matrix, got shape {affine.shape}")
    return affine


def _as_disp(disp: object) -> np.ndarray:
    if isinstance(disp, torch.Tensor):
        disp = disp.detach().cpu().numpy()
    disp = np.asarray(disp)
    if disp.ndim >= 4 and disp.shape[0] == 1 and disp.shape[1] == disp.ndim - 2:
        disp = disp[0]
    if disp.ndim not in (3, 4) or disp.shape[0] != disp.ndim - 1:
        raise ValueError(f"disp must be (ndim, *spatial) or (1, ndim, *spatial) with ndim 2 or 3, "
                         f"got shape {disp.shape}")
    if not np.issubdtype(disp.dtype, np.floating) or not np.all(np.isfinite(disp)):
        raise ValueError("disp must hold finite floating-point values")
    return disp.astype(np.float64)


def _apply_linear(matrix: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.einsum("ij,j...->i...", matrix, values)


# -- displacement fields -------------------------------------------------------------------


def save_displacement(path: str | os.PathLike, disp: object, fixed_affine: np.ndarray,
                      convention: Convention = "lps-mm") -> Path:
    """Write ``disp`` (``(ndim, *spatial)`` or ``(1, ndim, *spatial)``, array or tensor, voxels
    of the fixed grid as voxreg computes it) in ``convention``, atomically, with the fixed grid's
    ``(4, 4)`` affine. ``path``: ``.nii.gz``/``.nii`` for ``"lps-mm"`` (ANTs/ITK) and
    ``"ras-mm"`` (FreeSurfer), also ``.mgz``/``.mgh`` for ``"ras-mm"``, ``.npz`` for ``"voxel"``
    (module doc); another layout raises ValueError saying which to use."""
    path = Path(path)
    _check_convention(convention)
    disp = _as_disp(disp)
    affine = _check_affine4(fixed_affine, "fixed_affine")
    ndim = disp.shape[0]
    name = path.name.lower()
    allowed, why = _LAYOUTS[convention]
    if not name.endswith(allowed):
        raise ValueError(f"cannot write a {convention!r} field to {_name(path)}: use "
                         f"{' or '.join(allowed)} ({why})")
    if convention == "voxel":
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, disp=disp.astype(np.float32), affine=affine,
                                convention=np.array("voxel"))
        return path
    values = _apply_linear(grid_affine(affine, ndim)[:ndim, :ndim], disp)
    if convention == "lps-mm":
        values[:2] *= -1.0
    vector = np.moveaxis(values.astype(np.float32), 0, -1)
    spatial = vector.shape[:-1] + (1,) * (3 - ndim)
    vector = vector.reshape(*spatial, *((1,) if convention == "lps-mm" else ()), ndim)
    if name.endswith(_MGH):
        image = nib.MGHImage(np.ascontiguousarray(vector), affine)
    else:
        image = nib.Nifti1Image(np.ascontiguousarray(vector), affine, dtype=np.float32)
        header = image.header
        tag = f"voxreg:{convention}"
        header.set_intent("vector" if convention == "lps-mm" else "none", (), name=tag)
        header["descrip"] = f"{tag} displacement, fixed point to moving point".encode()
        header.set_xyzt_units("mm")
        image.set_sform(affine, code=1)
        image.set_qform(affine, code=1)
    with atomic_path(path) as tmp:
        image.to_filename(str(tmp))
    return path


def _header_tag(header: object) -> str | None:
    if not isinstance(header, nib.Nifti1Header):
        return None
    for key in ("intent_name", "descrip"):
        text = np.asarray(header[key]).item().split(b"\0")[0].decode("ascii", "replace").strip()
        word = text.split(" ")[0] if text else ""
        if word in _TAGS:
            return _TAGS[word]
    return None


def _read_field(path: Path) -> tuple[np.ndarray, np.ndarray, str | None, bool]:
    """``(values (ndim, *spatial), affine, tag, itk_layout)`` as stored, without conversion."""
    name = path.name.lower()
    if not name.endswith(_FIELD_EXTS):
        raise ValueError(f"unsupported displacement file {_name(path)}: use one of "
                         f"{', '.join(_FIELD_EXTS)}")
    _check_file(path)
    try:
        if name.endswith(".npy"):
            return _as_disp(np.load(path, allow_pickle=False)), np.eye(4), None, False
        if name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.keys()}
            data = arrays.get("disp", next(iter(arrays.values())) if len(arrays) == 1 else None)
            if data is None:
                raise ValueError(f"no array 'disp' among {', '.join(arrays)}")
            tag = str(arrays["convention"]) if "convention" in arrays else None
            _check_convention(tag)
            return _as_disp(data), _check_affine4(arrays.get("affine", np.eye(4))), tag, False
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float64)
        affine, header = np.asarray(image.affine, dtype=np.float64), image.header
    except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as err:
        raise ValueError(f"cannot read {_name(path)} as a displacement field: {err}") from None
    shape = data.shape
    itk = len(shape) == 5 and shape[3] == 1
    if itk:
        data = data[:, :, :, 0]
    ndim = data.shape[-1] if data.ndim == 4 else 0
    if ndim not in (2, 3) or (ndim == 2 and data.shape[2] != 1):
        raise ValueError(f"{_name(path)} is not a displacement field: expected (X, Y, Z, 3), "
                         f"(X, Y, Z, 1, 3) or a 2D (X, Y, 1, [1,] 2), got shape {shape}")
    values = np.moveaxis(data[:, :, 0] if ndim == 2 else data, -1, 0)
    return _as_disp(values), affine, _header_tag(header), itk


def load_displacement(path: str | os.PathLike,
                      convention: Convention | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a field file as ``(disp, affine)``: ``disp`` ``(ndim, *spatial)`` float32 in voxels
    of the file's grid (voxreg's convention), ``affine`` that grid's ``(4, 4)``.

    The file's tag gives the convention; ``convention`` is needed for untagged files other than
    ITK's 5D layout (``lps-mm``), e.g. an MGZ or mri_synthmorph NIfTI (``"ras-mm"``). Raises
    ValueError (naming the file) when it is missing there, or contradicts the tag."""
    path = Path(path)
    _check_convention(convention)
    values, affine, tag, itk = _read_field(path)
    if tag is not None:
        if convention is not None and convention != tag:
            raise ValueError(f"{_name(path)} is tagged as a {tag!r} field but convention="
                             f"{convention!r} was given; drop convention= or fix the file")
        convention = tag
    elif convention is None:
        if not itk:
            raise ValueError(
                f"{_name(path)} does not record its convention: give convention='lps-mm' "
                "(ANTs/ITK), 'ras-mm' (FreeSurfer, mri_synthmorph, NiftyReg) or 'voxel' "
                "(on the command line: --warp-convention lps-mm|ras-mm|voxel)")
        convention = "lps-mm"
    ndim = values.shape[0]
    if convention != "voxel":
        if convention == "lps-mm":
            values[:2] *= -1.0
        values = _apply_linear(np.linalg.inv(grid_affine(affine, ndim)[:ndim, :ndim]), values)
    return values.astype(np.float32), affine


# -- affines -------------------------------------------------------------------------------


def _world_from_itk(params: np.ndarray, fixed: np.ndarray, ndim: int, path: Path) -> np.ndarray:
    if params.size != ndim * (ndim + 1) or fixed.size not in (0, ndim):
        raise ValueError(f"{_name(path)}: a {ndim}D affine needs {ndim * (ndim + 1)} parameters "
                         f"and {ndim} fixed parameters, found {params.size} and {fixed.size}")
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(fixed))):
        raise ValueError(f"{_name(path)} has non-finite transform parameters")
    center = fixed if fixed.size else np.zeros(ndim)
    linear = params[: ndim * ndim].reshape(ndim, ndim)
    lps = np.eye(ndim + 1)
    lps[:ndim, :ndim] = linear
    lps[:ndim, ndim] = params[ndim * ndim:] + center - linear @ center
    flip = lps_flip(ndim)
    return flip @ lps @ flip


def _itk_from_world(world: np.ndarray, center: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    ndim = world.shape[0] - 1
    flip = lps_flip(ndim)
    lps = flip @ world @ flip
    linear = lps[:ndim, :ndim]
    c = np.zeros(ndim) if center is None else flip[:ndim, :ndim] @ np.asarray(center, float).reshape(ndim)
    translation = lps[:ndim, ndim] - c + linear @ c
    return np.concatenate([linear.reshape(-1), translation]), c


def load_affine(path: str | os.PathLike) -> np.ndarray:
    """Read an ITK/ANTs affine (``.mat``, ``.txt``, ``.tfm``) as the ``(ndim+1, ndim+1)`` world
    matrix, fixed RAS mm -> moving RAS mm. Raises ValueError naming the file when it is not one
    ``AffineTransform``/``MatrixOffsetTransformBase`` (e.g. an ``Euler3DTransform``)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".txt", ".tfm")):
        return load_itk_affine(path)
    if not name.endswith(".mat"):
        raise ValueError(f"unsupported affine file {_name(path)}: use .mat, .txt or .tfm")
    _check_file(path)
    try:
        content = scipy.io.loadmat(str(path))
    except Exception as err:  # noqa: BLE001 - scipy raises many kinds for non-MATLAB files
        raise ValueError(f"{_name(path)} is not an ITK/ANTs .mat transform (MATLAB v4 binary; "
                         f"FSL's text .mat files are not supported): {err}") from None
    keys = [k for k in content if not k.startswith("__")]
    found = [(k, m) for k in keys if (m := _MAT_KEY.match(k)) and m[3] == m[4]]
    if len(found) != 1:
        raise ValueError(f"{_name(path)} holds {', '.join(keys) or 'nothing'}: not an affine "
                         "transform (AffineTransform_double_3_3, _float_3_3, _2_2 or "
                         "MatrixOffsetTransformBase_*)")
    (key, match), = found
    params = np.asarray(content[key], dtype=np.float64).reshape(-1)
    fixed = np.asarray(content.get("fixed", np.zeros(0)), dtype=np.float64).reshape(-1)
    return _world_from_itk(params, fixed, int(match[3]), path)


def save_affine(path: str | os.PathLike, world_matrix: np.ndarray,
                center: Sequence[float] | None = None) -> Path:
    """Write a fixed-RAS -> moving-RAS world matrix as an ITK affine, atomically: ``.mat``
    (MATLAB v4, ``AffineTransform_double_3_3`` + ``fixed``, as ANTs writes) or ``.txt``/``.tfm``
    (:func:`voxreg.affine.save_itk_affine`). ``center``: ITK's centre in RAS mm (default the
    origin; any centre gives the same map)."""
    path = Path(path)
    matrix = square_matrix(world_matrix, "world_matrix")
    name = path.name.lower()
    if name.endswith((".txt", ".tfm")):
        return save_itk_affine(path, matrix, center)
    if not name.endswith(".mat"):
        raise ValueError(f"unsupported affine file {_name(path)}: use .mat, .txt or .tfm")
    ndim = matrix.shape[0] - 1
    if center is not None and (np.asarray(center).size != ndim or not np.all(np.isfinite(center))):
        raise ValueError(f"center must be {ndim} finite numbers, got {center!r}")
    params, fixed = _itk_from_world(matrix, center)
    with atomic_path(path, suffix=".mat") as tmp, open(tmp, "wb") as handle:
        scipy.io.savemat(handle, {f"AffineTransform_double_{ndim}_{ndim}": params[:, None],
                                  "fixed": fixed[:, None]}, format="4")
    return path


# -- transforms and chains -----------------------------------------------------------------


@dataclass(eq=False)
class AffineMap:
    """An affine world transform: ``matrix`` ``(ndim+1, ndim+1)``, fixed RAS -> moving RAS."""

    matrix: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        self.matrix = square_matrix(self.matrix, "matrix")

    @property
    def ndim(self) -> int:
        return self.matrix.shape[0] - 1

    def inverse(self) -> AffineMap:
        return AffineMap(np.linalg.inv(self.matrix), f"[{self.source},1]")

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """``(P, ndim)`` float64 RAS points -> their images."""
        m = torch.from_numpy(self.matrix)
        return points @ m[:-1, :-1].T + m[:-1, -1]


@dataclass(eq=False)
class FieldMap:
    """A displacement-field world transform: ``disp`` ``(ndim, *spatial)`` in voxels of the grid
    ``affine`` (4x4), i.e. ``p -> p + W d(W^-1 p)`` in RAS mm."""

    disp: np.ndarray
    affine: np.ndarray
    source: str = ""
    _field: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.disp = _as_disp(self.disp).astype(np.float32)
        self.affine = _check_affine4(self.affine)
        self._field = torch.from_numpy(self.disp.astype(np.float64))[None]

    @property
    def ndim(self) -> int:
        return self.disp.shape[0]

    def inverse(self, iterations: int = 100, tolerance: float = 1e-4) -> FieldMap:
        """The inverse map, solved on the same grid by fixed-point iteration (valid where the
        field is invertible and the inverse stays on the grid)."""
        inverse = invert(self._field, iterations=iterations, tolerance=tolerance)
        return FieldMap(inverse[0].numpy(), self.affine, f"[{self.source},1]")

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """``(P, ndim)`` float64 RAS points -> their images (unmoved off the grid, as ITK)."""
        n = self.ndim
        grid = torch.from_numpy(grid_affine(self.affine, n))
        back = torch.linalg.inv(grid)
        voxels = points @ back[:n, :n].T + back[:n, n]
        step = warp_points(voxels[None], self._field)[0] - voxels
        upper = torch.tensor(self.disp.shape[1:], dtype=points.dtype) - 0.5
        inside = ((voxels >= -0.5) & (voxels <= upper)).all(-1, keepdim=True)
        return points + torch.where(inside, step, 0.0) @ grid[:n, :n].T


Transform = AffineMap | FieldMap
Entry = str | os.PathLike | tuple | np.ndarray | AffineMap | FieldMap


def parse_entry(entry: str | os.PathLike | tuple) -> tuple[Path, bool]:
    """``"a.mat"`` -> ``(a.mat, False)``; ``"[a.mat,1]"`` or ``("a.mat", True)`` -> ``(a.mat,
    True)`` (ANTs' notation for the inverse)."""
    if isinstance(entry, tuple):
        if len(entry) != 2 or not isinstance(entry[1], (bool, int)):
            raise ValueError(f"a transform entry tuple must be (path, invert), got {entry!r}")
        return Path(entry[0]), bool(entry[1])
    text = str(entry).strip()
    match = _ENTRY.match(text)
    if match:
        return Path(match[1]), match[2] == "1"
    if text.startswith("["):
        raise ValueError(f"cannot parse transform entry {text!r}: use [path,0] or [path,1]")
    return Path(text), False


def load_transform(entry: Entry, convention: Convention | None = None) -> Transform:
    """One chain entry as an :class:`AffineMap` or :class:`FieldMap` (inverted if asked);
    ``convention`` is passed to :func:`load_displacement` for field files."""
    if isinstance(entry, (AffineMap, FieldMap)):
        return entry
    if isinstance(entry, np.ndarray):
        return AffineMap(entry, "matrix")
    path, inverse = parse_entry(entry)
    name = path.name.lower()
    if name.endswith(_AFFINE_EXTS):
        transform: Transform = AffineMap(load_affine(path), str(path))
    elif name.endswith(_FIELD_EXTS):
        transform = FieldMap(*load_displacement(path, convention), str(path))
    else:
        raise ValueError(f"unsupported transform file {_name(path)}: affines are "
                         f"{', '.join(_AFFINE_EXTS)}, fields {', '.join(_FIELD_EXTS)}")
    return transform.inverse() if inverse else transform


def _reference_grid(reference: object) -> tuple[tuple[int, ...], np.ndarray]:
    if isinstance(reference, Image):
        return reference.shape, _check_affine4(reference.affine, "reference affine")
    if isinstance(reference, tuple) and len(reference) == 2 and not isinstance(reference[0], str):
        return _checks.check_shape(reference[0], "reference shape"), _check_affine4(reference[1])
    if isinstance(reference, (str, os.PathLike)):
        shape, affine = read_grid(reference)
        return tuple(shape), affine
    raise TypeError("reference must be an Image, an image path or (shape, affine), got "
                    f"{type(reference).__name__}")


class TransformChain:
    """Transforms in ANTs order: a reference point ``y`` goes to ``T_n(...T_2(T_1(y)))``.

    Args:
        entries: paths, ``"[path,1]"`` / ``(path, True)`` for inverses, :class:`AffineMap`,
            :class:`FieldMap` or world matrices (module doc).
        convention: for untagged field files (:func:`load_displacement`).
    """

    def __init__(self, entries: Sequence[Entry], convention: Convention | None = None):
        if isinstance(entries, (str, os.PathLike)) or not len(entries):
            raise ValueError("a transform chain needs a non-empty list of transforms")
        self.transforms = [load_transform(e, convention) for e in entries]
        dims = {t.ndim for t in self.transforms}
        if len(dims) != 1:
            raise ValueError(f"the transforms mix 2D and 3D: {[t.source for t in self.transforms]}")
        self.ndim = dims.pop()

    def map_points(self, points: object) -> np.ndarray:
        """``(P, ndim)`` RAS mm points of the reference space -> moving-space RAS mm points."""
        pts = torch.as_tensor(np.asarray(points, dtype=np.float64))
        if pts.dim() != 2 or pts.shape[1] != self.ndim:
            raise ValueError(f"points must be (P, {self.ndim}), got {tuple(pts.shape)}")
        for transform in self.transforms:
            pts = transform.map_points(pts)
        return pts.numpy()

    def points(self, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
        """Dense moving-space RAS points ``(ndim, *shape)`` of every voxel of a reference grid."""
        shape = _checks.check_shape(shape, "reference shape")
        if len(shape) != self.ndim:
            raise ValueError(f"a {len(shape)}D reference grid for {self.ndim}D transforms")
        grid = grid_affine(_check_affine4(affine, "reference affine"), self.ndim)
        total = math.prod(shape)
        out = np.empty((self.ndim, total))
        for start in range(0, total, _CHUNK):
            index = np.stack(np.unravel_index(np.arange(start, min(start + _CHUNK, total)), shape), 1)
            world = index @ grid[:-1, :-1].T + grid[:-1, -1]
            out[:, start:start + len(index)] = self.map_points(world).T
        return out.reshape(self.ndim, *shape)

    def to_displacement(self, reference: object, moving: object = None) -> np.ndarray:
        """The chain as one voxreg field ``(ndim, *reference_shape)`` float32: reference voxel
        ``y`` -> voxel ``y + disp(y)`` of the ``moving`` grid (default: the reference grid, which
        makes it a field for :func:`save_displacement` with the reference affine)."""
        shape, affine = _reference_grid(reference)
        target = affine if moving is None else _reference_grid(moving)[1]
        back = np.linalg.inv(grid_affine(target, self.ndim))
        points = self.points(shape, affine)
        voxels = _apply_linear(back[:-1, :-1], points) + back[:-1, -1].reshape(-1, *[1] * self.ndim)
        return (voxels - np.indices(shape)).astype(np.float32)

    def apply(self, image: Image | str | os.PathLike, reference: object,
              interp: Literal["linear", "nearest", "label"] = "linear", fill_value: float = 0.0) -> Image:
        """Resample ``image`` onto ``reference``'s grid through the chain in one interpolation
        (see :func:`apply_transforms`)."""
        _checks.check_interp(interp)
        if not isinstance(image, Image):
            image = load_image(image)
        shape, affine = _reference_grid(reference)
        if image.ndim != self.ndim or len(shape) != self.ndim:
            raise ValueError(f"image ({image.ndim}D) and reference ({len(shape)}D) must match the "
                             f"{self.ndim}D transforms")
        disp = self.to_displacement((shape, affine), moving=image)
        # warp() samples on the field's own grid: pad the image (with the fill value, what lies
        # outside it) and the field to a grid covering both, then crop (as io.resample_to)
        common = tuple(max(a, b) for a, b in zip(image.shape, shape))
        data = image.data if image.channels else image.data[None]
        data = data.astype(np.uint8) if data.dtype == np.bool_ else data
        pad = [(0, 0)] + [(0, c - s) for c, s in zip(common, image.shape)]
        if any(p[1] for p in pad):
            data = np.pad(data, pad, constant_values=fill_value)
        full = np.zeros((self.ndim, *common), dtype=np.float32)
        region = tuple(slice(0, s) for s in shape)
        full[(slice(None),) + region] = disp
        tensor = torch.from_numpy(np.ascontiguousarray(data))
        if tensor.is_floating_point() and tensor.dtype != torch.float64:
            tensor = tensor.float()
        moved = warp(tensor[None], torch.from_numpy(full)[None], interp=interp,
                     fill_value=fill_value)[0][(slice(None),) + region].numpy()
        if interp == "linear" and not np.issubdtype(moved.dtype, np.floating):
            moved = moved.astype(np.float32)
        header = reference.header if isinstance(reference, Image) else None
        return Image(np.ascontiguousarray(moved if image.channels else moved[0]), affine, header,
                     None, image.channels)


def _chain(transforms: TransformChain | Sequence[Entry], convention: Convention | None) -> TransformChain:
    return transforms if isinstance(transforms, TransformChain) else TransformChain(transforms, convention)


def chain_points(transforms: TransformChain | Sequence[Entry], reference_shape: Sequence[int],
                 reference_affine: np.ndarray, convention: Convention | None = None) -> np.ndarray:
    """Moving-space RAS mm points ``(ndim, *reference_shape)`` of every reference voxel."""
    return _chain(transforms, convention).points(reference_shape, reference_affine)


def compose_to_displacement(transforms: TransformChain | Sequence[Entry], reference: object,
                            moving: object = None, convention: Convention | None = None) -> np.ndarray:
    """The chain as one displacement ``(ndim, *reference_shape)`` float32 in voxels: reference
    voxel ``y`` reads ``moving``'s voxel ``y + disp(y)`` (``moving``: an Image, path or
    ``(shape, affine)``; default the reference grid, so that
    ``save_displacement(path, disp, reference_affine)`` writes the chain as one file)."""
    return _chain(transforms, convention).to_displacement(reference, moving)


def apply_transforms(image: Image | str | os.PathLike, transforms: TransformChain | Sequence[Entry],
                     reference: object, interp: Literal["linear", "nearest", "label"] = "linear",
                     fill_value: float = 0.0, convention: Convention | None = None) -> Image:
    """Resample ``image`` (an :class:`~voxreg.io.Image` on any grid, or a path) onto
    ``reference``'s grid (Image, path or ``(shape, affine)``) through ``transforms`` in ANTs
    order, as ``ants.apply_transforms(reference, image, transforms)``, with one interpolation.

    ``interp``: ``"linear"``, ``"nearest"`` or ``"label"`` (voxreg's label interpolation, as
    ANTs' ``genericLabel``). Samples outside the image read ``fill_value``. Returns an Image on
    the reference grid (its affine, and its header when it is an Image).
    """
    return _chain(transforms, convention).apply(image, reference, interp, fill_value)
