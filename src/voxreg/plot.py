"""Pictures of images, displacement fields, label maps and training curves.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (so nothing is
registered with pyplot's figure manager and nothing leaks; show it in a notebook by leaving it as
the cell's value, or call ``fig.savefig``). Every function takes ``save=PATH`` to also write a PNG
(atomically: a temporary file in the same folder, then ``os.replace``; the folder is created).

Inputs may be numpy arrays or torch tensors (detached and moved to the CPU here). Images follow
voxreg's conventions: a 2D image is ``(H, W)``; a 3D volume ``(D, H, W)`` is shown by a slice
(``axis``/``index``, the middle one by default). Leading axes of size 1 (``(1, 1, H, W)`` from a
``(B, C, *spatial)`` batch) are dropped. A displacement is ``(ndim, *spatial)`` or
``(B, ndim, *spatial)`` in voxels, channel ``k`` along array axis ``k`` (``ij`` indexing), and
warping pulls back: ``moved(x) = moving(x + disp(x))``. Pictures use ``imshow``'s frame
(``origin="upper"``): column index to the right, row index downwards.

Bad input raises :class:`ValueError` naming the argument.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from voxreg._atomic import atomic_path
from voxreg.transforms import jacobian_determinant

__all__ = [
    "flow",
    "grid",
    "history",
    "jacobian",
    "label_colormap",
    "overlay",
    "slices",
    "volume_slices",
]

_MAX_LABEL = 1 << 20


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _to_numpy(value: object, name: str) -> np.ndarray:
    """Numpy copy/view of an array-like (torch tensors detached and moved to the CPU)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        array = value.numpy()
    else:
        try:
            array = np.asarray(value)
        except Exception as err:  # ragged lists and the like
            raise ValueError(f"{name} must be an array or a tensor, got {type(value).__name__}") from err
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    return array


def _squeeze_leading(array: np.ndarray, keep: int) -> np.ndarray:
    """Drop leading axes of size 1 while the array has more than ``keep`` axes."""
    while array.ndim > keep and array.shape[0] == 1:
        array = array[0]
    return array


def _check_axis(axis: int, ndim: int, name: str = "axis") -> int:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be an integer in [-{ndim}, {ndim}), got {axis!r}")
    return int(axis) % ndim


def _slice_index(size: int, index: int | None, name: str = "index") -> int:
    if index is None:
        return size // 2
    if not isinstance(index, (int, np.integer)) or not -size <= index < size:
        raise ValueError(f"{name} must be an integer in [-{size}, {size}), got {index!r}")
    return int(index) % size


def _image_2d(value: object, name: str, axis: int = 0, index: int | None = None) -> np.ndarray:
    """A 2D float image from a 2D image or a 3D volume (sliced along ``axis`` at ``index``)."""
    array = _squeeze_leading(_to_numpy(value, name), 3)
    if array.ndim == 3:
        axis = _check_axis(axis, 3)
        array = np.take(array, _slice_index(array.shape[axis], index), axis=axis)
    elif array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2D image (H, W) or a 3D volume (D, H, W), got shape {array.shape}"
        )
    return array


