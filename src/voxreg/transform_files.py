"""World-space transform files: displacement fields with a stated convention, ITK/ANTs affines,
and chains of them in ANTs order, resampled with one interpolation.

Every transform here pulls back (``docs/conventions.md`` rules 4, 5, 12): it maps a point of the
fixed (reference, output) space to the moving point whose value the output shows. World
coordinates are NIfTI RAS mm; ITK and ANTs use LPS (``x`` and ``y`` negated).

Displacement fields are :mod:`voxreg.io.warps`' (re-exported here): :func:`save_displacement`
writes a voxreg field as ``lps-mm`` (ANTs/ITK 5D NIfTI), ``ras-mm`` (FreeSurfer 4D NIfTI/MGZ) or
``voxel`` (``.npz`` only), stating the convention in the file, and :func:`load_displacement`
reads it back in voxels; an untagged field other than ITK's 5D layout needs ``convention=``
(CLI: ``--warp-convention``).

Affines. :func:`load_affine` / :func:`save_affine` exchange the world matrix ``(ndim+1,
ndim+1)``, fixed RAS mm -> moving RAS mm (:attr:`voxreg.affine.AffineResult.world_matrix`), with
ITK's ``.mat`` (MATLAB v4 binary as ANTs writes ``0GenericAffine.mat``: ``(12, 1)``
``AffineTransform_double_3_3`` or ``_float_3_3`` = matrix by rows then translation ``t``, and
``fixed`` = centre ``C``; 2D ``_2_2``) and ``.txt``/``.tfm``, both through
:mod:`voxreg.affine.itk`. ITK's map is ``p -> M (p - C) + C + t`` in LPS. ``sitk.ReadTransform``
and ``ants.read_transform`` read what voxreg writes; FSL's text ``.mat`` files are refused.

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

import numpy as np
import torch

from voxreg import _checks
from voxreg.affine.itk import load_itk_affine, save_itk_affine
from voxreg.affine.matrices import grid_affine, square_matrix
from voxreg.io import (
    CONVENTIONS,
    FIELD_FORMATS,
    Convention,
    Image,
    as_disp,
    check_affine,
    load_displacement,
    load_image,
    read_grid,
    save_displacement,
)
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

_AFFINE_EXTS = (".mat", ".txt", ".tfm")
_ENTRY = re.compile(r"^\[\s*([^\]]+?)\s*(?:,\s*([01]))?\s*\]$")
_CHUNK = 1 << 20  # points mapped per pass


def _name(path: Path) -> str:
    return repr(str(path))


def _check_affine_path(path: Path) -> Path:
    if not path.name.lower().endswith(_AFFINE_EXTS):
        raise ValueError(f"unsupported affine file {_name(path)}: use .mat, .txt or .tfm")
    return path


# -- affines -------------------------------------------------------------------------------


def load_affine(path: str | os.PathLike) -> np.ndarray:
    """Read an ITK/ANTs affine (``.mat``, ``.txt``, ``.tfm``) as the ``(ndim+1, ndim+1)`` world
    matrix, fixed RAS mm -> moving RAS mm (:func:`voxreg.affine.load_itk_affine`). Raises
    ValueError naming the file when it is not one ``AffineTransform``/``MatrixOffsetTransformBase``
    (e.g. an ``Euler3DTransform``) or has another extension."""
    return load_itk_affine(_check_affine_path(Path(path)))


def save_affine(path: str | os.PathLike, world_matrix: np.ndarray,
                center: Sequence[float] | None = None) -> Path:
    """Write a fixed-RAS -> moving-RAS world matrix as an ITK affine, atomically: ``.mat``
    (MATLAB v4, ``AffineTransform_double_3_3`` + ``fixed``, as ANTs writes) or ``.txt``/``.tfm``
    (:func:`voxreg.affine.save_itk_affine`). ``center``: ITK's centre in RAS mm (default the
    origin; any centre gives the same map)."""
    return save_itk_affine(_check_affine_path(Path(path)), world_matrix, center)


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
        self.disp = as_disp(self.disp).astype(np.float32)
        self.affine = check_affine(self.affine)
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
    elif name.endswith(FIELD_FORMATS):
        transform = FieldMap(*load_displacement(path, convention), str(path))
    else:
        raise ValueError(f"unsupported transform file {_name(path)}: affines are "
                         f"{', '.join(_AFFINE_EXTS)}, fields {', '.join(FIELD_FORMATS)}")
    return transform.inverse() if inverse else transform


def _reference_grid(reference: object) -> tuple[tuple[int, ...], np.ndarray]:
    if isinstance(reference, Image):
        return reference.shape, check_affine(reference.affine, "reference affine")
    if isinstance(reference, tuple) and len(reference) == 2 and not isinstance(reference[0], str):
        return (_checks.check_shape(reference[0], "reference shape"),
                check_affine(reference[1], "reference affine"))
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
        grid = grid_affine(check_affine(affine, "reference affine"), self.ndim)
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
        voxels = np.einsum("ij,j...->i...", back[:-1, :-1], points) + \
            back[:-1, -1].reshape(-1, *[1] * self.ndim)
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
