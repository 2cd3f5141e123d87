"""Registration losses: a functional core and thin ``nn.Module`` wrappers.

Every function returns a scalar tensor averaged over the batch. Arguments follow VoxelMorph's
order, the target first: ``(y_true, y_pred)`` (e.g. ``(fixed, moved)``). Similarity losses are
signed so that lower is better (``ncc``, ``mutual_information`` and ``dice`` return the negated
similarity, like VoxelMorph).

The modules (:class:`MSE`, :class:`NCC`, :class:`MutualInformation`, :class:`Dice`,
:class:`Grad`, :class:`BendingEnergy`) hold the configuration; ``module(y_true, y_pred)`` and
VoxelMorph's ``module.loss(y_true, y_pred)`` are the same call. The regularisers also accept the
field alone: ``Grad("l2")(disp)`` equals ``Grad("l2").loss(None, disp)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxreg import _checks

__all__ = [
    "MSE",
    "NCC",
    "BendingEnergy",
    "Dice",
    "Grad",
    "LossSum",
    "MutualInformation",
    "bending_energy",
    "dice",
    "grad",
    "mse",
    "mutual_information",
    "ncc",
    "resolve_loss",
    "weighted_sum",
]


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_pair(y_true: Tensor, y_pred: Tensor, what: str = "C") -> int:
    """Both ``(B, C, *spatial)`` with 2 or 3 spatial axes and the same shape; return ``ndim``."""
    ndim = _checks.check_image(y_true, "y_true")
    _checks.as_tensor(y_pred, "y_pred")
    if y_pred.shape != y_true.shape:
        raise ValueError(
            f"y_pred must have the shape of y_true, (B, {what}, *spatial) = "
            f"{tuple(y_true.shape)}, got {tuple(y_pred.shape)}"
        )
    for name, t in (("y_true", y_true), ("y_pred", y_pred)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return ndim


# --------------------------------------------------------------------------------------------
# similarity
# --------------------------------------------------------------------------------------------


def mse(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """Mean squared error over all voxels, channels and the batch.

    Args:
        y_true, y_pred: ``(B, C, *spatial)``, same shape.

    >>> mse(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4))
    tensor(1.)
    """
    _check_pair(y_true, y_pred)
    return torch.mean((y_true - y_pred) ** 2)


def _window(window: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(window, int) and not isinstance(window, bool):
        window = (window,) * ndim
    error = ValueError(f"window must be an odd positive integer or {ndim} of them, got {window!r}")
    try:
        window = tuple(int(w) for w in window)
    except (TypeError, ValueError):
        raise error from None
    if len(window) != ndim or any(w < 1 or w % 2 == 0 for w in window):
        raise error
    return window


def _box_sum(x: Tensor, window: tuple[int, ...]) -> Tensor:
    """Sum over a centred box, zero outside the image; ``x`` is ``(N, 1, *spatial)``.

    Separable: one 1D convolution of ones per axis (``sum(window)`` operations per voxel, not
    ``prod(window)``).
    """
    ndim = len(window)
    conv = F.conv2d if ndim == 2 else F.conv3d
    for axis, w in enumerate(window):
        if w == 1:
            continue
        shape = [1] * ndim
        shape[axis] = w
        padding = [0] * ndim
        padding[axis] = w // 2
        kernel = torch.ones(1, 1, *shape, device=x.device, dtype=x.dtype)
        x = conv(x, kernel, padding=tuple(padding))
    return x


def ncc(
    y_true: Tensor, y_pred: Tensor, window: int | Sequence[int] = 9, eps: float = 1e-5
) -> Tensor:
    """Local (windowed) normalised cross-correlation, as VoxelMorph's ``NCC``; returns ``-mean(cc)``.

    For each voxel and channel, over a ``window`` box centred on it (zero outside the image):
    ``cc = cross**2 / (var_true * var_pred + eps)`` with ``cross = sum((t - mean_t)(p - mean_p))``
    and ``var = sum((x - mean)**2)``, i.e. the squared local correlation coefficient, in [0, 1]
    (up to ``eps``). Identical textured images give about -1. ``eps`` keeps flat windows (zero
    variance) at ``cc = 0``: no NaN or infinity, and finite gradients. As in VoxelMorph the
    image is zero-padded and every window counts ``prod(window)`` voxels, so windows reaching
    past the border see zeros (a constant non-zero image still correlates there).

    Args:
        y_true, y_pred: ``(B, C, *spatial)``, same shape; each channel is treated separately.
        window: odd box size, one integer or one per spatial axis.
        eps: added to the product of the variances.

    >>> image = torch.linspace(0, 1, 25).reshape(1, 1, 5, 5)
    >>> round(float(ncc(image, image, window=3)), 3)     # identical images: about -1
    -1.0
    >>> float(ncc(image, torch.zeros_like(image), window=3))   # a flat image: 0, not NaN
    -0.0
    """
    ndim = _check_pair(y_true, y_pred)
    window = _window(window, ndim)
    n = float(math.prod(window))
    batch, channels = y_true.shape[:2]
    spatial = y_true.shape[2:]
    t = y_true.reshape(batch * channels, 1, *spatial)
    p = y_pred.reshape(batch * channels, 1, *spatial)
    stacked = torch.cat([t, p, t * t, p * p, t * p], dim=0)
    sums = _box_sum(stacked, window).chunk(5, dim=0)
    t_sum, p_sum, t2_sum, p2_sum, tp_sum = sums
    cross = tp_sum - t_sum * p_sum / n
    # clamped: cancellation can make a zero variance slightly negative
    t_var = (t2_sum - t_sum * t_sum / n).clamp(min=0)
    p_var = (p2_sum - p_sum * p_sum / n).clamp(min=0)
    cc = cross * cross / (t_var * p_var + eps)
    return -torch.mean(cc)


def mutual_information(
    y_true: Tensor,
    y_pred: Tensor,
    bins: int = 32,
    sigma: float | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    eps: float = 1e-10,
) -> Tensor:
    """Mutual information with Gaussian Parzen windows; returns ``-MI`` (nats), batch mean.

    Intensities are clipped to ``value_range``; each voxel spreads a Gaussian weight of width
    ``sigma`` (default half the bin spacing, as VoxelMorph) over ``bins`` evenly spaced bin
    centres, normalised to sum to 1. The joint histogram is the mean outer product of the two
    weight vectors; ``MI = sum p(a, b) log(p(a, b) / (p(a) p(b)))``. Each channel is a separate
    pair of images; the result is averaged over channels and batch. MI does not care how
    intensities map to each other, so it suits images of different contrasts.

    Memory: ``2 * B * C * N * bins`` values for ``N`` voxels.

    Args:
        y_true, y_pred: ``(B, C, *spatial)``, same shape.
        bins: number of histogram bins (>= 2).
        sigma: Parzen window width in intensity units.
        value_range: ``(low, high)`` intensity range of the bins.
        eps: guards the logarithm.

    >>> image = torch.linspace(0, 1, 25).reshape(1, 1, 5, 5)
    >>> torch.isclose(mutual_information(image, image), mutual_information(image, 1 - image))
    tensor(True)
    >>> abs(float(mutual_information(image, torch.full_like(image, 0.5)))) < 1e-6   # independent
    True
    """
    _check_pair(y_true, y_pred)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be (low, high), got {value_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"value_range must be finite with high > low, got {value_range!r}")
    spacing = (high - low) / (bins - 1)
    if sigma is None:
        sigma = 0.5 * spacing
    if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    centers = torch.linspace(low, high, bins, device=y_true.device, dtype=y_true.dtype)
    batch, channels = y_true.shape[:2]

    def weights(x: Tensor) -> Tensor:
        x = x.reshape(batch * channels, -1, 1).clamp(low, high)
        w = torch.exp(-0.5 * ((x - centers) / sigma) ** 2)  # (BC, N, bins)
        return w / w.sum(-1, keepdim=True)

    wt, wp = weights(y_true), weights(y_pred)
    voxels = wt.shape[1]
    joint = torch.bmm(wt.transpose(1, 2), wp) / voxels  # (BC, bins, bins)
    pt = wt.mean(1).unsqueeze(2)  # (BC, bins, 1)
    pp = wp.mean(1).unsqueeze(1)  # (BC, 1, bins)
    mi = (joint * torch.log((joint + eps) / (pt * pp + eps))).sum((1, 2))
    return -mi.mean()


def dice(y_true: Tensor, y_pred: Tensor, eps: float = 1e-5) -> Tensor:
    """Soft Dice over label channels, as VoxelMorph's ``Dice``; returns ``-mean(dice)``.

    Per batch element and channel ``l``: ``dice = 2 sum(t p) / max(sum(t + p), eps)``, averaged
    over channels and batch and negated: -1 is a perfect overlap. As in VoxelMorph, a label
    absent from both maps scores 0 (not 1), so leave out channels that can be empty (e.g. keep
    only present labels) if the value, not just its gradient, matters.

    Args:
        y_true, y_pred: one-hot or probabilistic maps ``(B, L, *spatial)``, same shape.

    >>> onehot = torch.zeros(1, 2, 2, 2)           # (B, L, H, W): label 0 on row 0, 1 on row 1
    >>> onehot[0, 0, 0] = onehot[0, 1, 1] = 1.0
    >>> dice(onehot, onehot), dice(onehot, onehot.flip(1))
    (tensor(-1.), tensor(-0.))
    """
    _check_pair(y_true, y_pred, "L")
    axes = tuple(range(2, y_true.dim()))
    top = 2 * (y_true * y_pred).sum(axes)
    bottom = (y_true + y_pred).sum(axes).clamp(min=eps)
    return -torch.mean(top / bottom)


# --------------------------------------------------------------------------------------------
# regularisers
# --------------------------------------------------------------------------------------------


def _check_field(disp: Tensor, name: str = "disp") -> int:
    return _checks.check_disp(disp, name)


def grad(disp: Tensor, penalty: str = "l1", loss_mult: float | None = None) -> Tensor:
    """Forward-difference smoothness of a field, as VoxelMorph's ``Grad``.

    For each spatial axis, the mean over voxels (and channels) of ``|d|`` (``"l1"``) or ``d**2``
    (``"l2"``) with ``d`` the forward difference along that axis; these are averaged over axes,
    multiplied by ``loss_mult`` if given (VoxelMorph uses ``int_downsize`` for a field on a
    coarser grid), and averaged over the batch.

    Args:
        disp: ``(B, ndim, *spatial)`` displacement or velocity field.
        penalty: ``"l1"`` (VoxelMorph's default) or ``"l2"``.
        loss_mult: optional factor.

    >>> ramp = torch.arange(4.0).expand(1, 2, 4, 4)   # slope 1 along axis 1, flat along axis 0
    >>> grad(ramp, "l2"), grad(torch.zeros(1, 2, 4, 4))
    (tensor(0.5000), tensor(0.))
    """
    ndim = _check_field(disp)
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    terms = []
    for axis in range(ndim):
        dim = axis + 2
        size = disp.shape[dim]
        if size < 2:
            raise ValueError(f"disp needs at least 2 voxels along each axis, got {tuple(disp.shape)}")
        d = disp.narrow(dim, 1, size - 1) - disp.narrow(dim, 0, size - 1)
        d = d.abs() if penalty == "l1" else d * d
        terms.append(d.flatten(1).mean(1))
    value = sum(terms) / ndim
    if loss_mult is not None:
        value = value * loss_mult
    return value.mean()


def bending_energy(disp: Tensor) -> Tensor:
    """Bending (thin-plate) energy of a field, with cross terms.

    Density per voxel: ``sum_c [sum_i (d2 u_c / dx_i2)**2 + 2 sum_{i<j} (d2 u_c / dx_i dx_j)**2]``
    with central second differences in voxel units (``u[x+1] - 2 u[x] + u[x-1]`` and
    ``(u[x+1,y+1] - u[x+1,y-1] - u[x-1,y+1] + u[x-1,y-1]) / 4``), evaluated on the interior
    voxels (one voxel off every border); the result is its mean over those voxels and the batch.
    Zero for any affine field.

    Args:
        disp: ``(B, ndim, *spatial)`` with at least 3 voxels along each axis.

    >>> parabola = (torch.arange(5.0) ** 2).expand(1, 2, 5, 5)   # second difference 2 per channel
    >>> bending_energy(parabola)
    tensor(8.)
    """
    ndim = _check_field(disp)
    if any(s < 3 for s in disp.shape[2:]):
        raise ValueError(f"disp needs at least 3 voxels along each axis, got {tuple(disp.shape)}")

    def shifted(offsets: dict[int, int]) -> Tensor:
        """``u[x + offset]`` on the interior; ``offsets`` maps axis to -1, 0 or 1."""
        out = disp
        for axis in range(ndim):
            size = disp.shape[axis + 2]
            out = out.narrow(axis + 2, 1 + offsets.get(axis, 0), size - 2)
        return out

    center = shifted({})
    energy = torch.zeros_like(center)
    for i in range(ndim):
        second = shifted({i: 1}) - 2 * center + shifted({i: -1})
        energy = energy + second * second
        for j in range(i + 1, ndim):
            cross = (
                shifted({i: 1, j: 1})
                - shifted({i: 1, j: -1})
                - shifted({i: -1, j: 1})
                + shifted({i: -1, j: -1})
            ) / 4
            energy = energy + 2 * cross * cross
    return energy.sum(1).flatten(1).mean(1).mean()


# --------------------------------------------------------------------------------------------
# combination
# --------------------------------------------------------------------------------------------


def weighted_sum(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum(w * l)`` of loss values, e.g. ``weighted_sum([sim, smooth], [1, lambda_])``.

    >>> weighted_sum([torch.tensor(2.0), torch.tensor(3.0)], [1.0, 0.1])
    tensor(2.3000)
    """
    losses, weights = list(losses), list(weights)
    if len(losses) != len(weights) or not losses:
        raise ValueError(
            f"losses and weights must be non-empty and of equal length, got {len(losses)} and "
            f"{len(weights)}"
        )
    total = losses[0] * weights[0]
    for value, weight in zip(losses[1:], weights[1:]):
        total = total + value * weight
    return total


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


class _Loss(nn.Module):
    """Base: ``forward(y_true, y_pred)``; ``.loss`` is VoxelMorph's name for the same call."""

    def loss(self, y_true: Tensor | None, y_pred: Tensor | None = None) -> Tensor:
        return self(y_true, y_pred)


class MSE(_Loss):
    """Mean squared error (:func:`mse`).

    >>> MSE()(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4))
    tensor(1.)
    """

    def forward(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        return mse(y_true, y_pred)


class NCC(_Loss):
    """Negative local normalised cross-correlation (:func:`ncc`).

    ``win`` is accepted as VoxelMorph's name for ``window``.

    >>> NCC(win=3)
    NCC(window=3)
    >>> image = torch.linspace(0, 1, 25).reshape(1, 1, 5, 5)
    >>> bool(NCC(window=3)(image, image) == NCC(window=3).loss(image, image))
    True
    """

    def __init__(
        self, window: int | Sequence[int] | None = 9, eps: float = 1e-5, win: int | None = None
    ):
        super().__init__()
        self.window = win if win is not None else (9 if window is None else window)
        self.eps = eps

    def forward(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        return ncc(y_true, y_pred, self.window, self.eps)

    def extra_repr(self) -> str:
        return f"window={self.window}"


class MutualInformation(_Loss):
    """Negative Parzen-window mutual information (:func:`mutual_information`).

    >>> MutualInformation(bins=16)
    MutualInformation(bins=16, sigma=None, value_range=(0.0, 1.0))
    """

    def __init__(
        self,
        bins: int = 32,
        sigma: float | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__()
        self.bins, self.sigma, self.value_range = bins, sigma, tuple(value_range)

    def forward(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        return mutual_information(y_true, y_pred, self.bins, self.sigma, self.value_range)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, sigma={self.sigma}, value_range={self.value_range}"


class Dice(_Loss):
    """Negative soft Dice (:func:`dice`).

    >>> Dice()(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    tensor(-1.)
    """

    def forward(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        return dice(y_true, y_pred)


class _Regulariser(_Loss):
    """``forward(disp)`` or ``forward(y_true_ignored, disp)``."""

    def _field(self, y_true: Tensor | None, y_pred: Tensor | None) -> Tensor:
        disp = y_true if y_pred is None else y_pred
        if disp is None:
            raise ValueError("disp must be given: call forward(disp) or forward(None, disp)")
        return disp


class Grad(_Regulariser):
    """Forward-difference smoothness (:func:`grad`); ``Grad("l2").loss(None, flow)`` works.

    >>> flow = torch.arange(4.0).expand(1, 2, 4, 4)
    >>> Grad("l2")(flow), Grad("l2").loss(None, flow)
    (tensor(0.5000), tensor(0.5000))
    """

    def __init__(self, penalty: str = "l1", loss_mult: float | None = None):
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
        self.penalty, self.loss_mult = penalty, loss_mult

    def forward(self, y_true: Tensor | None, y_pred: Tensor | None = None) -> Tensor:
        return grad(self._field(y_true, y_pred), self.penalty, self.loss_mult)

    def extra_repr(self) -> str:
        return f"penalty={self.penalty!r}, loss_mult={self.loss_mult}"


class BendingEnergy(_Regulariser):
    """Bending energy (:func:`bending_energy`).

    >>> BendingEnergy()(torch.zeros(1, 2, 3, 3))
    tensor(0.)
    """

    def forward(self, y_true: Tensor | None, y_pred: Tensor | None = None) -> Tensor:
        return bending_energy(self._field(y_true, y_pred))


class LossSum(nn.Module):
    """Weighted sum of losses over paired targets, VoxelMorph's ``losses`` / ``loss_weights``.

    ``LossSum([NCC(), Grad("l2")], [1, lam])(y_true=[fixed, None], y_pred=[moved, flow])`` is
    ``1 * ncc(fixed, moved) + lam * grad(flow)``. With ``return_terms=True`` also returns the list
    of unweighted terms.

    >>> fixed, moved = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    >>> flow = torch.arange(4.0).expand(1, 2, 4, 4)
    >>> LossSum([MSE(), Grad("l2")], [1, 0.5])([fixed, None], [moved, flow], return_terms=True)
    (tensor(1.2500), [tensor(1.), tensor(0.5000)])
    """

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        losses = list(losses)
        weights = [1.0] * len(losses) if weights is None else [float(w) for w in weights]
        if not losses or len(weights) != len(losses):
            raise ValueError(
                f"losses and weights must be non-empty and of equal length, got {len(losses)} "
                f"and {len(weights)}"
            )
        self.losses = nn.ModuleList(losses)
        self.weights = weights

    def forward(
        self,
        y_true: Sequence[Tensor | None],
        y_pred: Sequence[Tensor],
        return_terms: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        y_true, y_pred = list(y_true), list(y_pred)
        if len(y_true) != len(self.losses) or len(y_pred) != len(self.losses):
            raise ValueError(
                f"y_true and y_pred must hold one entry per loss ({len(self.losses)}), got "
                f"{len(y_true)} and {len(y_pred)}"
            )
        terms = [fn(t, p) for fn, t, p in zip(self.losses, y_true, y_pred)]
        total = weighted_sum(terms, self.weights)
        return (total, terms) if return_terms else total


def resolve_loss(loss: str | Callable[[Tensor, Tensor], Tensor],
                 loss_mult: float | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """A loss callable ``(y_true, y_pred) -> scalar`` from a callable or a name.

    Names: ``"mse"``, ``"ncc"``, ``"mi"``/``"mutual_information"``, ``"dice"``,
    ``"grad"``/``"l2"`` (``Grad("l2")``), ``"l1"`` (``Grad("l1")``),
    ``"bending"``/``"bending_energy"``. ``loss_mult`` is passed to ``Grad`` when it accepts it
    (VoxelMorph scales the gradient of a downsampled velocity by ``int_downsize``).

    >>> resolve_loss("ncc"), resolve_loss("grad", loss_mult=2)
    (NCC(window=9), Grad(penalty='l2', loss_mult=2))
    >>> resolve_loss(mse) is mse
    True
    """
    if callable(loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"a loss must be a callable or a name, got {type(loss).__name__}")
    name = loss.lower().replace("-", "_")
    simple: dict[str, type[nn.Module]] = {
        "mse": MSE,
        "ncc": NCC,
        "mi": MutualInformation,
        "mutual_information": MutualInformation,
        "dice": Dice,
        "bending": BendingEnergy,
        "bending_energy": BendingEnergy,
    }
    if name in simple:
        return simple[name]()
    penalties = {"grad": "l2", "l2": "l2", "grad_l2": "l2", "l1": "l1", "grad_l1": "l1"}
    if name in penalties:
        grad = Grad
        if loss_mult is not None and loss_mult != 1:
            try:
                params = inspect.signature(grad).parameters
            except (TypeError, ValueError):
                params = {}
            if "loss_mult" in params:
                return grad(penalties[name], loss_mult=loss_mult)
        return grad(penalties[name])
    raise ValueError(
        f"unknown loss name {loss!r}; known: mse, ncc, mi, dice, grad (l2), l1, bending"
    )