def _as_list(value: object) -> list:
    """A single array/tensor becomes a one-element list; lists and tuples are copied."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("expected at least one item")
        return list(value)
    return [value]


def _per_item(value: object, count: int, name: str, default: object = None) -> list:
    """Broadcast ``value`` (None, a single item, or a sequence of ``count`` items) to a list."""
    if value is None:
        return [default] * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} must have one entry per image ({count}), got {len(value)}")
        return list(value)
    return [value] * count


def _layout(count: int, grid: object) -> tuple[int, int]:
    """Rows and columns for ``count`` panels: one row, a near-square grid (``True``) or given."""
    if grid is None or grid is False:
        return 1, count
    if grid is True:
        rows = int(math.floor(math.sqrt(count)))
        cols = int(math.ceil(count / rows))
        return rows, cols
    try:
        rows, cols = (int(g) for g in grid)  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise ValueError(f"grid must be None, True or (rows, cols), got {grid!r}") from err
    if rows < 1 or cols < 1 or rows * cols < count:
        raise ValueError(f"grid {(rows, cols)} has fewer than {count} cells")
    return rows, cols


def _new_figure(rows: int, cols: int, width: float, aspect: float, extra: float = 0.0):
    """A constrained-layout figure of ``rows x cols`` axes (a 2D array of Axes).

    ``aspect`` is height / width of one panel; ``extra`` inches are added per row (titles).
    """
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive number of inches, got {width!r}")
    height = rows * (width / cols * aspect + extra)
    height = min(max(height, 1.5), 6 * width)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _drop_unused(fig: Figure, axes: np.ndarray, used: int) -> list:
    """Remove the cells beyond the first ``used``; return the used axes in reading order."""
    flat = list(axes.ravel())
    for ax in flat[used:]:
        fig.delaxes(ax)
    return flat[:used]


def _save(fig: Figure, save: object) -> Figure:
    """Write ``fig`` as a PNG to ``save`` (atomically) when given; return ``fig``."""
    if save is None:
        return fig
    if not isinstance(save, (str, os.PathLike)):
        raise ValueError(f"save must be a path, got {type(save).__name__}")
    with atomic_path(save, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return fig


def _disp_list(disps: object, name: str, ndim: int | None = None) -> list[np.ndarray]:
    """Split displacement(s) into a list of ``(ndim, *spatial)`` float arrays.

    Accepts ``(ndim, *spatial)``, ``(B, ndim, *spatial)`` or a list of these.
    """
    dims = (ndim,) if ndim else (2, 3)
    fields: list[np.ndarray] = []
    for item in _as_list(disps):
        array = _to_numpy(item, name).astype(np.float64, copy=False)
        for n in dims:
            if array.ndim == n + 1 and array.shape[0] == n:
                fields.append(array)
                break
            if array.ndim == n + 2 and array.shape[1] == n:
                fields.extend(array)
                break
        else:
            want = (
                "(2, H, W) or (B, 2, H, W)" if ndim == 2
                else "(ndim, *spatial) or (B, ndim, *spatial) with ndim 2 or 3"
            )
            raise ValueError(
                f"{name} must be displacement fields {want} (one channel per spatial axis), "
                f"got shape {array.shape}"
            )
    for field in fields:
        if not np.all(np.isfinite(field)):
            raise ValueError(f"{name} must be finite")
    return fields


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


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
    items = _as_list(images)
    arrays = [_image_2d(item, "images", axis, index) for item in items]
    count = len(arrays)
    if isinstance(titles, str):
        raise ValueError("titles must be a sequence of strings, one per image")
    titles_ = _per_item(titles, count, "titles")
    cmaps_ = _per_item(cmaps, count, "cmaps", "gray")
    args_ = _per_item(imshow_args, count, "imshow_args", {})
    rows, cols = _layout(count, grid)
    height, width_px = arrays[0].shape
    fig, axes = _new_figure(rows, cols, width, height / width_px, extra=0.35)
    used = _drop_unused(fig, axes, count)
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
    return _save(fig, save)


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
    for item in _as_list(volumes):
        array = _squeeze_leading(_to_numpy(item, "volumes"), 3)
        if array.ndim != 3:
            raise ValueError(f"volumes must be 3D volumes (D, H, W), got shape {array.shape}")
        arrays.append(array.astype(np.float64, copy=False))
    if isinstance(titles, str):
        raise ValueError("titles must be a sequence of strings, one per volume")
    titles_ = _per_item(titles, len(arrays), "titles")
    if indices is None:
        indices = (None, None, None)
    if isinstance(indices, (str, bytes)) or len(indices) != 3:
        raise ValueError(f"indices must be three slice indices (or None), got {indices!r}")
    fig, axes = _new_figure(len(arrays), 3, width, 1.0, extra=0.35)
    for row, (array, title) in enumerate(zip(arrays, titles_, strict=True)):
        finite = array[np.isfinite(array)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        image = None
        for k in range(3):
            i = _slice_index(array.shape[k], indices[k], "indices")
            ax = axes[row, k]
            image = ax.imshow(np.take(array, i, axis=k), cmap=cmap, vmin=vmin, vmax=vmax,
                              interpolation="nearest")
            label = f"axis {k} [{i}]"
            ax.set_title(f"{title} {label}" if title is not None else label)
            ax.axis("off")
        if do_colorbars:
            fig.colorbar(image, ax=list(axes[row]), shrink=0.8)
    return _save(fig, save)


# --------------------------------------------------------------------------------------------
# displacement fields
# --------------------------------------------------------------------------------------------


def _frame(ax, shape: tuple[int, int]) -> None:
    """Set ``ax`` to imshow's frame for an ``(H, W)`` image: x right, y (rows) down."""
    height, width = shape
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_aspect("equal")


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
    fields = _disp_list(disps, "disps", ndim=2)
    count = len(fields)
    if isinstance(titles, str):
        raise ValueError("titles must be a sequence of strings, one per field")
    titles_ = _per_item(titles, count, "titles")
    if background is None:
        backgrounds = [None] * count
    elif isinstance(background, (list, tuple)):
        backgrounds = [_image_2d(b, "background") for b in _per_item(background, count, "background")]
    else:
        backgrounds = [_image_2d(background, "background")] * count
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

    rows, cols = _layout(count, grid)
    height, width_px = fields[0].shape[1:]
    fig, axes = _new_figure(rows, cols, width, height / width_px, extra=0.35)
    used = _drop_unused(fig, axes, count)
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
        _frame(ax, shape)
        if title is not None:
            ax.set_title(str(title))
        if not show_axis:
            ax.set_xticks([])
            ax.set_yticks([])
        if do_colorbars:
            fig.colorbar(quiver, ax=ax, shrink=0.8, label="|disp| (voxels)")
    return _save(fig, save)


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
    fields = _disp_list(disp, "disp", ndim=2)
    if len(fields) != 1:
        raise ValueError(f"disp must be a single field (2, H, W), got a batch of {len(fields)}")
    field = fields[0]
    shape = field.shape[1:]
    if not isinstance(spacing, (int, np.integer)) or spacing < 1:
        raise ValueError(f"spacing must be a positive integer, got {spacing!r}")
    back = None if background is None else _image_2d(background, "background")
    if back is not None and back.shape != shape:
        raise ValueError(f"background must have the field's shape {shape}, got {back.shape}")
    if ax is None:
        fig, axes = _new_figure(1, 1, width, shape[0] / shape[1], extra=0.35)
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
    _frame(ax, shape)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(str(title))
    return _save(fig, save)


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
    fields = _disp_list(disp, "disp")
    fold_rgba = mcolors.to_rgba(fold_color)
    panels = []
    for field in fields:
        det = jacobian_determinant(torch.from_numpy(np.ascontiguousarray(field))[None])[0].numpy()
        percent = 100.0 * float(np.mean(det <= 0))
        if det.ndim == 3:
            k = _check_axis(axis, 3)
            det = np.take(det, _slice_index(det.shape[k], index), axis=k)
        panels.append((det, percent))
    count = len(panels)
    height, width_px = panels[0][0].shape
    fig, axes = _new_figure(1, count, width * count, height / width_px, extra=0.4)
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
    return _save(fig, save)


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


