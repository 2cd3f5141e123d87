"""Evaluation metrics on numpy arrays (tensors are accepted and converted).

* :func:`dice` / :func:`mean_dice`: overlap of label maps, per label;
  :func:`mean_dice_present`: VoxelMorph's evaluation rule (labels present in both inputs).
* :func:`hausdorff95`: 95th percentile of the symmetric surface distances of one label, in world
  units (mm) given the voxel spacing.
* :func:`jacobian_stats`: folding (% of voxels with ``det(J) <= 0``) and the standard deviation
  of ``log det(J)`` of a displacement field, as reported in the registration literature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from voxreg.transforms import jacobian_determinant

__all__ = ["dice", "hausdorff95", "jacobian_stats", "mean_dice", "mean_dice_present"]


def _array(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise TypeError(f"{name} must be a numeric array")
    return array


def _label_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(a, "labels_a"), _array(b, "labels_b")
    if a.shape != b.shape:
        raise ValueError(f"label maps must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def dice(
    labels_a: Any, labels_b: Any, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Dice overlap ``2 |A ∩ B| / (|A| + |B|)`` for each label.

    Args:
        labels_a, labels_b: integer label maps of the same shape.
        labels: the labels to score; default every non-zero label present in *either* map (a
            label present in only one map scores 0, so a structure the registration lost
            counts against it). A requested label absent from both maps gives ``nan``.

    Returns:
        ``{label: dice}`` in the order of ``labels`` (sorted by default).

    >>> fixed = np.array([[0, 1, 1], [0, 2, 2]])
    >>> moved = np.array([[0, 1, 0], [0, 2, 2]])
    >>> dice(fixed, moved)
    {1: 0.6666666666666666, 2: 1.0}
    >>> dice(fixed, moved, labels=[1, 3])
    {1: 0.6666666666666666, 3: nan}
    """
    a, b = _label_pair(labels_a, labels_b)
    if labels is None:
        labels = [int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v != 0]
    out: dict[int, float] = {}
    for label in labels:
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        out[int(label)] = (2.0 * int(np.logical_and(in_a, in_b).sum()) / total) if total else float("nan")
    return out


def mean_dice(labels_a: Any, labels_b: Any, labels: Iterable[int] | None = None) -> float:
    """Mean of :func:`dice` over the labels (labels absent from both maps are ignored).

    >>> mean_dice(np.array([[0, 1, 1], [0, 2, 2]]), np.array([[0, 1, 0], [0, 2, 2]]))
    0.8333333333333333
    """
    values = [v for v in dice(labels_a, labels_b, labels).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def hausdorff95(
    labels_a: Any,
    labels_b: Any,
    label: int = 1,
    spacing: Sequence[float] | None = None,
    percentile: float = 95.0,
) -> float:
    """95th-percentile Hausdorff distance between the surfaces of one label in two maps.

    The surface of a structure is its voxels with a face neighbour outside it. The distance
    of each surface voxel of A to the nearest surface voxel of B and of each surface voxel of B to
    A (Euclidean distance transforms with the voxel ``spacing``) are pooled, and their
    ``percentile`` is returned (MedPy's ``hd95``; ``percentile=100`` is the Hausdorff distance).

    Args:
        labels_a, labels_b: label maps (or boolean masks with ``label=1``) of the same shape.
        label: the structure.
        spacing: voxel sizes along the array axes (mm); default 1.

    Returns:
        The distance in the units of ``spacing``; ``nan`` if the label is missing from either map.

    >>> a = np.zeros((8, 8), int)
    >>> a[2:5, 2:5] = 1
    >>> b = np.roll(a, 1, axis=1)                        # one voxel along axis 1
    >>> hausdorff95(a, b), hausdorff95(a, b, spacing=(1.0, 2.0))   # voxels, then mm
    (1.0, 2.0)
    """
    a, b = _label_pair(labels_a, labels_b)
    mask_a, mask_b = a == label, b == label
    if spacing is None:
        spacing = (1.0,) * a.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != a.ndim or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must hold {a.ndim} positive values, got {spacing}")
    if not mask_a.any() or not mask_b.any():
        return float("nan")
    # crop to the bounding box of both structures (one voxel of margin): same distances, less work
    coords = np.argwhere(mask_a | mask_b)
    lo = np.maximum(coords.min(0) - 1, 0)
    hi = np.minimum(coords.max(0) + 2, a.shape)
    box = tuple(slice(int(l_), int(h)) for l_, h in zip(lo, hi))
    surf_a, surf_b = _surface(mask_a[box]), _surface(mask_b[box])
    to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surf_a, sampling=spacing)
    distances = np.concatenate([to_b[surf_a], to_a[surf_b]])
    return float(np.percentile(distances, percentile))


