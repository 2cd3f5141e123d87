"""Register images with a trained model: any array type, any leading axes, any size.

:func:`register` accepts numpy arrays or tensors of shape ``(*spatial)``, ``(C, *spatial)`` or
``(B, C, *spatial)``; the number of spatial axes is the model's (2 or 3), so a 2D model reads
``(H, W)``, ``(C, H, W)`` and ``(B, C, H, W)``. Outputs come back with the input's type, device,
and leading axes.

Beyond the forward pass:

* **Inverse and bidirectional outputs** (``register(..., inverse=True, moved_fixed=True)``): the
  inverse displacement (on the moving grid, mapping moving voxels to fixed voxels, so that
  ``compose(disp, inverse_disp)`` is about zero) and the fixed image warped onto the moving grid.
  For a diffeomorphic model (``int_steps > 0``) the inverse is ``exp(-velocity)``, integrated
  exactly as the model integrates its own field (conventions rules 7 and 8); for a plain
  displacement model it is the fixed-point inverse of :func:`voxreg.transforms.invert`, which
  is approximate (and not defined where the field folds), so a :class:`InverseApproximationWarning`
  says so with the residual.
* **Instance-specific optimisation** (:func:`finetune`): starting from the network's prediction,
  a few steps of Adam on this pair alone with the image loss and the smoothness penalty.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from voxreg import losses as L
from voxreg import transforms as T

__all__ = [
    "DEFAULT_FINETUNE_STEPS",
    "FinetuneResult",
    "InverseApproximationWarning",
    "RegistrationResult",
    "finetune",
    "loss_settings",
    "model_ndim",
    "register",
]

#: default (largest) number of :func:`finetune` steps, also what ``voxreg register --finetune``
#: without a number uses. ``benchmarks/bench_finetune.py`` (one CPU thread): on 20 2D IXI
#: validation pairs Dice goes 0.603 -> 0.626 / 0.628 / 0.628 / 0.628 after 25 / 50 / 100 / 200
#: field steps (the early stop ends at about 80 steps); on 3 3D pairs 0.602 -> 0.634 / 0.638 /
#: 0.643 / 0.648, at about 0.2 s a step. 100 steps keep all of the 2D gain and 90 % of the 3D
#: gain of 200 steps, for half the time.
DEFAULT_FINETUNE_STEPS = 100
#: default Adam learning rate of :func:`finetune` per optimised quantity (voxels per step for a
#: field; a learning rate for network weights).
DEFAULT_LR = {"field": 0.1, "weights": 1e-4}


class InverseApproximationWarning(UserWarning):
    """The inverse of a plain displacement model is a numerical approximation (fixed point)."""


@dataclass
class RegistrationResult:
    """What :func:`register` returns with ``return_time=True`` (or when ``inverse`` /
    ``moved_fixed`` are asked for).

    Unpacks as ``moved, disp, seconds_per_pair = result``.

    Attributes:
        moved: the moving image warped onto the fixed grid (the moving input's layout).
        disp: displacement ``(B, ndim, *spatial)`` in voxels, or ``(ndim, *spatial)`` when the
            input had no batch axis.
        seconds_per_pair: wall time of the model call (input transfer, forward pass and, on
            GPU, synchronisation) divided by the number of pairs; for :func:`finetune` the whole
            optimisation included.
        inverse_disp: with ``inverse=True`` (or ``moved_fixed=True``): the inverse displacement,
            laid out like ``disp``; it lives on the moving grid and pulls the fixed image back onto
            it (``moved_fixed(y) = fixed(y + inverse_disp(y))``). ``None`` otherwise.
        moved_fixed: with ``moved_fixed=True``: the fixed image warped onto the moving grid by
            ``inverse_disp`` (the fixed input's layout). ``None`` otherwise.
        inverse_residual: with the inverse: mean over pairs and voxels of the norm (voxels) of
            ``compose(disp, inverse_disp)``, i.e. of ``inverse(y) + disp(y + inverse(y))``,
            which is zero for an exact inverse.
        inverse_exact: True when the inverse is ``exp(-velocity)`` (diffeomorphic model), False
            for the fixed-point approximation; ``None`` without an inverse.
    """

    moved: Any
    disp: Any
    seconds_per_pair: float
    inverse_disp: Any = None
    moved_fixed: Any = None
    inverse_residual: float | None = None
    inverse_exact: bool | None = None

    def __iter__(self):
        return iter((self.moved, self.disp, self.seconds_per_pair))


@dataclass
class FinetuneResult(RegistrationResult):
    """What :func:`finetune` returns: a :class:`RegistrationResult` (it unpacks the same way) of
    the refined registration, plus the optimisation's record.

    Attributes:
        loss_history: total loss (image loss + ``lambda_`` * smoothness) of each step, the first
            entry being the network's prediction; the returned field is the one with the lowest.
        initial_loss: the loss of the network's prediction (``loss_history[0]``).
        final_loss: the loss of the returned registration (the lowest seen).
        steps: optimisation steps taken (fewer than asked when it stopped early).
        stopped_early: True when the loss stopped improving before ``steps``.
        optimized: ``"field"`` or ``"weights"``.
        image_loss, lambda_: the loss that was optimised.
    """

    loss_history: list[float] = field(default_factory=list)
    initial_loss: float = math.nan
    final_loss: float = math.nan
    steps: int = 0
    stopped_early: bool = False
    optimized: str = "field"
    image_loss: str = "mse"
    lambda_: float = 0.0


# --------------------------------------------------------------------------------------------
# model introspection
# --------------------------------------------------------------------------------------------


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


def _accepts(model: nn.Module, keyword: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _int_steps(model: nn.Module) -> int:
    value = _config(model).get("int_steps", getattr(model, "int_steps", 0))
    return int(value or 0)


def _is_diffeomorphic(model: nn.Module) -> bool:
    """A velocity model whose forward can return its pre-integration field."""
    return _int_steps(model) > 0 and _accepts(model, "return_velocity")


_IMAGE_LOSS_NAMES = {
    "mse": "mse", "ncc": "ncc", "mi": "mi", "mutual_information": "mi",
    "mutualinformation": "mi",
}


def _image_loss_name(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    key = value.strip().lower().replace("-", "_").split(" ")[0]
    return _IMAGE_LOSS_NAMES.get(key)


def _is_smoothness(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().replace("-", "_").split(" ")[0] in (
        "grad", "l2", "l1", "grad_l2", "grad_l1")


def loss_settings(model: nn.Module) -> tuple[str, float]:
    """The image loss name (``"mse"``, ``"ncc"`` or ``"mi"``) and the smoothness weight a model
    was trained with, read from its metadata (``image_loss`` / ``lambda`` as ``voxreg train``
    stores them, ``losses`` / ``smooth_lambda``, or the trainer's ``training`` record); ``("mse",
    0.01)`` -- VoxelMorph's defaults -- for what the metadata does not say."""
    meta = getattr(model, "metadata", None)
    meta = meta if isinstance(meta, dict) else {}
    records = [meta] + [meta[k] for k in ("training", "training_summary")
                        if isinstance(meta.get(k), dict)]
    image_loss = _image_loss_name(meta.get("image_loss"))
    lambda_: float | None = None
    for key in ("lambda", "smooth_lambda"):
        if isinstance(meta.get(key), (int, float)) and not isinstance(meta.get(key), bool):
            lambda_ = float(meta[key])
            break
    for record in records:
        names = record.get("losses")
        if not isinstance(names, list) or not names:
            continue
        if image_loss is None:
            image_loss = _image_loss_name(names[0])
        weights = record.get("loss_weights")
        if lambda_ is None and isinstance(weights, list) and len(weights) == len(names):
            for name, weight in zip(names, weights):
                if _is_smoothness(name) and isinstance(weight, (int, float)):
                    lambda_ = float(weight)
                    break
    return image_loss or "mse", 0.01 if lambda_ is None else lambda_


# --------------------------------------------------------------------------------------------
# inputs and outputs in the caller's layout
# --------------------------------------------------------------------------------------------


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


@dataclass
class _Pair:
    """Validated inputs: ``(B, C, *spatial)`` tensors and how to give results back."""

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


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _pair(model: nn.Module, moving: Any, fixed: Any) -> _Pair:
    ndim = model_ndim(model)
    moving_t, moving_np = _as_tensor(moving, "moving")
    fixed_t, _ = _as_tensor(fixed, "fixed")
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
    out_dtype = (moving_t.dtype if moving_t.is_floating_point() else torch.float32) if moving_np \
        else None
    return _Pair(src, trg, moving_extra, fixed_extra, moving_np, out_dtype, moving_t.device)


# --------------------------------------------------------------------------------------------
# prediction and inverse
# --------------------------------------------------------------------------------------------


def _predict(model: nn.Module, src: Tensor, trg: Tensor, want_velocity: bool
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(moved, disp, velocity or None)`` of a model call (no gradients are set up here)."""
    if want_velocity:
        kwargs: dict[str, Any] = {"return_velocity": True}
        if _accepts(model, "registration"):
            kwargs["registration"] = True
        out = model(src, trg, **kwargs)
        if not isinstance(out, (tuple, list)) or len(out) < 3:
            raise ValueError("model must return (moved, ..., disp, velocity) with return_velocity=True")
        return out[0], out[-2], out[-1]
    out = model(src, trg)
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise ValueError("model must return (moved, ..., disp)")
    return out[0], out[-1], None


def _velocity_to_disp(velocity: Tensor, steps: int, shape: tuple[int, ...]) -> Tensor:
    """``exp(velocity)`` on the grid ``shape``: the model's own recipe (integrate on the
    velocity's grid, then resize), written with the public transforms."""
    disp = T.integrate_velocity(velocity, steps)
    if tuple(disp.shape[2:]) != shape:
        disp = T.resize_disp(disp, shape=shape)
    return disp


def _inverse(disp: Tensor, velocity: Tensor | None, steps: int, iterations: int,
             tolerance: float) -> tuple[Tensor, Tensor, bool]:
    """``(inverse_disp, residual per pair, exact)``; ``velocity`` given for diffeomorphic models."""
    shape = tuple(disp.shape[2:])
    if velocity is not None:
        inverse = _velocity_to_disp(-velocity, steps, shape)
        exact = True
    else:
        inverse = T.invert(disp, iterations=iterations, tolerance=tolerance)
        exact = False
    # compose(disp, inverse)(y) = inverse(y) + disp(y + inverse(y)): zero for an exact inverse
    residual = T.compose(disp, inverse).norm(dim=1).flatten(1).mean(1)
    return inverse, residual, exact


def _warn_approximate(residual: float) -> None:
    warnings.warn(
        "the model has no velocity field (int_steps=0): its inverse is a fixed-point "
        f"approximation (voxreg.transforms.invert), mean residual {residual:.3g} voxels; it is "
        "not defined where the field folds. A diffeomorphic model (int_steps > 0) gives an exact "
        "inverse.",
        InverseApproximationWarning,
        stacklevel=4,  # _warn_approximate < _result < register/finetune < the caller
    )


def _check_inverse_options(iterations: int, tolerance: float) -> None:
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"inverse_iterations must be a positive integer, got {iterations!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"inverse_tolerance must be a positive number, got {tolerance!r}")


def _result(cls, pair: _Pair, moved: Tensor, disp: Tensor, seconds: float, trg: Tensor,
            velocity: Tensor | None, int_steps: int, inverse: bool, moved_fixed: bool,
            iterations: int, tolerance: float, **extra: Any):
    """Build a result in the caller's layout, computing the inverse outputs if asked."""
    values: dict[str, Any] = {}
    if inverse or moved_fixed:
        with torch.no_grad():
            inverse_disp, residual, exact = _inverse(disp, velocity, int_steps, iterations, tolerance)
            mean_residual = float(residual.mean())
            if not exact:
                _warn_approximate(mean_residual)
            values.update(inverse_residual=mean_residual, inverse_exact=exact)
            if inverse:
                values["inverse_disp"] = pair.field(inverse_disp)
            if moved_fixed:
                values["moved_fixed"] = pair.image(T.warp(trg, inverse_disp), pair.fixed_extra)
    return cls(pair.image(moved, pair.moving_extra), pair.field(disp), seconds, **values, **extra)


# --------------------------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------------------------


def register(
    model: nn.Module,
    moving: Any,
    fixed: Any,
    device: str | torch.device | None = None,
    return_time: bool = False,
    inverse: bool = False,
    moved_fixed: bool = False,
    inverse_iterations: int = 100,
    inverse_tolerance: float = 1e-3,
) -> tuple[Any, Any] | RegistrationResult:
    """Register ``moving`` to ``fixed`` with a trained model.

    Args:
        model: a registration model (e.g. :class:`voxreg.nn.networks.VxmDense`, or
            :func:`voxreg.checkpoint.load_model`'s result) mapping ``(moving, fixed)`` to
            ``(moved, ..., disp)``; it must know its spatial rank (``inshape``).
        moving, fixed: numpy arrays or tensors, ``(*spatial)``, ``(C, *spatial)`` or
            ``(B, C, *spatial)``, on the same grid (any size: the model handles it); a batch of 1
            on either side is paired with every element of the other. Integer images are
            converted to float without rescaling.
        device: where to run (default: the model's device); the model is moved there.
        return_time: also return the seconds per pair (see :class:`RegistrationResult`).
        inverse: also compute the inverse displacement (``result.inverse_disp``). Diffeomorphic
            models (``int_steps > 0`` and ``forward(..., return_velocity=True)``): exactly
            ``exp(-velocity)``, integrated and resized as the model does its forward field (for
            a bidirectional model this is the field its second output is warped with). Plain
            models: fixed-point inverse (:func:`voxreg.transforms.invert`), approximate; an
            :class:`InverseApproximationWarning` gives its residual.
        moved_fixed: also warp the fixed image onto the moving grid by the inverse
            (``result.moved_fixed = warp(fixed, inverse_disp)``; for a bidirectional diffeomorphic
            model, its second output).
        inverse_iterations, inverse_tolerance: fixed-point settings for plain models
            (iterations at most, largest change in voxels at which to stop).

    Returns:
        ``(moved, disp)`` -- numpy if ``moving`` was numpy (float32 for float32 inputs), else
        tensors on ``moving``'s device. ``moved`` has ``moving``'s leading axes (the larger
        batch when broadcast); ``disp`` is ``(B, ndim, *spatial)``, or ``(ndim, *spatial)``
        when neither input had a batch axis. With ``return_time=True``, ``inverse=True`` or
        ``moved_fixed=True``, a :class:`RegistrationResult` that unpacks as
        ``(moved, disp, seconds_per_pair)`` and carries ``inverse_disp`` (laid out like
        ``disp``), ``moved_fixed`` (``fixed``'s leading axes) and ``inverse_residual``.
        ``seconds_per_pair`` times the forward pass only, not the inverse.

    Raises:
        ValueError: shapes that do not fit the model or each other, wrong channel counts,
            NaN or infinite values (the message names the argument).
    """
    _check_model(model)
    _check_inverse_options(inverse_iterations, inverse_tolerance)
    pair = _pair(model, moving, fixed)
    want_inverse = bool(inverse or moved_fixed)
    want_velocity = want_inverse and _is_diffeomorphic(model)

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
            src_d = pair.src.to(run_device, dtype, non_blocking=True).contiguous()
            trg_d = pair.trg.to(run_device, dtype, non_blocking=True).contiguous()
            moved, disp, velocity = _predict(model, src_d, trg_d, want_velocity)
            if run_device.type == "cuda":
                torch.cuda.synchronize(run_device)
        seconds = (time.perf_counter() - tic) / pair.batch
        if not want_inverse:
            result = _result(RegistrationResult, pair, moved, disp, seconds, trg_d, None, 0,
                             False, False, inverse_iterations, inverse_tolerance)
            return result if return_time else (result.moved, result.disp)
        with torch.inference_mode():
            return _result(RegistrationResult, pair, moved, disp, seconds, trg_d, velocity,
                           _int_steps(model), inverse, moved_fixed, inverse_iterations,
                           inverse_tolerance)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# instance-specific optimisation
# --------------------------------------------------------------------------------------------


def _resolve_image_loss(image_loss: str | Callable[[Tensor, Tensor], Tensor]
                        ) -> tuple[str, Callable[[Tensor, Tensor], Tensor]]:
    if callable(image_loss):
        return getattr(image_loss, "__name__", type(image_loss).__name__), image_loss
    name = _image_loss_name(image_loss)
    if name is None:
        raise ValueError(f"image_loss must be 'mse', 'ncc', 'mi' or a callable, got {image_loss!r}")
    fns: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "mse": L.mse, "ncc": L.ncc, "mi": L.mutual_information}
    return name, fns[name]


def _check_finetune_options(steps: Any, lr: Any, lambda_: Any, tol: Any, window: Any,
                            optimize: Any) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if lambda_ is not None and not (
            isinstance(lambda_, (int, float)) and lambda_ >= 0 and math.isfinite(lambda_)):
        raise ValueError(f"lambda_ must be a number >= 0, got {lambda_!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a number >= 0 (or None to never stop early), got {tol!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if optimize not in ("field", "weights"):
        raise ValueError(f"optimize must be 'field' or 'weights', got {optimize!r}")


class _Adam:
    """Adam (Kingma & Ba, torch's defaults: betas 0.9/0.999, eps 1e-8, no weight decay) for a few
    tensors. ``torch.optim.Adam`` imports ``torch._dynamo`` on its first step, which costs seconds
    -- more than a whole 2D finetuning -- so the update is written out here."""

    def __init__(self, params: list[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.count = 0

    @torch.no_grad()
    def step(self) -> None:
        self.count += 1
        beta1, beta2 = self.betas
        correction1 = 1 - beta1**self.count
        correction2 = 1 - beta2**self.count
        for p, (mean, square) in zip(self.params, self.moments):
            if p.grad is None:
                continue
            mean.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            square.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (square / correction2).sqrt_().add_(self.eps)
            p.addcdiv_(mean, denom, value=-self.lr / correction1)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def _converged(history: list[float], window: int, tol: float | None) -> bool:
    """The best loss of the last ``window`` steps improves on the best before them by at most
    ``tol`` relative to it."""
    if tol is None or len(history) <= window:
        return False
    before = min(history[:-window])
    recent = min(history[-window:])
    return before - recent <= tol * max(abs(before), 1e-12)


def finetune(
    model: nn.Module,
    moving: Any,
    fixed: Any,
    steps: int = DEFAULT_FINETUNE_STEPS,
    lr: float | None = None,
    image_loss: str | Callable[[Tensor, Tensor], Tensor] | None = None,
    lambda_: float | None = None,
    optimize: str = "field",
    tol: float | None = 1e-3,
    window: int = 10,
    progress: bool = True,
    device: str | torch.device | None = None,
    inverse: bool = False,
    moved_fixed: bool = False,
    symmetric: bool | None = None,
    inverse_iterations: int = 100,
    inverse_tolerance: float = 1e-3,
) -> FinetuneResult:
    """Instance-specific optimisation: refine the network's registration of this pair alone.

    Starting from the model's prediction, ``steps`` Adam steps minimise, on this pair only,
    ``image_loss(fixed, moved) + lambda_ * Grad("l2")(field)`` -- the loss VoxelMorph trains
    with, the smoothness on the field the model regularises (the velocity, with
    ``loss_mult=int_downsize``, for a diffeomorphic model; the displacement otherwise). With
    ``symmetric`` (default: the model's ``bidir``), the image term is
    ``0.5 * image_loss(fixed, moved) + 0.5 * image_loss(moving, moved_fixed)`` as in training.

    What is optimised (``optimize``):

    * ``"field"`` (default): the field itself, initialised from the prediction -- the
      displacement of a plain model, or the stationary velocity of a diffeomorphic model (on
      the model's integration grid), which is integrated by scaling and squaring at every step
      so that the result stays a diffeomorphism and its inverse stays exact.
    * ``"weights"``: VoxelMorph's instance-specific optimisation -- the network's weights, on a
      copy of the model.

    The default is the field because it gives far more Dice per second on a CPU:
    ``benchmarks/bench_finetune.py`` (10 2D IXI validation pairs, ``brain2d-smooth``, one
    thread on a busy machine) measured Dice 0.601 for the network, 0.626 after 25 field steps
    in 0.10 s per pair, but only 0.612 / 0.615 / 0.619 after 25 / 50 / 100 weight steps in
    2.0 / 3.6 / 8.8 s: a field step (a warp and its gradient, about 2 ms) is some 40 times
    cheaper than a forward and backward pass of the network (about 90 ms), and each one gains
    more. Optimising the velocity rather than the displacement of a diffeomorphic model keeps
    the result a diffeomorphism. The network's weights are never changed: ``model`` is only
    read.

    The loop stops early when the loss stops improving: when the best loss of the last
    ``window`` steps is lower than the best before them by at most ``tol`` (relative).
    The returned registration is the one with the lowest loss seen.

    Args:
        model: a registration model as for :func:`register`; left unchanged.
        moving, fixed: as for :func:`register` (``(*spatial)``, ``(C, *spatial)`` or
            ``(B, C, *spatial)``); a batch is optimised together (one loss, averaged over pairs;
            with ``optimize="field"`` each pair's field is still its own).
        steps: optimisation steps at most (0: the network's prediction, with its loss).
        lr: Adam learning rate (default: 0.1 voxel per step for a field -- 0.03, 0.1 and 0.3
            gave the same Dice within 0.002 on 10 2D brain pairs after 50 steps -- and 1e-4 for
            weights, VoxelMorph's training rate; 1e-3 and 1e-5 did worse).
        image_loss: ``"mse"``, ``"ncc"``, ``"mi"`` or a callable ``(y_true, y_pred) -> scalar``;
            default: what the model was trained with (:func:`loss_settings`), else ``"mse"``.
        lambda_: smoothness weight (default: the model's training weight, else 0.01).
        optimize: ``"field"`` or ``"weights"`` (see above).
        tol: relative tolerance of the early stop; ``None`` never stops early, 0 stops only when
            the loss does not improve at all over a window. With the defaults (1e-3 over 10
            steps) the 2D brain pairs stopped after 83 steps on average; the 3D ones were still
            improving at 100.
        window: steps over which an improvement is looked for.
        progress: show a tqdm progress bar with the loss.
        device: where to run (default: the model's device).
        inverse, moved_fixed, inverse_iterations, inverse_tolerance: as for :func:`register`,
            applied to the refined field.
        symmetric: use the bidirectional image loss (default: ``model.bidir``); with
            ``optimize="weights"`` it needs a bidirectional model (its second output).

    Returns:
        A :class:`FinetuneResult` (unpacks as ``(moved, disp, seconds_per_pair)``; ``loss_history``
        per step). ``seconds_per_pair``: prediction, optimisation and the final warp, per pair
        (not the inverse).
    """
    _check_model(model)
    _check_finetune_options(steps, lr, lambda_, tol, window, optimize)
    _check_inverse_options(inverse_iterations, inverse_tolerance)
    steps = int(steps)
    trained_loss, trained_lambda = loss_settings(model)
    loss_name, image_fn = _resolve_image_loss(trained_loss if image_loss is None else image_loss)
    lambda_ = trained_lambda if lambda_ is None else float(lambda_)
    lr = DEFAULT_LR[optimize] if lr is None else float(lr)
    symmetric = bool(getattr(model, "bidir", False)) if symmetric is None else bool(symmetric)
    pair = _pair(model, moving, fixed)
    diffeomorphic = _is_diffeomorphic(model)
    int_steps = _int_steps(model)
    downsize = int(_config(model).get("int_downsize", getattr(model, "int_downsize", 1)) or 1)
    loss_mult = downsize if diffeomorphic and downsize != 1 else None

    run_device = torch.device(device) if device is not None else _model_device(model)
    dtype = next((p.dtype for p in model.parameters()), torch.get_default_dtype())
    was_training = model.training
    original_device = _model_device(model)
    tic = time.perf_counter()
    src = pair.src.to(run_device, dtype).contiguous()
    trg = pair.trg.to(run_device, dtype).contiguous()
    shape = tuple(src.shape[2:])

    def image_term(moved: Tensor, moved_back: Tensor | None) -> Tensor:
        if symmetric and moved_back is not None:
            return 0.5 * image_fn(trg, moved) + 0.5 * image_fn(src, moved_back)
        return image_fn(trg, moved)

    def smooth_term(reg_field: Tensor) -> Tensor:
        if lambda_ == 0:
            return reg_field.new_zeros(())
        return L.grad(reg_field, "l2", loss_mult=loss_mult)

    if optimize == "field":
        model.to(run_device)
        model.eval()
        try:
            with torch.no_grad():
                moved0, disp0, velocity0 = _predict(model, src, trg, diffeomorphic)
        finally:
            model.train(was_training)
        param = (velocity0 if diffeomorphic else disp0).detach().clone().requires_grad_(True)

        def evaluate() -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
            """``(loss, moved, disp, velocity or None)`` of the current field."""
            if diffeomorphic:
                disp = _velocity_to_disp(param, int_steps, shape)
                back = _velocity_to_disp(-param, int_steps, shape) if symmetric else None
            else:
                disp = param
                back = -param if symmetric else None  # as a plain bidirectional model trains
            moved = T.warp(src, disp)
            moved_back = T.warp(trg, back) if back is not None else None
            loss = image_term(moved, moved_back) + lambda_ * smooth_term(param)
            return loss, moved, disp, (param if diffeomorphic else None)

        parameters = [param]
        work_model = None
    else:
        work_model = copy.deepcopy(model).to(run_device)
        work_model.train()  # VxmDense has no batch-norm or dropout; mode only matters for others
        for p in work_model.parameters():
            p.requires_grad_(True)
        parameters = [p for p in work_model.parameters()]
        if not parameters:
            raise ValueError("optimize='weights' needs a model with parameters")
        wants_velocity = _accepts(work_model, "return_velocity")

        def evaluate() -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
            out = work_model(src, trg, return_velocity=True) if wants_velocity \
                else work_model(src, trg)
            if wants_velocity:
                out, reg_field = out[:-1], out[-1]
            else:
                reg_field = out[-1]
            moved, disp = out[0], out[-1]
            moved_back = out[1] if len(out) == 3 else None
            loss = image_term(moved, moved_back) + lambda_ * smooth_term(reg_field)
            return loss, moved, disp, (reg_field if diffeomorphic else None)

    optimizer = _Adam(parameters, lr=lr)
    history: list[float] = []
    best: tuple[float, list[Tensor]] | None = None
    stopped_early = False
    bar = tqdm(total=steps, disable=not progress or steps == 0, desc="finetune", leave=False)
    try:
        for step in range(steps + 1):
            last = step == steps
            with torch.set_grad_enabled(not last):
                loss, *_ = evaluate()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"finetune: the loss became {value} at step {step}; lower lr (now {lr:g})")
            history.append(value)
            if best is None or value < best[0]:
                best = (value, [p.detach().clone() for p in parameters])
            if last:
                break
            if _converged(history, window, tol):
                stopped_early = True
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{value:.5g}", refresh=False)
    finally:
        bar.close()
        if work_model is None:
            model.to(original_device)

    with torch.no_grad():
        for p, kept in zip(parameters, best[1]):
            p.copy_(kept)
        if work_model is not None:
            work_model.eval()
        _, moved, disp, velocity = evaluate()
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)
    seconds = (time.perf_counter() - tic) / pair.batch
    return _result(
        FinetuneResult, pair, moved, disp, seconds, trg, velocity, int_steps, inverse,
        moved_fixed, inverse_iterations, inverse_tolerance,
        loss_history=history, initial_loss=history[0], final_loss=best[0],
        steps=len(history) - 1, stopped_early=stopped_early, optimized=optimize,
        image_loss=loss_name, lambda_=lambda_,
    )
