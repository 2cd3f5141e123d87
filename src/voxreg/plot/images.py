"""Pictures of images: a grid of 2D images or slices (:func:`slices`), and the three middle slices of
3D volumes (:func:`volume_slices`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from voxreg.plot.figures import (
    as_list,
    drop_unused,
    image_2d,
    new_figure,
    panel_layout,
    per_item,
    save_figure,
    slice_index,
    squeeze_leading,
    to_numpy,
)

__all__ = ["slices", "volume_slices"]


def slices(
    images: object,
    titles: Sequence[str] | None = None,
    cmaps: str | Sequence[str] | None = None,
    do_colorbars: bool = False,
    grid: object = None,
    width: float = 10.0,
    show_axis: bool = False,
    imshow_args: Mapping | Sequence[Mapping] | None = None,
    axis: int = 0,
    index: int | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """A grid of 2D images with titles, per-image colormaps and optional colorbars.

    Like neurite's ``plot.slices``. Each image is 2D ``(H, W)`` or a 3D volume ``(D, H, W)``,
    shown by its slice ``index`` (the middle one by default) along ``axis``; leading axes of size
    1 are dropped. Pass a list to show several (a single 3D array is one volume, not a stack).

    Args:
        images: an image or a list of images (numpy arrays or torch tensors).
        titles: one title per image.
        cmaps: a colormap name for all images or one per image (default ``"gray"``).
        do_colorbars: add a colorbar to each image (each adds an axes to the figure).
        grid: ``None`` (one row), ``True`` (near-square) or ``(rows, cols)``; unused cells are
            removed from the figure.
        width: figure width in inches.
        show_axis: keep the axis ticks and frame.
        imshow_args: extra ``imshow`` keywords, one dict for all or one per image.
        axis, index: slicing of 3D volumes.
        save: write a PNG there.

    Returns:
        The figure; its first ``len(images)`` axes are the images, in reading order.
    """
    items = as_list(images)
    arrays = [image_2d(item, "images", axis, index) for item in items]
    count = len(arrays)
    if isinstance(titles, str):
        raise ValueError("titles must be a sequence of strings, one per image")
    titles_ = per_item(titles, count, "titles")
    cmaps_ = per_item(cmaps, count, "cmaps", "gray")
    args_ = per_item(imshow_args, count, "imshow_args", {})
    rows, cols = panel_layout(count, grid)
    height, width_px = arrays[0].shape
    fig, axes = new_figure(rows, cols, width, height / width_px, extra=0.35)
    used = drop_unused(fig, axes, count)
    for ax, array, title, cmap, kwargs in zip(used, arrays, titles_, cmaps_, args_, strict=True):
        kwargs = dict(kwargs or {})
        kwargs.setdefault("cmap", cmap)
        kwargs.setdefault("interpolation", "nearest")
        image = ax.imshow(array, **kwargs)
        if title is not None:
            ax.set_title(str(title))
        if not show_axis:
            ax.axis("off")
        if do_colorbars:
            fig.colorbar(image, ax=ax, shrink=0.8)
    return save_figure(fig, save)


def volume_slices(
    volumes: object,
    titles: Sequence[str] | None = None,
    cmap: str = "gray",
    indices: Sequence[int | None] | None = None,
    do_colorbars: bool = False,
    width: float = 10.0,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Middle slices of 3D volumes along their three axes: one row per volume, one column per axis.

    Args:
        volumes: a 3D volume ``(D, H, W)`` or a list of them (leading axes of size 1 dropped).
        titles: one title per volume; panel titles read ``"{title} axis k"`` (``"axis k"`` alone
            without titles), with the slice index.
        cmap: colormap for all panels. The three slices of a volume share its intensity range.
        indices: the slice index along each axis, ``(i0, i1, i2)`` (``None`` = middle), the same
            for every volume.
        do_colorbars: one colorbar per row.
        width: figure width in inches.
        save: write a PNG there.

    Returns:
        The figure; its first ``3 * len(volumes)`` axes are the slices, row by row.
    """
    arrays = []
    for item in as_list(volumes):
        array = squeeze_leading(to_numpy(item, "volumes"), 3)
        if array.ndim != 3:
            raise ValueError(f"volumes must be 3D volumes (D, H, W), got shape {array.shape}")
        arrays.append(array.astype(np.float64, copy=False))
    if isinstance(titles, str):
        raise ValueError("titles must be a sequence of strings, one per volume")
    titles_ = per_item(titles, len(arrays), "titles")
    if indices is None:
        indices = (None, None, None)
    if isinstance(indices, (str, bytes)) or len(indices) != 3:
        raise ValueError(f"indices must be three slice indices (or None), got {indices!r}")
    fig, axes = new_figure(len(arrays), 3, width, 1.0, extra=0.35)
    for row, (array, title) in enumerate(zip(arrays, titles_, strict=True)):
        finite = array[np.isfinite(array)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        image = None
        for k in range(3):
            i = slice_index(array.shape[k], indices[k], "indices")
            ax = axes[row, k]
            image = ax.imshow(np.take(array, i, axis=k), cmap=cmap, vmin=vmin, vmax=vmax,
                              interpolation="nearest")
            label = f"axis {k} [{i}]"
            ax.set_title(f"{title} {label}" if title is not None else label)
            ax.axis("off")
        if do_colorbars:
            fig.colorbar(image, ax=list(axes[row]), shrink=0.8)
    return save_figure(fig, save)