def jacobian_stats(disp: Any, mask: Any = None) -> dict[str, float]:
    """Regularity of a displacement field (voxels, ``(ndim, *spatial)`` or ``(1, ndim, *spatial)``).

    Args:
        mask: optional ``(*spatial)`` mask; non-zero voxels are counted.

    Returns:
        ``folding_percent``: percentage of voxels with ``det(J) <= 0``;
        ``sd_log_jac``: standard deviation of ``log det(J)`` over the voxels with ``det(J) > 0``
        (``nan`` if none); ``jac_min``, ``jac_max``, ``jac_mean``: of ``det(J)``. ``J`` is the
        Jacobian of ``x -> x + disp(x)`` by finite differences
        (:func:`voxreg.transforms.jacobian_determinant`).

    >>> jacobian_stats(np.zeros((2, 4, 4)))              # the identity, (ndim, *spatial)
    {'folding_percent': 0.0, 'sd_log_jac': 0.0, 'jac_min': 1.0, 'jac_max': 1.0, 'jac_mean': 1.0}
    """
    field = _array(disp, "disp").astype(np.float64)
    if field.ndim >= 4 and field.shape[0] == 1 and field.shape[1] == field.ndim - 2:
        field = field[0]
    if field.ndim not in (3, 4) or field.shape[0] != field.ndim - 1:
        raise ValueError(f"disp must be (ndim, *spatial) with ndim 2 or 3, got shape {field.shape}")
    det = jacobian_determinant(torch.from_numpy(field)[None])[0].numpy()
    if mask is not None:
        keep = _array(mask, "mask")
        if keep.shape != det.shape:
            raise ValueError(f"mask must have shape {det.shape}, got {keep.shape}")
        det = det[keep != 0]
        if det.size == 0:
            raise ValueError("mask selects no voxel")
    else:
        det = det.ravel()
    positive = det[det > 0]
    return {
        "folding_percent": float(100.0 * np.mean(det <= 0)),
        "sd_log_jac": float(np.std(np.log(positive))) if positive.size else float("nan"),
        "jac_min": float(det.min()),
        "jac_max": float(det.max()),
        "jac_mean": float(det.mean()),
    }


def mean_dice_present(fixed_labels: np.ndarray, moved_labels: np.ndarray,
                      moving_labels: np.ndarray | None = None) -> float:
    """Mean Dice over the non-zero labels present in both the fixed map and the moving map
    (``moving_labels``; the moved map itself when not given), the VoxelMorph evaluation rule.
    A label lost by the warp counts as 0; NaN when no label is shared. One pass over the
    volume (bincount), not one per label.

    >>> fixed = np.array([[0, 1, 1], [0, 2, 2]])
    >>> moved = np.array([[0, 1, 1], [0, 0, 0]])         # label 2 lost by the warp
    >>> mean_dice_present(fixed, moved), mean_dice_present(fixed, moved, moving_labels=fixed)
    (1.0, 0.5)
    """
    fixed_labels = np.asarray(fixed_labels)
    moved_labels = np.asarray(moved_labels)
    source = moved_labels if moving_labels is None else np.asarray(moving_labels)
    labels = np.intersect1d(np.unique(fixed_labels), np.unique(source))
    labels = labels[labels != 0]
    if labels.size == 0:
        return float("nan")
    size = int(max(fixed_labels.max(), moved_labels.max(), labels.max())) + 1
    a = fixed_labels.ravel().astype(np.int64)
    b = moved_labels.ravel().astype(np.int64)
    count_a = np.bincount(a, minlength=size)
    count_b = np.bincount(b, minlength=size)
    both = np.bincount(a[a == b], minlength=size)
    total = count_a[labels] + count_b[labels]
    return float(np.mean(2.0 * both[labels] / total))
