"""Instance-specific optimisation: :func:`finetune` refines a network's registration of one pair
by a few steps of Adam on that pair alone (the field, or a copy of the network's weights).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from voxreg import losses as L
from voxreg import transforms as T
from voxreg._runtime import model_device, resolve_device
from voxreg.registration.model import (
    accepts,
    image_loss_name,
    integration_steps,
    is_diffeomorphic,
    loss_settings,
    model_config,
)
from voxreg.registration.pairs import check_model, make_pair
from voxreg.registration.predict import (
    RegistrationResult,
    build_result,
    check_inverse_options,
    predict,
    velocity_to_disp,
)

__all__ = [
    "DEFAULT_FINETUNE_STEPS",
    "DEFAULT_LR",
    "Adam",
    "FinetuneResult",
    "converged",
    "finetune",
]

#: default (largest) number of :func:`finetune` steps, also what ``voxreg register --finetune``
#: without a number uses: on the brain benchmarks it keeps nearly all of the gain of twice as
#: many steps, for half the time (``benchmarks/README.md``).
DEFAULT_FINETUNE_STEPS = 100
#: default Adam learning rate of :func:`finetune` per optimised quantity (voxels per step for a
#: field; a learning rate for network weights).
DEFAULT_LR = {"field": 0.1, "weights": 1e-4}


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


def _resolve_image_loss(image_loss: str | Callable[[Tensor, Tensor], Tensor]
                        ) -> tuple[str, Callable[[Tensor, Tensor], Tensor]]:
    """``(name, loss function)`` for ``"mse"``, ``"ncc"``, ``"mi"`` or a callable."""
    if callable(image_loss):
        return getattr(image_loss, "__name__", type(image_loss).__name__), image_loss
    name = image_loss_name(image_loss)
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


class Adam:
    """Adam (Kingma & Ba, torch's defaults: betas 0.9/0.999, eps 1e-8, no weight decay) for a few
    tensors. ``torch.optim.Adam`` imports ``torch._dynamo`` on its first step, which costs seconds
    -- more than a whole 2D finetuning -- so the update is written out here.

    >>> x = torch.tensor([1.0], requires_grad=True)
    >>> adam = Adam([x], lr=0.1)
    >>> (x**2).sum().backward()
    >>> adam.step()                        # the first step moves by lr against the gradient
    >>> x
    tensor([0.9000], requires_grad=True)
    """

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


def converged(history: list[float], window: int, tol: float | None) -> bool:
    """The best loss of the last ``window`` steps improves on the best before them by at most
    ``tol`` relative to it (never with ``tol=None``).

    >>> converged([1.0, 0.5, 0.4999], window=1, tol=1e-3), converged([1.0, 0.5], window=1, tol=1e-3)
    (True, False)
    """
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

    The default is the field because it gives far more Dice per second on a CPU: a field step
    (a warp and its gradient) costs a small fraction of a forward and backward pass of the
    network, and each one gains more (``benchmarks/README.md``). Optimising the velocity rather
    than the displacement of a diffeomorphic model keeps the result a diffeomorphism. The
    network's weights are never changed: ``model`` is only read.

    The loop stops early when the loss stops improving: when the best loss of the last
    ``window`` steps is lower than the best before them by at most ``tol`` (relative).
    The returned registration is the one with the lowest loss seen.

    Args:
        model: a registration model as for :func:`register`; left unchanged.
        moving, fixed: as for :func:`register` (``(*spatial)``, ``(C, *spatial)`` or
            ``(B, C, *spatial)``); a batch is optimised together (one loss, averaged over pairs;
            with ``optimize="field"`` each pair's field is still its own).
        steps: optimisation steps at most (0: the network's prediction, with its loss).
        lr: Adam learning rate (default: 0.1 voxel per step for a field, where the result
            hardly depends on it within a factor of 3; 1e-4 for weights, VoxelMorph's training
            rate).
        image_loss: ``"mse"``, ``"ncc"``, ``"mi"`` or a callable ``(y_true, y_pred) -> scalar``;
            default: what the model was trained with (:func:`loss_settings`), else ``"mse"``.
        lambda_: smoothness weight (default: the model's training weight, else 0.01).
        optimize: ``"field"`` or ``"weights"`` (see above).
        tol: relative tolerance of the early stop; ``None`` never stops early, 0 stops only when
            the loss does not improve at all over a window.
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
    check_model(model)
    _check_finetune_options(steps, lr, lambda_, tol, window, optimize)
    check_inverse_options(inverse_iterations, inverse_tolerance)
    steps = int(steps)
    trained_loss, trained_lambda = loss_settings(model)
    loss_name, image_fn = _resolve_image_loss(trained_loss if image_loss is None else image_loss)
    lambda_ = trained_lambda if lambda_ is None else float(lambda_)
    lr = DEFAULT_LR[optimize] if lr is None else float(lr)
    symmetric = bool(getattr(model, "bidir", False)) if symmetric is None else bool(symmetric)
    pair = make_pair(model, moving, fixed)
    diffeomorphic = is_diffeomorphic(model)
    int_steps = integration_steps(model)
    downsize = int(model_config(model).get("int_downsize", getattr(model, "int_downsize", 1)) or 1)
    loss_mult = downsize if diffeomorphic and downsize != 1 else None

    run_device = resolve_device(device) if device is not None else model_device(model)
    dtype = next((p.dtype for p in model.parameters()), torch.get_default_dtype())
    was_training = model.training
    original_device = model_device(model)
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
                moved0, disp0, velocity0 = predict(model, src, trg, diffeomorphic)
        finally:
            model.train(was_training)
        param = (velocity0 if diffeomorphic else disp0).detach().clone().requires_grad_(True)

        def evaluate() -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
            """``(loss, moved, disp, velocity or None)`` of the current field."""
            if diffeomorphic:
                disp = velocity_to_disp(param, int_steps, shape)
                back = velocity_to_disp(-param, int_steps, shape) if symmetric else None
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
        wants_velocity = accepts(work_model, "return_velocity")

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

    optimizer = Adam(parameters, lr=lr)
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
            if converged(history, window, tol):
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
    return build_result(
        FinetuneResult, pair, moved, disp, seconds, trg, velocity, int_steps, inverse,
        moved_fixed, inverse_iterations, inverse_tolerance,
        loss_history=history, initial_loss=history[0], final_loss=best[0],
        steps=len(history) - 1, stopped_early=stopped_early, optimized=optimize,
        image_loss=loss_name, lambda_=lambda_,
    )