def _label_values(labels: object, name: str) -> np.ndarray:
    array = _to_numpy(labels, name)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"{name} must hold integer label values")
    if array.dtype.kind == "b":
        array = array.astype(np.int64)
    if np.any(array < 0):
        raise ValueError(f"{name} must hold non-negative label values")
    if array.max() >= _MAX_LABEL:
        raise ValueError(f"{name} values must be below {_MAX_LABEL}, got {array.max()}")
    return array.astype(np.int64)


def label_colormap(labels_or_n: object, seed: int = 0) -> mcolors.ListedColormap:
    """A colormap for label maps: random but fixed colours per label value, label 0 transparent.

    The colour of label ``v`` depends only on ``v`` and ``seed`` (not on which other labels are
    present), so the same label has the same colour in every picture.

    Args:
        labels_or_n: a number of labels ``n`` (values ``0 .. n-1``) or a label map (array or
            tensor of non-negative integers; ``n = max + 1``).
        seed: seed of the colours.

    Returns:
        A ``ListedColormap`` of ``n`` RGBA colours, entry ``v`` for label ``v``: index it with
        ``cmap(labels)`` on integer labels, or use ``vmin=-0.5, vmax=n-0.5`` with imshow.
    """
    if isinstance(labels_or_n, (int, np.integer)) and not isinstance(labels_or_n, bool):
        count = int(labels_or_n)
        if not 1 <= count <= _MAX_LABEL:
            raise ValueError(f"labels_or_n must be in [1, {_MAX_LABEL}], got {count}")
    else:
        count = int(_label_values(labels_or_n, "labels_or_n").max()) + 1
    rng = np.random.default_rng(seed)
    hsv = rng.uniform(size=(count, 3))  # drawn in order: row v does not depend on count
    hsv[:, 1] = 0.55 + 0.45 * hsv[:, 1]
    hsv[:, 2] = 0.7 + 0.3 * hsv[:, 2]
    rgba = np.ones((count, 4))
    rgba[:, :3] = mcolors.hsv_to_rgb(hsv)
    rgba[0] = (0.0, 0.0, 0.0, 0.0)
    return mcolors.ListedColormap(rgba, name="labels")


