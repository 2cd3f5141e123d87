"""Register images with a trained model: any array type, any leading axes, any size.

:func:`register` accepts numpy arrays or tensors of shape ``(*spatial)``, ``(C, *spatial)`` or
``(B, C, *spatial)``; the number of spatial axes is the model's (2 or 3), so a 2D model reads
``(H, W)``, ``(C, H, W)`` and ``(B, C, H, W)``. Outputs come back with the input's type, device,
and leading axes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["RegistrationResult", "model_ndim", "register"]


@dataclass
class RegistrationResult:
    """What :func:`register` returns with ``return_time=True``.

    Unpacks as ``moved, disp, seconds_per_pair = result``.

    Attributes:
        moved: the moving image warped onto the fixed grid (the moving input's layout).
        disp: displacement ``(B, ndim, *spatial)`` in voxels, or ``(ndim, *spatial)`` when the
            input had no batch axis.
        seconds_per_pair: wall time of the model call (input transfer, forward pass and, on
            GPU, synchronisation) divided by the number of pairs.
    """

    moved: Any
    disp: Any
    seconds_per_pair: float

    def __iter__(self):
        return iter((self.moved, self.disp, self.seconds_per_pair))


def _config(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config if isinstance(config, dict) else {}


def model_ndim(model: nn.Module) -> int:
    """Number of spatial axes of a model (from ``config["inshape"]`` or ``inshape``)."""
    inshape = _config(model).get("inshape", getattr(model, "inshape", None))
    if inshape is None:
        raise ValueError(
            "model must have an inshape (attribute or config['inshape']) giving its spatial "
            "rank; register() needs it to tell spatial axes from channel and batch axes"
        )
    ndim = len(inshape)
    if ndim not in (2, 3):
        raise ValueError(f"model inshape must have 2 or 3 axes, got {tuple(inshape)}")
    return ndim


def _features(model: nn.Module, key: str) -> int | None:
    value = _config(model).get(key, getattr(model, key, None))
    return int(value) if value is not None else None


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


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def register(
    model: nn.Module,
    moving: Any,
    fixed: Any,
    device: str | torch.device | None = None,
    return_time: bool = False,
) -> tuple[Any, Any] | RegistrationResult:
    """Register ``moving`` to ``fixed`` with a trained model.

    Args:
        model: a registration model (e.g. :class:`voxreg.networks.VxmDense`, or
            :func:`voxreg.checkpoint.load_model`'s result) mapping ``(moving, fixed)`` to
            ``(moved, ..., disp)``; it must know its spatial rank (``inshape``).
        moving, fixed: numpy arrays or tensors, ``(*spatial)``, ``(C, *spatial)`` or
            ``(B, C, *spatial)``, on the same grid (any size: the model handles it); a batch of 1
            on either side is paired with every element of the other. Integer images are
            converted to float without rescaling.
        device: where to run (default: the model's device); the model is moved there.
        return_time: also return the seconds per pair (see :class:`RegistrationResult`).

    Returns:
        ``(moved, disp)`` -- numpy if ``moving`` was numpy (float32 for float32 inputs), else
        tensors on ``moving``'s device. ``moved`` has ``moving``'s leading axes (the larger
        batch when broadcast); ``disp`` is ``(B, ndim, *spatial)``, or ``(ndim, *spatial)``
        when neither input had a batch axis. With ``return_time=True``, a
        :class:`RegistrationResult` that unpacks as ``(moved, disp, seconds_per_pair)``.

    Raises:
        ValueError: shapes that do not fit the model or each other, wrong channel counts,
            NaN or infinite values (the message names the argument).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ndim = model_ndim(model)
    moving_t, moving_np = _as_tensor(moving, "moving")
    fixed_t, _ = _as_tensor(fixed, "fixed")
    out_device = moving_t.device
    src, moving_extra = _standardise(moving_t, "moving", ndim, _features(model, "src_feats"))
    trg, fixed_extra = _standardise(fixed_t, "fixed", ndim, _features(model, "trg_feats"))
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
    batch = src.shape[0]

    run_device = torch.device(device) if device is not None else _model_device(model)
    dtype = next((p.dtype for p in model.parameters()), torch.get_default_dtype())
    was_training = model.training
    model.to(run_device)
    model.eval()
    try:
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)
        tic = time.perf_counter()
        with torch.inference_mode():
            src_d = src.to(run_device, dtype, non_blocking=True).contiguous()
            trg_d = trg.to(run_device, dtype, non_blocking=True).contiguous()
            out = model(src_d, trg_d)
            if not isinstance(out, (tuple, list)) or len(out) < 2:
                raise ValueError("model must return (moved, ..., disp)")
            moved, disp = out[0], out[-1]
            if run_device.type == "cuda":
                torch.cuda.synchronize(run_device)
        seconds = (time.perf_counter() - tic) / batch
    finally:
        model.train(was_training)

    if moving_extra < 2 and batch == 1:
        moved = moved.reshape(moved.shape[1 + (moving_extra == 0):])
    if max(moving_extra, fixed_extra) < 2 and batch == 1:
        disp = disp[0]
    if moving_np:
        out_dtype = moving_t.dtype if moving_t.is_floating_point() else torch.float32
        moved = moved.to("cpu", out_dtype).numpy()
        disp = disp.to("cpu", out_dtype).numpy()
    else:
        moved = moved.to(out_device).clone()
        disp = disp.to(out_device).clone()
    if return_time:
        return RegistrationResult(moved, disp, seconds)
    return moved, disp
