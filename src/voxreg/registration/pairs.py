"""Inputs and outputs of :func:`voxreg.register` in the caller's layout.

Inputs may be numpy arrays or tensors, ``(*spatial)``, ``(C, *spatial)`` or ``(B, C, *spatial)``
(the model's rank tells spatial axes from the others); :func:`make_pair` checks them against the
model and puts them in the ``(B, C, *spatial)`` layout, and :class:`Pair` gives results back with
the input's type, dtype, device and leading axes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from voxreg.registration.model import model_features, model_ndim

__all__ = ["InputRangeWarning", "Pair", "check_intensity_range", "check_model", "make_pair"]


def _as_tensor(value: Any, name: str) -> tuple[Tensor, bool]:
    """Tensor view of ``value`` and whether it came as numpy."""
    if isinstance(value, Tensor):
        return value, False
    if isinstance(value, (np.ndarray, list, tuple)):
        array = np.asarray(value)
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
        ):
            raise ValueError(f"{name} must be a numeric array, got dtype {array.dtype}")
        return torch.from_numpy(np.ascontiguousarray(array)), True
    raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(value).__name__}")


def _standardise(image: Tensor, name: str, ndim: int, feats: int | None) -> tuple[Tensor, int]:
    """``(B, C, *spatial)`` float tensor and the number of leading axes of the input (0, 1, 2)."""
    extra = image.dim() - ndim
    if extra not in (0, 1, 2):
        raise ValueError(
            f"{name} must have shape (*spatial), (C, *spatial) or (B, C, *spatial) with "
            f"{ndim} spatial axes for this {ndim}D model, got {tuple(image.shape)}"
        )
    if any(s == 0 for s in image.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(image.shape)}")
    batched = image.reshape((1,) * (2 - extra) + tuple(image.shape))
    if feats is not None and batched.shape[1] != feats:
        if extra == 0:
            what = f"it has no channel axis (1 channel) but the model expects {feats}"
        else:
            what = f"it has {batched.shape[1]} channels but the model expects {feats}"
        raise ValueError(f"{name} has the wrong channel count: {what}; got {tuple(image.shape)}")
    if not batched.is_floating_point():
        batched = batched.to(torch.get_default_dtype())
    if not torch.isfinite(batched).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return batched, extra


@dataclass
class Pair:
    """Validated inputs: ``(B, C, *spatial)`` tensors and how to give results back.

    Attributes:
        src, trg: moving and fixed ``(B, C, *spatial)`` float tensors (a batch of 1 broadcast).
        moving_extra, fixed_extra: leading axes each input had (0, 1 or 2).
        numpy_out: the moving input was numpy: results go back as numpy, in ``out_dtype``.
        out_device: the moving tensor's device (results go back there).
    """

    src: Tensor
    trg: Tensor
    moving_extra: int
    fixed_extra: int
    numpy_out: bool
    out_dtype: torch.dtype | None
    out_device: torch.device

    @property
    def batch(self) -> int:
        return self.src.shape[0]

    def image(self, value: Tensor, extra: int) -> Any:
        """An image ``(B, C, *spatial)`` with the leading axes of an input with ``extra`` of them."""
        if extra < 2 and self.batch == 1:
            value = value.reshape(value.shape[1 + (extra == 0):])
        return self._convert(value)

    def field(self, value: Tensor) -> Any:
        """A field ``(B, ndim, *spatial)``, without the batch axis when neither input had one."""
        if max(self.moving_extra, self.fixed_extra) < 2 and self.batch == 1:
            value = value[0]
        return self._convert(value)

    def _convert(self, value: Tensor) -> Any:
        value = value.detach()
        if self.numpy_out:
            return value.to("cpu", self.out_dtype).numpy()
        return value.to(self.out_device).clone()


class InputRangeWarning(UserWarning):
    """An image's intensities lie far outside the range the model was trained on."""


def check_intensity_range(model: nn.Module, image: Tensor, name: str) -> None:
    """Warn (:class:`InputRangeWarning`) when the model's file says it was trained on images
    scaled to [0, 1] (``metadata["domain"]["normalize"]``) and ``image`` spans far more: a scan
    in scanner units (0..5000) or 0..255 gives a useless field without it.

    >>> model = nn.Identity()
    >>> model.metadata = {"domain": {"normalize": {"method": "minmax"}}}
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     check_intensity_range(model, torch.full((1, 1, 2, 2), 255.0), "moving")
    >>> caught[0].category.__name__
    'InputRangeWarning'
    """
    meta = getattr(model, "metadata", None)
    domain = meta.get("domain") if isinstance(meta, dict) else None
    method = (domain or {}).get("normalize", {}).get("method") if isinstance(domain, dict) else None
    if method not in ("minmax", "percentile") or image.numel() == 0:
        return
    low, high = float(image.min()), float(image.max())
    if high > 1.5 or low < -0.5:
        warnings.warn(
            f"{name} intensities span [{low:.4g}, {high:.4g}], but the model was trained on images "
            "scaled to [0, 1]: scale them first (voxreg.io.normalize), or use "
            "voxreg.register_files, which brings scans into the model's domain",
            InputRangeWarning, stacklevel=4)


def check_model(model: nn.Module) -> None:
    """Raise a ``TypeError`` naming the type unless ``model`` is a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def make_pair(model: nn.Module, moving: Any, fixed: Any) -> Pair:
    """Validate ``moving`` and ``fixed`` against the model (rank, channels, shapes, finite values)
    and put them in the ``(B, C, *spatial)`` layout.

    >>> model = nn.Identity()
    >>> model.inshape = (4, 4)
    >>> pair = make_pair(model, np.zeros((4, 4), np.float32), np.zeros((2, 1, 4, 4)))
    >>> tuple(pair.src.shape), pair.batch, pair.numpy_out       # moving broadcast to the batch
    ((2, 1, 4, 4), 2, True)
    >>> pair.image(pair.src, pair.moving_extra).shape           # given back in moving's layout
    (2, 1, 4, 4)
    """
    ndim = model_ndim(model)
    moving_t, moving_np = _as_tensor(moving, "moving")
    fixed_t, _ = _as_tensor(fixed, "fixed")
    src, moving_extra = _standardise(moving_t, "moving", ndim, model_features(model, "src_feats"))
    trg, fixed_extra = _standardise(fixed_t, "fixed", ndim, model_features(model, "trg_feats"))
    check_intensity_range(model, src, "moving")
    check_intensity_range(model, trg, "fixed")
    if src.shape[2:] != trg.shape[2:]:
        raise ValueError(
            f"moving and fixed must share a spatial shape, got {tuple(src.shape[2:])} and "
            f"{tuple(trg.shape[2:])}"
        )
    if src.shape[0] != trg.shape[0]:
        if 1 not in (src.shape[0], trg.shape[0]):
            raise ValueError(
                f"moving and fixed must have the same batch size (or one of them 1), got "
                f"{src.shape[0]} and {trg.shape[0]}"
            )
        batch = max(src.shape[0], trg.shape[0])
        src = src.expand(batch, *src.shape[1:])
        trg = trg.expand(batch, *trg.shape[1:])
    out_dtype = (moving_t.dtype if moving_t.is_floating_point() else torch.float32) if moving_np \
        else None
    return Pair(src, trg, moving_extra, fixed_extra, moving_np, out_dtype, moving_t.device)

