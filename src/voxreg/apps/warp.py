"""Apply a saved displacement field to an image file: the pipeline of ``voxreg warp``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from voxreg import io, transforms
from voxreg.apps.files import ImageLike, as_image, onto_grid, source_path

__all__ = ["warp_file"]


def warp_file(
    image: ImageLike,
    warp: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    interp: Literal["linear", "nearest", "label"] = "linear",
    normalize: Literal["percentile", "minmax", "none"] = "none",
    resample: bool = False,
) -> io.Image:
    """Warp ``image`` with a saved displacement, as ``voxreg warp`` does (pull-back:
    ``out(x) = image(x + disp(x))``, ``docs/conventions.md`` rule 4).

    Args:
        image: a file path, a nibabel image or a :class:`voxreg.io.Image` (never modified), 2D
            or 3D, one or more channels; on the warp's grid (as the moving image was when it was
            registered) unless ``resample``. A 3D image whose last axis has size 1 is read as 2D
            for a 2D warp.
        warp: a field file written by :func:`voxreg.apps.register.register_files` /
            ``voxreg register --warp`` (any units or convention) or by ANTs/ITK; read with
            :func:`voxreg.io.load_warp` as ``(ndim, *spatial)`` voxels of its grid.
        out: output file (``None``: not written, only returned). Written atomically on the
            warp's grid with its affine and the image's header.
        interp: ``"linear"``, or for label maps ``"nearest"`` or ``"label"`` (the label whose
            linearly interpolated indicator is largest); these two keep values and dtype.
        normalize: intensity normalisation before a linear warp (:func:`voxreg.io.normalize`);
            ignored for ``"nearest"``/``"label"``.
        resample: first resample ``image`` onto the warp's grid through the affines when the
            grids differ (with ``interp``).

    Returns:
        The warped image: an :class:`voxreg.io.Image` on the warp's grid (``path``: the file
        written, if any).

    Raises:
        FileNotFoundError: ``image`` or ``warp`` does not exist (the message names which).
        ValueError: ``warp`` is not a displacement field, the grids differ without
            ``resample``, or ``out`` is an input or cannot be written.
        TypeError: ``image`` or ``warp`` of the wrong type.

    >>> moved = warp_file("labels.nii.gz", "warp.nii.gz", "moved_labels.nii.gz",
    ...                   interp="label")  # doctest: +SKIP
    """
    if not isinstance(warp, (str, os.PathLike)):
        raise TypeError(f"warp must be the path of a displacement file, got {type(warp).__name__}")
    for value, what in ((image, "image"), (warp, "warp")):
        if isinstance(value, (str, os.PathLike)) and not Path(value).exists():
            raise FileNotFoundError(f"{what} {str(value)!r} does not exist")
    if out is not None:
        inputs = tuple(p for p in (source_path(image), Path(warp)) if p is not None)
        io.check_output_path(out, inputs)
    disp, affine = io.load_warp(warp)
    grid = io.Image(np.zeros(disp.shape[1:], np.uint8), affine, None, Path(warp))
    img = as_image(image, "image")
    if img.ndim == 3 and disp.shape[0] == 2 and img.shape[-1] == 1:
        img.data = img.data[..., 0]
    img = onto_grid(img, grid, "image", "warp", resample, interp)
    data = img.data if interp in ("nearest", "label") else io.normalize(img.data, normalize)
    tensor = torch.from_numpy(np.ascontiguousarray(data))
    tensor = tensor[None] if img.channels else tensor[None, None]
    moved = transforms.warp(tensor, torch.from_numpy(disp)[None], interp=interp)[0]
    moved = (moved if img.channels else moved[0]).numpy()
    result = io.Image(moved, affine, img.header, None, img.channels)
    if out is not None:
        result.path = io.save_image(out, moved, affine=affine, header=img.header,
                                    channels=img.channels)
    return result
