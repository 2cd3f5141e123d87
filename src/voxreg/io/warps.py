"""Displacement-field files with a stated convention: :func:`save_displacement` writes a voxreg
field, :func:`load_displacement` reads it (or an ANTs/ITK, FreeSurfer or voxreg field) back.

Every field here pulls back (``docs/conventions.md`` rules 4 and 12): it maps a point of the
fixed (reference) grid to the moving point whose value the moved image shows. ``d``: voxreg's
field ``(ndim, *spatial)`` in voxels of the fixed grid (``ij``); ``W``: the linear part of the
fixed affine (voxel -> RAS mm); ``F = diag(-1, -1, 1)`` (RAS <-> LPS). Each file stores the fixed
grid's affine and a fixed-point -> moving-point displacement:

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

Without a ``convention``, :func:`save_displacement` writes ``lps-mm`` to ``.nii.gz``/``.nii``,
``ras-mm`` to ``.mgz``/``.mgh`` and ``voxel`` to ``.npz`` (:func:`resolve_convention`).

NIfTI files record the convention in ``intent_name`` and ``descrip`` (``voxreg:lps-mm``,
``voxreg:ras-mm``); the tags of earlier voxreg versions (5D files tagged ``ants:lps-mm``,
``voxreg:mm`` = RAS mm, ``voxreg:vox`` = voxels) are understood. MGH has no free-text field that
both nibabel and FreeSurfer keep, so an MGZ is untagged (voxreg writes MGZ as ``ras-mm`` only).
Reading an untagged file: a 5D NIfTI is ITK's displacement layout, which ITK defines as LPS mm,
so it is ``lps-mm``; any other (a 4D NIfTI, an MGZ, an ``.npz`` without ``convention``, an
``.npy``) needs ``convention=`` (CLI: ``--warp-convention lps-mm|ras-mm|voxel``), never a guess.

:func:`save_warp` and :func:`load_warp` are other names of :func:`save_displacement` and
:func:`load_displacement`.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch

from voxreg._atomic import atomic_path
from voxreg.io.images import check_affine, check_input_file, read_file
from voxreg.transforms import disp_from_world, disp_to_world

__all__ = [
    "CONVENTIONS",
    "FIELD_FORMATS",
    "Convention",
    "as_disp",
    "load_displacement",
    "load_warp",
    "resolve_convention",
    "save_displacement",
    "save_warp",
]

Convention = Literal["lps-mm", "ras-mm", "voxel"]
#: The conventions of displacement files (module doc).
CONVENTIONS = ("lps-mm", "ras-mm", "voxel")
#: The extensions a displacement file may have.
FIELD_FORMATS = (".nii.gz", ".nii", ".mgz", ".mgh", ".npz", ".npy")

_TAGS = {f"voxreg:{c}": c for c in CONVENTIONS}
_TAGS.update({"ants:lps-mm": "lps-mm", "voxreg:mm": "ras-mm", "voxreg:vox": "voxel"})  # earlier
_NIFTI = (".nii.gz", ".nii")
_MGH = (".mgz", ".mgh")
_LAYOUTS = {"lps-mm": (_NIFTI, "ANTs/ITK read LPS fields from 5D NIfTI only"),
            "ras-mm": (_NIFTI + _MGH, "FreeSurfer reads RAS fields from NIfTI or MGZ"),
            "voxel": ((".npz",), "voxreg's own format: ANTs or FreeSurfer would read a NIfTI/MGZ "
                      "field as millimetres")}


def _name(path: Path) -> str:
    return repr(str(path))


def _check_convention(convention: str | None) -> None:
    if convention is not None and convention not in CONVENTIONS:
        hint = f" ({convention!r} was the earlier 'ants', now 'lps-mm')" if convention == "ants" else ""
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}"
                         + hint)


def _linear(affine: np.ndarray, ndim: int, what: str) -> np.ndarray:
    """The voxel -> world linear part of a grid for an ``ndim``-D field (2D: the first two axes)."""
    linear = affine[:ndim, :ndim]
    if abs(np.linalg.det(linear)) < 1e-12:
        raise ValueError(f"{what} is singular on the field's first {ndim} axes: {linear.tolist()}")
    return linear


def as_disp(disp: Any) -> np.ndarray:
    """A displacement ``(ndim, *spatial)`` or ``(1, ndim, *spatial)`` (array or tensor, ndim 2
    or 3, finite floats) as a float64 ``(ndim, *spatial)`` array; else a ValueError.

    >>> as_disp(torch.zeros(1, 2, 4, 5)).shape
    (2, 4, 5)
    """
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


def resolve_convention(path: str | os.PathLike, convention: str | None = None) -> str:
    """The convention a field written to ``path`` gets: ``convention``, or by default ``lps-mm``
    for ``.nii.gz``/``.nii``, ``ras-mm`` for ``.mgz``/``.mgh``, ``voxel`` for ``.npz``/``.npy``.

    Raises:
        ValueError: an unknown convention, or a file layout that cannot hold it (the message
            says which extension to use and why; ``voxel`` is written as ``.npz`` only).

    >>> resolve_convention("warp.nii.gz"), resolve_convention("warp.mgz"), resolve_convention("w.npz")
    ('lps-mm', 'ras-mm', 'voxel')
    >>> resolve_convention("warp.nii.gz", "voxel")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: cannot write a 'voxel' field to 'warp.nii.gz': use .npz (voxreg's own format: ...)
    """
    _check_convention(convention)
    name = Path(path).name.lower()
    if convention is None:
        convention = ("voxel" if name.endswith((".npz", ".npy")) else
                      "ras-mm" if name.endswith(_MGH) else "lps-mm")
    allowed, why = _LAYOUTS[convention]
    if not name.endswith(allowed):
        raise ValueError(f"cannot write a {convention!r} field to {_name(Path(path))}: use "
                         f"{' or '.join(allowed)} ({why})")
    return convention


def save_displacement(path: str | os.PathLike, disp: Any, fixed_affine: np.ndarray,
                      convention: Convention | None = None) -> Path:
    """Write a displacement field in ``convention``, atomically, with the fixed grid's affine.

    Args:
        path: ``.nii.gz``/``.nii`` for ``"lps-mm"`` (ANTs/ITK) and ``"ras-mm"`` (FreeSurfer),
            also ``.mgz``/``.mgh`` for ``"ras-mm"``, ``.npz`` for ``"voxel"`` (module doc).
        disp: ``(ndim, *spatial)`` or ``(1, ndim, *spatial)``, array or tensor: voxels of the
            fixed grid, pulling back, as voxreg computes it.
        fixed_affine: the fixed grid's ``(4, 4)`` voxel-to-world matrix (RAS mm).
        convention: ``"lps-mm"``, ``"ras-mm"`` or ``"voxel"``; ``None``: by the extension
            (:func:`resolve_convention`).

    Raises:
        ValueError: a layout that cannot hold the convention (the message says which to use),
            or a bad ``disp``/``fixed_affine``.

    >>> import tempfile
    >>> disp = np.zeros((3, 2, 3, 4), np.float32)
    >>> disp[0] = 1.0                                  # one voxel along axis 0
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_displacement(Path(tmp) / "warp.nii.gz", disp, np.diag([2.0, 2.0, 2.0, 1.0]))
    ...     stored = np.asarray(nib.load(path).dataobj)
    ...     back, affine = load_displacement(path)
    >>> stored.shape, stored[0, 0, 0, 0], back[:, 0, 0, 0]   # lps-mm: (-2, 0, 0) mm
    ((2, 3, 4, 1, 3), array([-2., -0.,  0.], dtype=float32), array([1., 0., 0.], dtype=float32))
    """
    path = Path(path)
    convention = resolve_convention(path, convention)
    disp = as_disp(disp)
    affine = check_affine(fixed_affine, "fixed_affine")
    ndim = disp.shape[0]
    linear = _linear(affine, ndim, "fixed_affine")
    if convention == "voxel":
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, disp=disp.astype(np.float32), affine=affine,
                                convention=np.array("voxel"))
        return path
    values = disp_to_world(torch.from_numpy(disp)[None], linear)[0].numpy()
    if convention == "lps-mm":
        values[:2] *= -1.0
    vector = np.moveaxis(values.astype(np.float32), 0, -1)
    spatial = vector.shape[:-1] + (1,) * (3 - ndim)
    vector = vector.reshape(*spatial, *((1,) if convention == "lps-mm" else ()), ndim)
    if path.name.lower().endswith(_MGH):
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


def _header_tag(header: Any) -> str | None:
    if not isinstance(header, nib.Nifti1Header):
        return None
    for key in ("intent_name", "descrip"):
        text = np.asarray(header[key]).item().split(b"\0")[0].decode("ascii", "replace").strip()
        word = text.split(" ")[0] if text else ""
        if word in _TAGS:
            return _TAGS[word]
    return None


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, str | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.keys()}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read {_name(path)} as a displacement field: {err}") from None
    data = arrays.get("disp", next(iter(arrays.values())) if len(arrays) == 1 else None)
    if data is None:
        raise ValueError(f"{_name(path)} holds no array 'disp' (it holds {', '.join(arrays)})")
    tag = str(arrays["convention"]) if "convention" in arrays else None
    _check_convention(tag)
    affine = check_affine(arrays.get("affine", np.eye(4)), f"the affine of {_name(path)}")
    return np.asarray(data), affine, tag


def _read_field(path: Path) -> tuple[np.ndarray, np.ndarray, str | None, bool]:
    """``(values (ndim, *spatial) float64, affine, tag, itk_layout)`` as stored, unconverted."""
    name = path.name.lower()
    if not name.endswith(FIELD_FORMATS):
        raise ValueError(f"unsupported displacement file {_name(path)}: use one of "
                         f"{', '.join(FIELD_FORMATS)}")
    check_input_file(path, "displacement file")
    if name.endswith(".npz"):
        data, affine, tag = _read_npz(path)
        shape, itk, channels = data.shape, False, data.ndim in (3, 4) and data.shape[0] == data.ndim - 1
    else:
        image = read_file(path, None, (), vector=True)
        data, affine, tag, channels = image.data, image.affine, _header_tag(image.header), image.channels
        shape = tuple(image.header.get_data_shape()) if image.header is not None else data.shape
        itk = isinstance(image.header, nib.Nifti1Header) and len(shape) == 5
        if channels and data.shape[0] == 2 and data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]  # a 2D field stored (X, Y, 1, 2)
    if not channels or data.shape[0] not in (2, 3) or data.ndim != data.shape[0] + 1:
        raise ValueError(f"{_name(path)} is not a displacement field: expected (X, Y, Z, 3), "
                         f"(X, Y, Z, 1, 3), a 2D (X, Y, 1, [1,] 2) or an array (ndim, *spatial), "
                         f"got shape {shape}")
    data = data.astype(np.float64)
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{_name(path)} holds NaN or infinite displacements")
    return data, affine, tag, itk


def load_displacement(path: str | os.PathLike,
                      convention: Convention | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a field file as ``(disp, affine)``: ``disp`` ``(ndim, *spatial)`` float32 in voxels
    of the file's grid (voxreg's convention), ``affine`` that grid's ``(4, 4)`` matrix.

    The file's tag gives the convention; ``convention`` is needed for untagged files other than
    ITK's 5D layout (``lps-mm``), e.g. an MGZ or an mri_synthmorph NIfTI (``"ras-mm"``), or an
    ``.npz``/``.npy`` without one (``"voxel"``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a displacement field, no convention known (the message names the file
            and ``--warp-convention``), or ``convention`` contradicts the file's tag.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_displacement(Path(tmp) / "warp.npz", np.ones((2, 4, 4)), np.eye(4))
    ...     disp, affine = load_displacement(path)
    >>> disp.shape, disp.dtype, float(disp[1, 0, 0])   # (ndim, *spatial) float32, voxels
    ((2, 4, 4), dtype('float32'), 1.0)
    """
    path = Path(path)
    _check_convention(convention)
    values, affine, tag, itk = _read_field(path)
    if tag is not None:
        if convention is not None and convention != tag:
            raise ValueError(f"{_name(path)} is tagged as a {tag!r} field but convention="
                             f"{convention!r} was given (--warp-convention); drop it or fix the file")
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
        linear = _linear(affine, ndim, f"the affine of {_name(path)}")
        values = disp_from_world(torch.from_numpy(values)[None], linear)[0].numpy()
    return values.astype(np.float32), affine


#: Another name of :func:`save_displacement`.
save_warp = save_displacement
#: Another name of :func:`load_displacement`.
load_warp = load_displacement
