"""Pictures of displacement fields ``(ndim, *spatial)`` in voxels (pull-back): arrows
(:func:`flow`), a deformed grid (:func:`grid`) and the Jacobian determinant with the folds
(:func:`jacobian`), in ``imshow``'s frame (column index right, row index down).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from voxreg.plot.figures import (
    check_axis,
    disp_list,
    drop_unused,
    image_2d,
    imshow_frame,
    new_figure,
    panel_layout,
    per_item,
    save_figure,
    slice_index,
)
from voxreg.transforms import jacobian_determinant

__all__ = ["flow", "grid", "jacobian"]


def flow(
    disps: object,
    titles: Sequence[str] | None = None,
    stride: int | None = None,
    scale: float | None = 1.0,
    width: float = 10.0,
    cmap: str = "viridis",
    background: object = None,
    grid: object = None,
    do_colorbars: bool = False,
    show_axis: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Quiver plots of 2D displacement fields, arrows coloured by magnitude (neurite's ``plot.flow``).

    An arrow starts at voxel ``(row, col)`` and points to ``(row + disp[0], col + disp[1])`` in
    the picture drawn with ``imshow(origin="upper")`` (rows downwards): the quiver's ``U`` is
    ``disp[1]`` (along columns, to the right) and ``V`` is ``disp[0]`` (along rows, downwards,
    the y axis being inverted). Under the pull-back convention the arrow at ``x`` points to
    where the moving image is sampled for ``x``.

    Args:
        disps: a field ``(2, H, W)``, a batch ``(B, 2, H, W)`` (one panel each) or a list of these.
        titles: one title per field.
        stride: draw every ``stride``-th voxel along each axis; ``None`` picks one that gives at
            most about 32 arrows per axis.
        scale: arrow length multiplier: 1 draws arrows at their true length in voxels; ``None``
            scales so that the longest arrow over all panels is about ``stride`` voxels long.
        width: figure width in inches.
        cmap: colormap of the magnitude (shared across panels).
        background: an image (2D, or a list with one per field) drawn in gray under the arrows.
        grid: panel layout, as in :func:`slices`.
        do_colorbars: add a magnitude colorbar to each panel.
        show_axis: keep axis ticks.
        save: write a PNG there.

    Returns:
        The figure; its first ``n`` axes hold one ``Quiver`` each.
    """
    fields = disp_list(disps, "disps", ndim=2)
    count = len(fields)
    if isinstance(titles, str):
        raise ValueError("titles must be a sequence of strings, one per field")
    titles_ = per_item(titles, count, "titles")
    if background is None:
        backgrounds = [None] * count
    elif isinstance(background, (list, tuple)):
        backgrounds = [image_2d(b, "background") for b in per_item(background, count, "background")]
    else:
        backgrounds = [image_2d(background, "background")] * count
    for field, back in zip(fields, backgrounds, strict=True):
        if back is not None and back.shape != field.shape[1:]:
            raise ValueError(
                f"background must have the field's shape {field.shape[1:]}, got {back.shape}"
            )
    if stride is None:
        stride = max(1, max(max(f.shape[1:]) for f in fields) // 32)
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    magnitudes = [np.hypot(f[0, ::stride, ::stride], f[1, ::stride, ::stride]) for f in fields]
    top = max(float(m.max()) for m in magnitudes)
    if scale is None:
        factor = 0.9 * stride / top if top > 0 else 1.0
    elif isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0:
        factor = float(scale)
    else:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    norm = mcolors.Normalize(0.0, top if top > 0 else 1.0)

    rows, cols = panel_layout(count, grid)
    height, width_px = fields[0].shape[1:]
    fig, axes = new_figure(rows, cols, width, height / width_px, extra=0.35)
    used = drop_unused(fig, axes, count)
    for ax, field, magnitude, title, back in zip(
        used, fields, magnitudes, titles_, backgrounds, strict=True
    ):
        shape = field.shape[1:]
        if back is not None:
            ax.imshow(back, cmap="gray", interpolation="nearest")
        ys, xs = np.meshgrid(np.arange(0, shape[0], stride), np.arange(0, shape[1], stride),
                             indexing="ij")
        quiver = ax.quiver(
            xs, ys, field[1, ::stride, ::stride], field[0, ::stride, ::stride], magnitude,
            cmap=cmap, norm=norm, angles="xy", scale_units="xy", scale=1.0 / factor,
            pivot="tail",
        )
        imshow_frame(ax, shape)
        if title is not None:
            ax.set_title(str(title))
        if not show_axis:
            ax.set_xticks([])
            ax.set_yticks([])
        if do_colorbars:
            fig.colorbar(quiver, ax=ax, shrink=0.8, label="|disp| (voxels)")
    return save_figure(fig, save)


def grid(
    disp: object,
    spacing: int = 4,
    ax: object = None,
    background: object = None,
    color: str = "tab:blue",
    linewidth: float = 1.0,
    title: str | None = None,
    width: float = 6.0,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Deformed grid: the lines of a regular grid pushed through ``x -> x + disp(x)``.

    Row line ``r`` (every ``spacing``-th row) is the curve ``(r, c) + disp(r, c)`` over all
    columns ``c``, column lines likewise, drawn in imshow's frame (x = column, y = row, rows
    downwards). A zero field gives straight lines; a translation ``t`` shifts every line by ``t``.
    The row lines come first in ``ax.lines`` (gid ``"grid-row"``), then the column lines
    (gid ``"grid-col"``).

    Args:
        disp: a 2D field ``(2, H, W)`` or ``(1, 2, H, W)``.
        spacing: distance in voxels between grid lines.
        ax: draw into this axes (the figure returned is ``ax.figure``) instead of a new figure.
        background: optional 2D image ``(H, W)`` drawn in gray underneath.
        color, linewidth: line style.
        title: axes title.
        width: figure width in inches (new figures only).
        save: write a PNG there.
    """
    fields = disp_list(disp, "disp", ndim=2)
    if len(fields) != 1:
        raise ValueError(f"disp must be a single field (2, H, W), got a batch of {len(fields)}")
    field = fields[0]
    shape = field.shape[1:]
    if not isinstance(spacing, (int, np.integer)) or spacing < 1:
        raise ValueError(f"spacing must be a positive integer, got {spacing!r}")
    back = None if background is None else image_2d(background, "background")
    if back is not None and back.shape != shape:
        raise ValueError(f"background must have the field's shape {shape}, got {back.shape}")
    if ax is None:
        fig, axes = new_figure(1, 1, width, shape[0] / shape[1], extra=0.35)
        ax = axes[0, 0]
    else:
        fig = getattr(ax, "figure", None)
        if fig is None or not hasattr(ax, "plot"):
            raise ValueError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    if back is not None:
        ax.imshow(back, cmap="gray", interpolation="nearest")
    rows = np.arange(shape[0], dtype=np.float64)[:, None] + field[0]
    cols = np.arange(shape[1], dtype=np.float64)[None, :] + field[1]
    style = {"color": color, "linewidth": linewidth}
    for r in range(0, shape[0], spacing):
        ax.plot(cols[r, :], rows[r, :], gid="grid-row", **style)
    for c in range(0, shape[1], spacing):
        ax.plot(cols[:, c], rows[:, c], gid="grid-col", **style)
    imshow_frame(ax, shape)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(str(title))
    return save_figure(fig, save)


def jacobian(
    disp: object,
    title: str | None = None,
    axis: int = 0,
    index: int | None = None,
    cmap: str = "BrBG",
    fold_color: str = "red",
    width: float = 6.0,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Jacobian determinant of ``x -> x + disp(x)``, with folds (``det <= 0``) painted over.

    The determinant (:func:`voxreg.transforms.jacobian_determinant`) is shown with a diverging
    colormap centred on 1 (symmetric range); voxels with ``det <= 0`` are painted ``fold_color``
    (an extra image with gid ``"folds"``, masked elsewhere). The title gives the percentage of
    folded voxels over the whole field (the whole volume for 3D fields).

    Args:
        disp: ``(ndim, *spatial)`` or ``(B, ndim, *spatial)`` (2D or 3D; one panel per field).
        title: prefix of each panel title (``"{title}: 1.23% folding"``).
        axis, index: the slice shown for 3D fields (the middle one along ``axis`` by default).
        cmap: diverging colormap (default brown below 1 = contraction, teal above = expansion,
            white at 1; chosen to stay clear of the red folds).
        fold_color: colour of folded voxels.
        width: width of one panel in inches.
        save: write a PNG there.

    Returns:
        The figure; one image axes per field, each followed by its colorbar axes.
    """
    fields = disp_list(disp, "disp")
    fold_rgba = mcolors.to_rgba(fold_color)
    panels = []
    for field in fields:
        det = jacobian_determinant(torch.from_numpy(np.ascontiguousarray(field))[None])[0].numpy()
        percent = 100.0 * float(np.mean(det <= 0))
        if det.ndim == 3:
            k = check_axis(axis, 3)
            det = np.take(det, slice_index(det.shape[k], index), axis=k)
        panels.append((det, percent))
    count = len(panels)
    height, width_px = panels[0][0].shape
    fig, axes = new_figure(1, count, width * count, height / width_px, extra=0.4)
    for ax, (det, percent) in zip(axes[0], panels, strict=True):
        span = max(float(np.max(np.abs(det - 1.0))), 0.05)
        image = ax.imshow(det, cmap=cmap, vmin=1.0 - span, vmax=1.0 + span,
                          interpolation="nearest")
        folds = np.zeros((*det.shape, 4))
        folds[det <= 0] = fold_rgba
        ax.imshow(np.ma.masked_array(folds, mask=np.repeat((det > 0)[..., None], 4, -1)),
                  interpolation="nearest", gid="folds")
        label = f"{percent:.2f}% folding"
        ax.set_title(f"{title}: {label}" if title else label)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.8, label="det J")
    return save_figure(fig, save)