def overlay(
    image: object,
    labels: object,
    alpha: float = 0.4,
    seed: int = 0,
    title: str | None = None,
    axis: int = 0,
    index: int | None = None,
    ax: object = None,
    width: float = 6.0,
    save: str | os.PathLike | None = None,
) -> Figure:
    """A label map drawn over an image (e.g. a warped segmentation over the fixed image).

    Labels get :func:`label_colormap` colours (fixed per label value and ``seed``), label 0 is
    transparent, the others are blended with opacity ``alpha``.

    Args:
        image: 2D image or 3D volume (sliced along ``axis`` at ``index``, the middle by default).
        labels: integer label map of the same shape (float maps with integer values are fine).
        alpha: opacity of the labels, in [0, 1].
        seed: colour seed.
        title: axes title.
        axis, index: slicing of 3D inputs (the same for both).
        ax: draw into this axes instead of a new figure.
        width: figure width in inches (new figures only).
        save: write a PNG there.
    """
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    image_array = _squeeze_leading(_to_numpy(image, "image"), 3)
    label_array = _squeeze_leading(_to_numpy(labels, "labels"), 3)
    if image_array.shape != label_array.shape:
        raise ValueError(
            f"labels must have the image's shape {image_array.shape}, got {label_array.shape}"
        )
    picture = _image_2d(image_array, "image", axis, index)
    label_slice = _image_2d(label_array, "labels", axis, index)
    values = _label_values(label_slice, "labels")
    cmap = label_colormap(max(int(values.max()) + 1, 1), seed=seed)
    rgba = np.asarray(cmap.colors)[values]
    rgba[..., 3] *= alpha
    if ax is None:
        fig, axes = _new_figure(1, 1, width, picture.shape[0] / picture.shape[1], extra=0.35)
        ax = axes[0, 0]
    else:
        fig = getattr(ax, "figure", None)
        if fig is None or not hasattr(ax, "imshow"):
            raise ValueError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    ax.imshow(picture, cmap="gray", interpolation="nearest")
    ax.imshow(rgba, interpolation="nearest", gid="labels")
    ax.axis("off")
    if title is not None:
        ax.set_title(str(title))
    return _save(fig, save)


# --------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------


