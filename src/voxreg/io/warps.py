"""Displacement-field files: :func:`save_warp` writes a field ``(ndim, *spatial)`` (voxels,
pull-back) as a NIfTI vector image in voxreg's or ANTs' convention, :func:`load_warp` reads any
of them (and ANTs/ITK fields) back in voxels. The conventions are described in :mod:`voxreg.io`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch

from voxreg.io.images import atomic_write, format_of, read_file, save_image
from voxreg.transforms import disp_from_world, disp_to_world

__all__ = ["load_warp", "save_warp"]

_WARP_INTENT = 1007  # NIFTI_INTENT_VECTOR
_WARP_NAMES = {"voxel": "voxreg:vox", "mm": "voxreg:mm"}


def _as_disp(disp: Any) -> np.ndarray:
    if hasattr(disp, "detach"):
        disp = disp.detach().cpu().numpy()
    disp = np.asarray(disp)
    if disp.ndim >= 4 and disp.shape[0] == 1 and disp.shape[1] == disp.ndim - 2:
        disp = disp[0]
    if disp.ndim not in (3, 4) or disp.shape[0] != disp.ndim - 1:
        raise ValueError(
            f"a displacement must be (ndim, *spatial) with ndim 2 or 3, got shape {disp.shape}"
        )
    return disp


def save_warp(
    path: str | os.PathLike,
    disp: Any,
    affine: np.ndarray,
    convention: Literal["voxreg", "ants"] = "voxreg",
    units: Literal["voxel", "mm"] = "voxel",
    header: Any = None,
) -> Path:
    """Write a displacement field (the fixed grid's) atomically.

    Args:
        path: ``.nii.gz`` / ``.nii`` (any convention), or ``.npz`` / ``.npy`` (``voxreg``
            convention in voxels only: the raw ``(ndim, *spatial)`` array).
        disp: ``(ndim, *spatial)`` (or ``(1, ndim, *spatial)``) in voxels of the fixed grid.
        affine: the fixed image's ``(4, 4)`` affine (written into the file).
        convention: ``"voxreg"``: components along the array axes in ``units``; ``"ants"``:
            LPS millimetres for ANTs/ITK (``units`` is ignored): the RAS mm vector
            ``affine[:3, :3] @ d`` with its x and y components negated.
        units: ``"voxel"`` or ``"mm"`` (world units, RAS) for the voxreg convention.
        header: optional NIfTI header template (e.g. the fixed image's).

    The NIfTI is 5D ``(*spatial, 1, ndim)`` (2D fields: ``(X, Y, 1, 1, 2)``), float32, intent
    ``vector``.

    >>> import tempfile
    >>> disp = np.zeros((3, 2, 3, 4), np.float32)
    >>> disp[0] = 1.0                                  # one voxel along axis 0
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_warp(Path(tmp) / "warp.nii.gz", disp, np.diag([2.0, 2.0, 2.0, 1.0]),
    ...                      convention="ants")        # stored as LPS mm: (-2, 0, 0)
    ...     stored = np.asarray(nib.load(path).dataobj)
    ...     back, affine = load_warp(path)
    >>> stored.shape, stored[0, 0, 0, 0], back[:, 0, 0, 0]
    ((2, 3, 4, 1, 3), array([-2., -0.,  0.], dtype=float32), array([1., 0., 0.], dtype=float32))
    """
    path = Path(path)
    ext = format_of(path)
    disp = _as_disp(disp)
    ndim = disp.shape[0]
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be a (4, 4) matrix, got shape {affine.shape}")
    if convention not in ("voxreg", "ants"):
        raise ValueError(f"convention must be 'voxreg' or 'ants', got {convention!r}")
    if units not in ("voxel", "mm"):
        raise ValueError(f"units must be 'voxel' or 'mm', got {units!r}")
    if ext in (".npz", ".npy"):
        if convention != "voxreg" or units != "voxel":
            raise ValueError("warps in mm or for ANTs must be NIfTI files (.nii.gz or .nii)")
        return save_image(path, disp.astype(np.float32), key="disp")
    if ext not in (".nii.gz", ".nii"):
        raise ValueError(f"warps are written as NIfTI (.nii.gz or .nii), not {ext}")
    values = disp.astype(np.float64)
    if convention == "ants" or units == "mm":
        keep = list(range(ndim)) + [3]
        world = torch.as_tensor(affine[np.ix_(keep, keep)] if ndim == 2 else affine)
        values = disp_to_world(torch.from_numpy(values)[None], world)[0].numpy()
    if convention == "ants":
        values = values.copy()
        values[0] *= -1.0  # RAS -> LPS: x and y flip sign
        values[1] *= -1.0
    vector = np.moveaxis(values.astype(np.float32), 0, -1)  # (*spatial, ndim)
    if ndim == 2:
        vector = vector[:, :, None, None, :]
    else:
        vector = vector[:, :, :, None, :]

    hdr = header.copy() if isinstance(header, nib.Nifti1Header) and type(header) is nib.Nifti1Header \
        else None
    image = nib.Nifti1Image(np.ascontiguousarray(vector), affine, header=hdr, dtype=np.float32)
    image.header.set_slope_inter(None, None)
    name = "ants:lps-mm" if convention == "ants" else _WARP_NAMES[units]
    image.header.set_intent("vector", (), name=name)
    image.header.set_xyzt_units("mm")
    if hdr is None:
        image.set_sform(affine, code=2)
        image.set_qform(affine, code=2)
    return atomic_write(path, lambda tmp: image.to_filename(tmp))


def load_warp(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a displacement field back as ``(disp, affine)``, ``disp`` ``(ndim, *spatial)`` float32
    in voxels of the grid whose affine is returned.

    Files written by :func:`save_warp` are understood in every convention (their
    ``intent_name`` says which); another NIfTI vector image is taken to be an ANTs/ITK field
    (LPS mm); ``.npz`` (key ``disp``) and ``.npy`` hold voxels.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_warp(Path(tmp) / "warp.npz", np.ones((2, 4, 4)), np.eye(4))
    ...     disp, affine = load_warp(path)
    >>> disp.shape, disp.dtype, float(disp[1, 0, 0])   # (ndim, *spatial) float32, voxels
    ((2, 4, 4), dtype('float32'), 1.0)
    """
    path = Path(path)
    ext = format_of(path)
    if ext in (".npz", ".npy"):
        image = read_file(path, None, ("disp", "vol"), vector=True)
        return _as_disp(image.data).astype(np.float32), image.affine
    image = read_file(path, None, ())
    data = image.data
    if not image.channels or data.shape[0] != image.ndim:
        raise ValueError(
            f"{str(path)!r} is not a displacement field: expected a vector image "
            f"(*spatial, 1, ndim), got {data.shape[1:] + data.shape[:1] if image.channels else data.shape}"
        )
    header = image.header
    name = ""
    if header is not None and hasattr(header, "get_intent"):
        try:
            name = str(header.get_intent()[2])
        except Exception:  # noqa: BLE001 - unknown intent codes
            name = ""
    values = data.astype(np.float64)
    if name == _WARP_NAMES["voxel"]:
        return values.astype(np.float32), image.affine
    ndim = image.ndim
    if name != _WARP_NAMES["mm"]:  # ANTs / ITK: LPS mm
        values = values.copy()
        values[0] *= -1.0
        values[1] *= -1.0
    keep = list(range(ndim)) + [3]
    world = torch.as_tensor(image.affine[np.ix_(keep, keep)] if ndim == 2 else image.affine)
    voxels = disp_from_world(torch.from_numpy(values)[None], world)[0].numpy()
    return voxels.astype(np.float32), image.affine
