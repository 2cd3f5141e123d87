"""The optimisation stages of affine registration and the per-level option readers.

Owns: one stage of L-BFGS (:func:`optimise_lbfgs`) or Adam (:func:`optimise_adam`) on an
:class:`voxreg.affine.objective.Objective`, with a 0/1 mask ``free`` of the parameters that move
(the rigid stage frees translation and rotation only); and the reading of options given per
pyramid level (:func:`per_level`, :func:`positive_ints`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from voxreg.affine.objective import Objective

# --------------------------------------------------------------------------------------------
# optimisers
# --------------------------------------------------------------------------------------------


def optimise_lbfgs(objective: Objective, params: Tensor, free: Tensor, iterations: int,
                   tol: float) -> tuple[Tensor, float, int]:
    """L-BFGS with a strong Wolfe line search on the free parameters; stops after
    ``iterations`` iterations or when the loss or the step changes by less than ``tol``.
    Returns the parameters, their loss and the number of loss evaluations."""
    params = params.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([params], lr=1.0, max_iter=iterations, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=tol,
                                  line_search_fn="strong_wolfe")
    evaluations = 0

    def closure() -> Tensor:
        nonlocal evaluations
        optimiser.zero_grad()
        value = objective(params)
        if not torch.isfinite(value):
            raise ValueError("the affine loss is not finite; check the images")
        value.backward()
        params.grad.mul_(free)
        evaluations += 1
        return value

    optimiser.step(closure)
    with torch.no_grad():
        final = float(objective(params))
    return params.detach(), final, evaluations


def optimise_adam(objective: Objective, params: Tensor, free: Tensor, iterations: int,
                  lr: float, patience: int, max_stalls: int, tol: float = 1e-4
                  ) -> tuple[Tensor, float, int]:
    """Adam on the free parameters with learning-rate halving on plateaus: a step that does not
    lower the best loss by ``tol`` (relative) is a stall; after ``patience`` stalls ``lr`` halves;
    after ``max_stalls`` halvings (plus one more plateau) or ``iterations`` steps it stops.
    Returns the best parameters, their loss and the number of steps taken."""
    params = params.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([params], lr=lr)
    best_loss, best = math.inf, params.detach().clone()
    since, stalls, steps = 0, 0, 0
    for step in range(1, iterations + 1):
        steps = step
        optimiser.zero_grad(set_to_none=False)
        value = objective(params)
        value.backward()
        current = float(value.detach())
        if not math.isfinite(current):
            break
        if current < best_loss - tol * max(abs(best_loss), 1e-12) or best_loss == math.inf:
            best_loss, best, since = current, params.detach().clone(), 0
        else:
            since += 1
            if since >= patience:
                stalls += 1
                if stalls > max_stalls:
                    break
                for group in optimiser.param_groups:
                    group["lr"] *= 0.5
                since = 0
        params.grad.mul_(free)
        optimiser.step()
    if best_loss == math.inf:
        raise ValueError("the affine loss is not finite at the start; check the images")
    with torch.no_grad():
        final = float(objective(params))
    if final < best_loss:  # the last step may be the best
        return params.detach(), final, steps
    return best, best_loss, steps


# --------------------------------------------------------------------------------------------
# per-level options
# --------------------------------------------------------------------------------------------


def positive_ints(values: Sequence[int] | int, name: str) -> tuple[int, ...]:
    """``values`` (one integer or a sequence) as a non-empty tuple of positive integers; a
    :class:`ValueError` naming ``name`` otherwise."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be positive integers, got {values!r}") from None
    if not out or any(v < 1 for v in out) or any(int(v) != v for v in values):
        raise ValueError(f"{name} must be positive integers, got {values!r}")
    return out


def per_level(values: Sequence[int] | int | None, defaults: tuple[int, int, int], count: int,
              name: str, single: int) -> tuple[int, ...]:
    """One positive integer per pyramid level: from one number, one per level, or ``None``
    (``defaults`` for the first, middle and finest levels; ``single`` for a one-level pyramid)."""
    if values is None:
        first, middle, last = defaults
        values = (first,) + (middle,) * (count - 2) + (last,) if count > 1 else (single,)
    out = positive_ints(values, name)
    if len(out) == 1:
        out = out * count
    if len(out) != count:
        raise ValueError(f"{name} must give one number or one per level ({count}), got {len(out)}")
    return out
