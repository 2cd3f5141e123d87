"""Pictures of label maps: fixed colours per label value (:func:`label_colormap`) and a label map
drawn over an image (:func:`overlay`).
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from voxreg.plot.figures import (
    MAX_LABEL,
    image_2d,
    new_figure,
    save_figure,
    squeeze_leading,
    to_numpy,
)

__all__ = ["label_colormap", "overlay"]


def _label_values(labels: object, name: str) -> np.ndarray:
    array = to_numpy(labels, name)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"{name} must hold integer label values")
    if array.dtype.kind == "b":
        array = array.astype(np.int64)
    if np.any(array < 0):
        raise ValueError(f"{name} must hold non-negative label values")
    if array.max() >= MAX_LABEL:
        raise ValueError(f"{name} values must be below {MAX_LABEL}, got {array.max()}")
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
        if not 1 <= count <= MAX_LABEL:
            raise ValueError(f"labels_or_n must be in [1, {MAX_LABEL}], got {count}")
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
    image_array = squeeze_leading(to_numpy(image, "image"), 3)
    label_array = squeeze_leading(to_numpy(labels, "labels"), 3)
    if image_array.shape != label_array.shape:
        raise ValueError(
            f"labels must have the image's shape {image_array.shape}, got {label_array.shape}"
        )
    picture = image_2d(image_array, "image", axis, index)
    label_slice = image_2d(label_array, "labels", axis, index)
    values = _label_values(label_slice, "labels")
    cmap = label_colormap(max(int(values.max()) + 1, 1), seed=seed)
    rgba = np.asarray(cmap.colors)[values]
    rgba[..., 3] *= alpha
    if ax is None:
        fig, axes = new_figure(1, 1, width, picture.shape[0] / picture.shape[1], extra=0.35)
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
    return save_figure(fig, save)
