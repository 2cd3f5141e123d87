"""Apply saved transforms to an image file: the pipeline of ``voxreg warp``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from voxreg import io
from voxreg.apps.files import ImageLike, as_image, grid_error, source_path
from voxreg.transform_files import TransformChain, apply_transforms, parse_entry

__all__ = ["warp_file"]

TransformEntry = str | os.PathLike | tuple


def _load_image(image: ImageLike, key: str | None) -> io.Image:
    """``image`` as an Image the caller may change; an ``.npz`` with several arrays needs ``key``."""
    if not isinstance(image, (str, os.PathLike)):
        return as_image(image, "image")
    names = io.npz_keys(image)
    if key is None and len(names) > 1:
        raise ValueError(f"{str(image)!r} holds several arrays ({', '.join(names)}): choose one "
                         "with --key (key=)")
    return io.load_image(image, key=key)


def _reference_grid(reference: ImageLike) -> tuple[tuple[int, ...], np.ndarray]:
    if isinstance(reference, (str, os.PathLike)):
        if not Path(reference).exists():
            raise FileNotFoundError(f"reference {str(reference)!r} does not exist")
        return io.read_grid(reference)
    grid = as_image(reference, "reference")
    return grid.shape, grid.affine


def _entry_path(entry: TransformEntry) -> Path | None:
    """The file of a transform entry (``"[a.mat,1]"`` -> ``a.mat``), or ``None`` for objects."""
    if isinstance(entry, (str, os.PathLike, tuple)):
        return parse_entry(entry)[0]
    return None


def warp_file(
    image: ImageLike,
    warp: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    transforms: Sequence[TransformEntry] | None = None,
    reference: ImageLike | None = None,
    interp: Literal["linear", "nearest", "label"] = "linear",
    normalize: Literal["percentile", "minmax", "none"] = "none",
    resample: bool = False,
    warp_convention: Literal["lps-mm", "ras-mm", "voxel"] | None = None,
    key: str | None = None,
) -> io.Image:
    """Resample ``image`` through saved transforms in one interpolation, as ``voxreg warp`` does
    (:func:`voxreg.transform_files.apply_transforms`; everything pulls back,
    ``docs/conventions.md`` rules 4 and 12).

    Either one field, ``warp``: the output lies on the field's own grid, ``out(x) =
    image(x + disp(x))`` for an image on that grid (as the moving image was when it was
    registered); or ``transforms`` with ``reference``: a list in ANTs order (``antsApplyTransforms
    -r REFERENCE -t T1 -t T2``: a reference point ``y`` reads the image at ``T2(T1(y))``), the
    output on ``reference``'s grid and the image on any grid.

    Args:
        image: a file path (``.npz``: see ``key``), a nibabel image or a :class:`voxreg.io.Image`
            (never modified), 2D or 3D, one or more channels. A 3D image whose last axis has
            size 1 is read as 2D for 2D transforms.
        warp: a displacement file (:func:`voxreg.io.load_displacement`: written by ``voxreg
            register --warp``, ANTs/ITK, FreeSurfer, ...).
        out: output file (``None``: not written, only returned). Written atomically on the
            output grid with its affine and the image's header.
        transforms: field files, affine files (``.mat``/``.txt``/``.tfm``), ``"[affine.mat,1]"``
            or ``("affine.mat", True)`` for an inverse, or the objects
            :class:`voxreg.transform_files.TransformChain` takes.
        reference: the output grid with ``transforms``: an image path, a nibabel image or an
            :class:`voxreg.io.Image`.
        interp: ``"linear"``, or for label maps ``"nearest"`` or ``"label"`` (the label whose
            linearly interpolated indicator is largest, as ANTs' ``genericLabel``); these two
            keep values and dtype. Samples outside the image read 0.
        normalize: intensity normalisation before a linear warp (:func:`voxreg.io.normalize`;
            the default ``"none"`` keeps the image's units, as float32); ignored for
            ``"nearest"``/``"label"``.
        resample: with ``warp``, accept an image on another grid than the field's (it is read
            through the affines in the same single interpolation); without it such an image is
            an error. Implied with ``transforms``.
        warp_convention: the convention of field files that do not state one (``"lps-mm"``,
            ``"ras-mm"``, ``"voxel"``); a file's own tag is never overridden.
        key: the array of an ``.npz`` image holding several (e.g. ``"vol"`` or ``"seg"``).

    Returns:
        The resampled image: a :class:`voxreg.io.Image` on the output grid (``path``: the file
        written, if any).

    Raises:
        FileNotFoundError: ``image``, ``warp``, ``reference`` or a transform does not exist
            (the message names which).
        ValueError: neither or both of ``warp`` and ``transforms``, ``transforms`` without
            ``reference``, a field without a known convention (the message names the file and
            ``--warp-convention``), the grids differ without ``resample``, an ``.npz`` with
            several arrays and no ``key``, or ``out`` is an input or cannot be written.
        TypeError: ``image`` or ``warp`` of the wrong type.

    >>> moved = warp_file("labels.nii.gz", "warp.nii.gz", "moved_labels.nii.gz",
    ...                   interp="label")  # doctest: +SKIP
    >>> moved = warp_file("moving.nii.gz", transforms=["warp.nii.gz", "[affine.mat,1]"],
    ...                   reference="fixed.nii.gz", out="moved.nii.gz")  # doctest: +SKIP
    """
    if (warp is None) == (transforms is None or len(transforms) == 0):
        raise ValueError("give either --warp W (one field, output on its grid) or -t T [-t T ...] "
                         "with -r REFERENCE (transforms in ANTs order), not both or neither")
    if warp is not None:
        if not isinstance(warp, (str, os.PathLike)):
            raise TypeError(f"warp must be the path of a displacement file, got {type(warp).__name__}")
        if reference is not None:
            raise ValueError("--reference goes with -t (--warp's output lies on the warp's grid)")
        if not Path(warp).exists():
            raise FileNotFoundError(f"warp {str(warp)!r} does not exist")
        transforms = [warp]
    elif reference is None:
        raise ValueError("-t needs -r REFERENCE: the grid of the output (as antsApplyTransforms -r)")
    if isinstance(image, (str, os.PathLike)) and not Path(image).exists():
        raise FileNotFoundError(f"image {str(image)!r} does not exist")
    if out is not None:
        paths = [source_path(image), source_path(reference) if reference is not None else None]
        paths += [_entry_path(entry) for entry in transforms]
        io.check_output_path(out, tuple(p for p in paths if p is not None))
    chain = TransformChain(transforms, warp_convention)
    if warp is not None:
        field = chain.transforms[0]
        shape, affine = tuple(field.disp.shape[1:]), field.affine
    else:
        shape, affine = _reference_grid(reference)
    if len(shape) == 3 and chain.ndim == 2 and shape[-1] == 1:
        shape = shape[:2]
    img = _load_image(image, key)
    if img.ndim == 3 and chain.ndim == 2 and img.shape[-1] == 1:
        img.data = img.data[..., 0]
    if warp is not None and not resample:
        grid = io.Image(np.zeros(shape, np.uint8), affine, None, Path(warp))
        if not io.same_grid(img, grid):
            raise ValueError(grid_error(img, grid, "image", "warp")
                             + "; pass --resample to read the image through the affines")
    if interp not in ("nearest", "label"):
        img.data = io.normalize(img.data, normalize)
    moved = apply_transforms(img, chain, (shape, affine), interp=interp)
    result = io.Image(moved.data, affine, img.header, None, img.channels)
    if out is not None:
        result.path = io.save_image(out, moved.data, affine=affine, header=img.header,
                                    channels=img.channels)
    return result
