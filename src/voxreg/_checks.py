"""Input validation shared by the public functions.

Every check raises :class:`ValueError` (or :class:`TypeError` for a wrong type) with a message
that names the argument and says what was expected, so that users never see a traceback from
deep inside torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def as_tensor(value: object, name: str) -> Tensor:
    """Return ``value`` if it is a tensor; raise a clear error otherwise."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_image(image: Tensor, name: str = "image") -> int:
    """Validate an image batch ``(B, C, *spatial)`` with 2 or 3 spatial axes; return ``ndim``."""
    as_tensor(image, name)
    if image.dim() not in (4, 5):
        raise ValueError(
            f"{name} must have shape (B, C, H, W) or (B, C, D, H, W), got {tuple(image.shape)}"
        )
    if any(s == 0 for s in image.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(image.shape)}")
    return image.dim() - 2


def check_disp(disp: Tensor, name: str = "disp", ndim: int | None = None) -> int:
    """Validate a displacement field ``(B, ndim, *spatial)``; return ``ndim``."""
    as_tensor(disp, name)
    if disp.dim() not in (4, 5) or disp.shape[1] != disp.dim() - 2:
        raise ValueError(
            f"{name} must have shape (B, 2, H, W) or (B, 3, D, H, W) (one channel per spatial "
            f"axis), got {tuple(disp.shape)}"
        )
    if ndim is not None and disp.dim() - 2 != ndim:
        raise ValueError(
            f"{name} must be a {ndim}D field of shape (B, {ndim}, *spatial), got {tuple(disp.shape)}"
        )
    if not disp.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {disp.dtype}")
    return disp.dim() - 2


def is_affine(transform: Tensor) -> bool:
    """True when ``transform`` has the rank of an affine matrix (``(B, n, n+1)`` or ``(n, n+1)``)."""
    return transform.dim() in (2, 3)


def check_affine(affine: Tensor, ndim: int | None = None, name: str = "affine") -> Tensor:
    """Validate an affine matrix and return it as ``(B, ndim, ndim + 1)``.

    Accepts ``(ndim, ndim+1)``, ``(ndim+1, ndim+1)`` or the same with a leading batch axis. A square
    matrix must have a last row ``[0, ..., 0, 1]``.
    """
    as_tensor(affine, name)
    if affine.dim() == 2:
        affine = affine.unsqueeze(0)
    expected = (
        f"(B, {ndim}, {ndim + 1}) or (B, {ndim + 1}, {ndim + 1})"
        if ndim is not None
        else "(B, 2, 3), (B, 3, 3), (B, 3, 4) or (B, 4, 4)"
    )
    if affine.dim() != 3:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(affine.shape)}")
    rows, cols = affine.shape[-2:]
    n = cols - 1
    if n not in (2, 3) or rows not in (n, n + 1) or (ndim is not None and n != ndim):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(affine.shape)}")
    if not affine.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {affine.dtype}")
    if rows == n + 1:
        last = affine[:, n]
        target = torch.zeros_like(last)
        target[:, n] = 1
        if not torch.allclose(last, target, atol=1e-6):
            raise ValueError(
                f"{name} is square but its last row is not [0, ..., 0, 1]: not an affine matrix"
            )
        affine = affine[:, :n]
    return affine


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise if ``tensor`` holds NaN or infinity.

    A single reduction (the sum is non-finite when any element is) keeps this cheap on large
    volumes; only when it fails is the exact test made, to avoid a false alarm from overflow.
    """
    if not tensor.is_floating_point():
        return
    if not torch.isfinite(tensor.sum()):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or infinite values")


def check_batch(batch_a: int, batch_b: int, name_a: str, name_b: str) -> int:
    """Return the broadcast batch size of two batch sizes (equal, or one of them 1)."""
    if batch_a != batch_b and 1 not in (batch_a, batch_b):
        raise ValueError(
            f"batch sizes of {name_a} ({batch_a}) and {name_b} ({batch_b}) must match or one be 1"
        )
    return max(batch_a, batch_b)


def check_interp(interp: str) -> str:
    if interp not in ("linear", "nearest", "label"):
        raise ValueError(f"interp must be 'linear', 'nearest' or 'label', got {interp!r}")
    return interp


def check_shape(shape: Sequence[int], name: str = "shape") -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a sequence of 2 or 3 positive integers, got {shape!r}"
        ) from None
    if len(shape) not in (2, 3) or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be a sequence of 2 or 3 positive integers, got {shape!r}")
    return shape


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` when it is an integer (not a bool) ``>= minimum``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def non_negative(value: Any, name: str) -> float:
    """``value`` as a ``float`` when it is a finite number ``>= 0``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
