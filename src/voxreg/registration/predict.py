"""Registration with a trained model: :func:`register`, its result, and the inverse outputs.

The steps shared with :mod:`voxreg.registration.finetuning` live here too: the model call
(:func:`predict`), ``exp(velocity)`` as the model integrates it (:func:`velocity_to_disp`), the
inverse field (:func:`inverse_field`) and the result in the caller's layout (:func:`build_result`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from voxreg import transforms as T
from voxreg._runtime import model_device, resolve_device
from voxreg.registration.model import accepts, integration_steps, is_diffeomorphic
from voxreg.registration.pairs import Pair, check_model, make_pair

__all__ = [
    "InverseApproximationWarning",
    "RegistrationResult",
    "build_result",
    "check_inverse_options",
    "inverse_field",
    "predict",
    "register",
    "velocity_to_disp",
]


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



def predict(model: nn.Module, src: Tensor, trg: Tensor, want_velocity: bool
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(moved, disp, velocity or None)`` of a model call (no gradients are set up here)."""
    if want_velocity:
        kwargs: dict[str, Any] = {"return_velocity": True}
        if accepts(model, "registration"):
            kwargs["registration"] = True
        out = model(src, trg, **kwargs)
        if not isinstance(out, (tuple, list)) or len(out) < 3:
            raise ValueError("model must return (moved, ..., disp, velocity) with return_velocity=True")
        return out[0], out[-2], out[-1]
    out = model(src, trg)
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise ValueError("model must return (moved, ..., disp)")
    return out[0], out[-1], None


def velocity_to_disp(velocity: Tensor, steps: int, shape: tuple[int, ...]) -> Tensor:
    """``exp(velocity)`` on the grid ``shape``: the model's own recipe (integrate on the
    velocity's grid, then resize), written with the public transforms.

    >>> velocity_to_disp(torch.full((1, 2, 3, 3), 0.5), 7, (5, 5))[0, :, 0, 0]  # voxels of 5x5
    tensor([1., 1.])
    """
    disp = T.integrate_velocity(velocity, steps)
    if tuple(disp.shape[2:]) != shape:
        disp = T.resize_disp(disp, shape=shape)
    return disp


def inverse_field(disp: Tensor, velocity: Tensor | None, steps: int, iterations: int,
                  tolerance: float) -> tuple[Tensor, Tensor, bool]:
    """``(inverse_disp, residual per pair, exact)``; ``velocity`` given for diffeomorphic models
    (``exp(-velocity)``, exact), else the fixed-point inverse of ``disp`` (approximate).

    >>> disp = torch.full((1, 2, 4, 4), 0.5)
    >>> inverse, residual, exact = inverse_field(disp, None, 0, 100, 1e-3)
    >>> inverse[0, :, 1, 1], residual, exact
    (tensor([-0.5000, -0.5000]), tensor([0.]), False)
    """
    shape = tuple(disp.shape[2:])
    if velocity is not None:
        inverse = velocity_to_disp(-velocity, steps, shape)
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
        stacklevel=4,  # _warn_approximate < build_result < register/finetune < the caller
    )


def check_inverse_options(iterations: int, tolerance: float) -> None:
    """Raise a ``ValueError`` naming the option unless ``iterations`` is a positive integer and
    ``tolerance`` a positive number (``inverse_iterations`` / ``inverse_tolerance``)."""
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"inverse_iterations must be a positive integer, got {iterations!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"inverse_tolerance must be a positive number, got {tolerance!r}")


def build_result(cls, pair: Pair, moved: Tensor, disp: Tensor, seconds: float, trg: Tensor,
                 velocity: Tensor | None, int_steps: int, inverse: bool, moved_fixed: bool,
                 iterations: int, tolerance: float, **extra: Any):
    """Build a result in the caller's layout, computing the inverse outputs if asked."""
    values: dict[str, Any] = {}
    if inverse or moved_fixed:
        with torch.no_grad():
            inverse_disp, residual, exact = inverse_field(disp, velocity, int_steps, iterations,
                                                          tolerance)
            mean_residual = float(residual.mean())
            if not exact:
                _warn_approximate(mean_residual)
            values.update(inverse_residual=mean_residual, inverse_exact=exact)
            if inverse:
                values["inverse_disp"] = pair.field(inverse_disp)
            if moved_fixed:
                values["moved_fixed"] = pair.image(T.warp(trg, inverse_disp), pair.fixed_extra)
    return cls(pair.image(moved, pair.moving_extra), pair.field(disp), seconds, **values, **extra)


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
    check_model(model)
    check_inverse_options(inverse_iterations, inverse_tolerance)
    pair = make_pair(model, moving, fixed)
    want_inverse = bool(inverse or moved_fixed)
    want_velocity = want_inverse and is_diffeomorphic(model)

    run_device = resolve_device(device) if device is not None else model_device(model)
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
            moved, disp, velocity = predict(model, src_d, trg_d, want_velocity)
            if run_device.type == "cuda":
                torch.cuda.synchronize(run_device)
        seconds = (time.perf_counter() - tic) / pair.batch
        if not want_inverse:
            result = build_result(RegistrationResult, pair, moved, disp, seconds, trg_d, None, 0,
                             False, False, inverse_iterations, inverse_tolerance)
            return result if return_time else (result.moved, result.disp)
        with torch.inference_mode():
            return build_result(RegistrationResult, pair, moved, disp, seconds, trg_d, velocity,
                           integration_steps(model), inverse, moved_fixed, inverse_iterations,
                           inverse_tolerance)
    finally:
        model.train(was_training)