def _number(text: object) -> float | None:
    """A float from a CSV cell or a value (empty -> nan); None when it is not a number."""
    if text is None:
        return math.nan
    if isinstance(text, torch.Tensor):
        text = text.detach().cpu().item() if text.numel() == 1 else text
    if isinstance(text, str):
        text = text.strip()
        if text == "":
            return math.nan
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _columns(rows: Sequence[Mapping], name: str) -> dict[str, list[float]]:
    """Numeric columns of a list of row mappings (missing/empty -> nan; text columns dropped)."""
    keys: list[str] = []
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"{name} rows must be mappings, got {type(row).__name__}")
        keys.extend(k for k in row if k not in keys)
    columns: dict[str, list[float]] = {}
    for key in keys:
        values = [_number(row.get(key)) for row in rows]
        if all(v is not None for v in values):
            columns[str(key)] = values  # type: ignore[assignment]
    return columns


def _read_history(history: object) -> dict[str, list[float]]:
    name = "history"
    if isinstance(history, (str, os.PathLike)):
        path = Path(history)
        if not path.is_file():
            raise ValueError(f"history file not found: {path}")
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        columns = _columns(rows, name)
    elif isinstance(history, Mapping):
        columns = {}
        for key, values in history.items():
            if isinstance(values, (torch.Tensor, np.ndarray)):
                values = _to_numpy(values, f"history[{key!r}]").ravel().tolist()
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(f"history[{key!r}] must be a sequence of numbers")
            numbers = [_number(v) for v in values]
            if any(v is None for v in numbers):
                raise ValueError(f"history[{key!r}] must hold numbers")
            columns[str(key)] = numbers  # type: ignore[assignment]
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        columns = _columns(list(history), name)
    else:
        raise ValueError(
            "history must be a dict of lists, a list of dicts or a CSV path, "
            f"got {type(history).__name__}"
        )
    if not columns or all(len(v) == 0 for v in columns.values()):
        raise ValueError("history holds no numeric column")
    return columns


def history(
    history: object,
    log: bool = False,
    keys: Sequence[str] | None = None,
    title: str | None = None,
    width: float = 7.0,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Training curves: one labelled line per term.

    Args:
        history: a dict of lists (``{"loss": [...], "sim": [...]}``), a list of dicts (one per
            epoch, as a training loop logs them) or the path of a CSV file with a header row
            (one column per term). An ``epoch`` column/key (also ``step`` or ``iteration``),
            if present, gives the x axis; otherwise x is 0, 1, 2, ... Text columns are ignored,
            empty cells are gaps.
        log: logarithmic y axis.
        keys: the terms to draw (default: every numeric column but the x one).
        title: axes title.
        width: figure width in inches.
        save: write a PNG there.

    Returns:
        The figure, with one axes holding one line per term (labelled, with a legend).
    """
    columns = _read_history(history)
    x_key = next((k for k in ("epoch", "step", "iteration") if k in columns), None)
    x_values = columns.get(x_key) if x_key else None
    terms = [k for k in columns if k != x_key]
    if keys is not None:
        if isinstance(keys, str):
            keys = [keys]
        missing = [k for k in keys if k not in terms]
        if missing:
            raise ValueError(f"keys {missing} not in history (terms: {terms})")
        terms = list(keys)
    if not terms:
        raise ValueError("history holds no term to plot besides the x axis")
    fig, axes = _new_figure(1, 1, width, 0.6)
    ax = axes[0, 0]
    for key in terms:
        values = np.asarray(columns[key], dtype=np.float64)
        if x_values is not None:
            if len(x_values) != len(values):
                raise ValueError(
                    f"history[{key!r}] has {len(values)} values but {x_key!r} has {len(x_values)}"
                )
            xs = np.asarray(x_values, dtype=np.float64)
        else:
            xs = np.arange(len(values), dtype=np.float64)
        ax.plot(xs, values, label=key, marker="." if len(values) < 30 else None)
    ax.set_xlabel(x_key or "epoch")
    ax.set_ylabel("value")
    if log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title is not None:
        ax.set_title(str(title))
    return _save(fig, save)
