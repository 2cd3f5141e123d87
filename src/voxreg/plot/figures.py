"""What every picture of :mod:`voxreg.plot` shares: array checks (numpy or torch in, numpy out),
slicing of 3D volumes, panel layouts, constrained-layout figures without pyplot, and the atomic
PNG output behind every ``save=`` argument.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from matplotlib.figure import Figure

from voxreg._atomic import atomic_path

__all__ = [
    "MAX_LABEL",
    "as_list",
    "check_axis",
    "disp_list",
    "drop_unused",
    "image_2d",
    "imshow_frame",
    "new_figure",
    "panel_layout",
    "per_item",
    "save_figure",
    "slice_index",
    "squeeze_leading",
    "to_numpy",
]


MAX_LABEL = 1 << 20



def to_numpy(value: object, name: str) -> np.ndarray:
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


def squeeze_leading(array: np.ndarray, keep: int) -> np.ndarray:
    """Drop leading axes of size 1 while the array has more than ``keep`` axes."""
    while array.ndim > keep and array.shape[0] == 1:
        array = array[0]
    return array


def check_axis(axis: int, ndim: int, name: str = "axis") -> int:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be an integer in [-{ndim}, {ndim}), got {axis!r}")
    return int(axis) % ndim


def slice_index(size: int, index: int | None, name: str = "index") -> int:
    if index is None:
        return size // 2
    if not isinstance(index, (int, np.integer)) or not -size <= index < size:
        raise ValueError(f"{name} must be an integer in [-{size}, {size}), got {index!r}")
    return int(index) % size


def image_2d(value: object, name: str, axis: int = 0, index: int | None = None) -> np.ndarray:
    """A 2D float image from a 2D image or a 3D volume (sliced along ``axis`` at ``index``)."""
    array = squeeze_leading(to_numpy(value, name), 3)
    if array.ndim == 3:
        axis = check_axis(axis, 3)
        array = np.take(array, slice_index(array.shape[axis], index), axis=axis)
    elif array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2D image (H, W) or a 3D volume (D, H, W), got shape {array.shape}"
        )
    return array


def as_list(value: object) -> list:
    """A single array/tensor becomes a one-element list; lists and tuples are copied."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("expected at least one item")
        return list(value)
    return [value]


def per_item(value: object, count: int, name: str, default: object = None) -> list:
    """Broadcast ``value`` (None, a single item, or a sequence of ``count`` items) to a list."""
    if value is None:
        return [default] * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} must have one entry per image ({count}), got {len(value)}")
        return list(value)
    return [value] * count


def panel_layout(count: int, grid: object) -> tuple[int, int]:
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


def new_figure(rows: int, cols: int, width: float, aspect: float, extra: float = 0.0):
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


def drop_unused(fig: Figure, axes: np.ndarray, used: int) -> list:
    """Remove the cells beyond the first ``used``; return the used axes in reading order."""
    flat = list(axes.ravel())
    for ax in flat[used:]:
        fig.delaxes(ax)
    return flat[:used]


def save_figure(fig: Figure, save: object) -> Figure:
    """Write ``fig`` as a PNG to ``save`` (atomically: a temporary file in the same folder, then
    ``os.replace``; the folder is created) when given; return ``fig``.

    >>> import tempfile, pathlib
    >>> fig, axes = new_figure(1, 1, 2.0, 1.0)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save_figure(fig, pathlib.Path(tmp) / "fig.png")
    ...     sorted(p.name for p in pathlib.Path(tmp).iterdir())
    ['fig.png']
    """
    if save is None:
        return fig
    if not isinstance(save, (str, os.PathLike)):
        raise ValueError(f"save must be a path, got {type(save).__name__}")
    with atomic_path(save, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return fig


def disp_list(disps: object, name: str, ndim: int | None = None) -> list[np.ndarray]:
    """Split displacement(s) into a list of ``(ndim, *spatial)`` float arrays.

    Accepts ``(ndim, *spatial)``, ``(B, ndim, *spatial)`` or a list of these.
    """
    dims = (ndim,) if ndim else (2, 3)
    fields: list[np.ndarray] = []
    for item in as_list(disps):
        array = to_numpy(item, name).astype(np.float64, copy=False)
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


def imshow_frame(ax, shape: tuple[int, int]) -> None:
    """Set ``ax`` to imshow's frame for an ``(H, W)`` image: x right, y (rows) down."""
    height, width = shape
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_aspect("equal")
