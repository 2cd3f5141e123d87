"""Tests of voxreg.losses against numpy / direct implementations and known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxreg import losses as L

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _textured(shape, seed=0):
    """A smooth-ish textured image in [0, 1]: sum of random sinusoids."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    image = np.zeros(shape)
    for _ in range(4):
        freq = rng.uniform(0.3, 0.9, size=len(shape))
        phase = rng.uniform(0, 2 * np.pi)
        image += np.sin(sum(f * g for f, g in zip(freq, grids)) + phase)
    image = (image - image.min()) / (image.max() - image.min())
    return torch.from_numpy(image)[None, None]


# ------------------------------------------------------------------------------------------
# MSE
# ------------------------------------------------------------------------------------------


def test_mse_matches_numpy(device):
    a, b = _rand(2, 3, 5, 6, seed=1), _rand(2, 3, 5, 6, seed=2)
    expected = np.mean((a.numpy() - b.numpy()) ** 2)
    a, b = a.to(device), b.to(device)
    assert L.mse(a, b).item() == pytest.approx(expected)
    assert L.MSE()(a, b).item() == pytest.approx(expected)
    assert L.MSE().loss(a, b).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="y_pred"):
        L.mse(a, b[..., :5])
    with pytest.raises(ValueError, match="y_true"):
        L.mse(a[0, 0], b[0, 0])


# ------------------------------------------------------------------------------------------
# NCC
# ------------------------------------------------------------------------------------------


def _ncc_loop(t: np.ndarray, p: np.ndarray, win: int, eps: float = 1e-5) -> float:
    """Direct definition: per voxel, the window (zero outside) and its squared correlation."""
    r = win // 2
    tp = np.pad(t, r)
    pp = np.pad(p, r)
    values = []
    for idx in np.ndindex(*t.shape):
        box = tuple(slice(i, i + win) for i in idx)
        a, b = tp[box], pp[box]
        da, db = a - a.mean(), b - b.mean()
        cross = (da * db).sum()
        values.append(cross**2 / ((da**2).sum() * (db**2).sum() + eps))
    return -float(np.mean(values))


@pytest.mark.parametrize("shape, win", [((7, 8), 3), ((6, 7), 5), ((5, 4, 6), 3)])
def test_ncc_matches_direct_loop(shape, win, device):
    t, p = _rand(1, 1, *shape, seed=3), _rand(1, 1, *shape, seed=4)
    expected = _ncc_loop(t[0, 0].numpy(), p[0, 0].numpy(), win)
    assert L.ncc(t.to(device), p.to(device), window=win).item() == pytest.approx(expected, rel=1e-9)


def test_ncc_batch_and_channels_are_averaged():
    t, p = _rand(2, 2, 6, 7, seed=5), _rand(2, 2, 6, 7, seed=6)
    per = [
        _ncc_loop(t[b, c].numpy(), p[b, c].numpy(), 3) for b in range(2) for c in range(2)
    ]
    assert L.NCC(3)(t, p).item() == pytest.approx(np.mean(per), rel=1e-9)
    assert L.NCC(win=3).loss(t, p).item() == pytest.approx(np.mean(per), rel=1e-9)


@pytest.mark.parametrize("shape", [(24, 24), (12, 12, 12)])
def test_ncc_identical_textured_images_is_minus_one(shape):
    image = _textured(shape).float()
    value = L.ncc(image, image).item()
    assert value == pytest.approx(-1.0, abs=1e-3)
    # and a different image scores worse
    other = _textured(shape, seed=7).float()
    assert L.ncc(image, other).item() > value + 0.1


def test_ncc_invariant_to_intensity_scaling():
    # scaling only: the zero padding at the borders (as VoxelMorph) is not shift-invariant
    image = _textured((20, 20))
    assert L.ncc(image, 3 * image).item() == pytest.approx(-1.0, abs=1e-3)


def test_ncc_constant_images_are_finite(dtype, device):
    flat = torch.full((1, 1, 10, 10), 0.7, dtype=dtype, device=device, requires_grad=True)
    textured = _textured((10, 10)).to(device, dtype).requires_grad_(True)
    for a, b in [(flat, flat), (flat, textured), (textured, flat)]:
        value = L.ncc(a, b)
        assert torch.isfinite(value)
        value.backward()
    assert torch.isfinite(flat.grad).all() and torch.isfinite(textured.grad).all()
    # flat windows score 0, not NaN; only windows reaching the zero padding correlate
    flat = torch.full((1, 1, 16, 16), 0.7, dtype=dtype)
    expected = _ncc_loop(flat[0, 0].double().numpy(), flat[0, 0].double().numpy(), 5)
    flat = flat.to(device)
    assert L.ncc(flat, flat, window=5).item() == pytest.approx(expected, rel=1e-4)
    assert -0.9 < expected < -0.1  # some zero-variance windows are counted as 0


def test_ncc_gradient_finite_and_bad_window():
    t = _rand(1, 1, 8, 8, seed=1)
    p = _rand(1, 1, 8, 8, seed=2).requires_grad_(True)
    L.ncc(t, p).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="window"):
        L.ncc(t, p, window=4)
    with pytest.raises(ValueError, match="window"):
        L.ncc(t, p, window=(3, 3, 3))


# ------------------------------------------------------------------------------------------
# mutual information
# ------------------------------------------------------------------------------------------


def test_mi_self_and_inverted_beat_unrelated():
    image = _textured((24, 24)).float()
    unrelated = _textured((24, 24), seed=11).float()
    self_mi = L.mutual_information(image, image).item()
    inverted = L.mutual_information(image, 1 - image).item()
    other = L.mutual_information(image, unrelated).item()
    # losses are -MI: lower is better
    assert self_mi < other - 0.3
    assert inverted < other - 0.3
    assert inverted == pytest.approx(self_mi, abs=0.05)
    assert L.MutualInformation().loss(image, image).item() == pytest.approx(self_mi)


def test_mi_matches_hand_computation_and_is_differentiable():
    torch.manual_seed(0)
    a, b = _rand(1, 1, 6, 6, seed=1), _rand(1, 1, 6, 6, seed=2)
    bins, sigma = 4, 0.2
    centers = np.linspace(0, 1, bins)

    def weights(x):
        w = np.exp(-0.5 * ((x.reshape(-1, 1) - centers) / sigma) ** 2)
        return w / w.sum(1, keepdims=True)

    wa, wb = weights(a.numpy()), weights(b.numpy())
    joint = wa.T @ wb / wa.shape[0]
    pa, pb = wa.mean(0), wb.mean(0)
    mi = np.sum(joint * np.log(joint / np.outer(pa, pb)))
    value = L.mutual_information(a, b, bins=bins, sigma=sigma)
    assert value.item() == pytest.approx(-mi, rel=1e-6)

    b = b.clone().requires_grad_(True)
    L.mutual_information(a, b).backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="bins"):
        L.mutual_information(a, b, bins=1)
    with pytest.raises(ValueError, match="value_range"):
        L.mutual_information(a, b, value_range=(1, 0))


# ------------------------------------------------------------------------------------------
# Dice
# ------------------------------------------------------------------------------------------


def _one_hot(labels: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, n).movedim(-1, 1).double()


def test_dice_perfect_and_hand_computed(device):
    labels = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 1], [2, 2, 1, 0]]], device=device)  # (1, 3, 4)
    onehot = _one_hot(labels, 3)
    assert L.dice(onehot, onehot).item() == pytest.approx(-1.0)
    other = labels.clone()
    other[0, 0, 0] = 1  # one voxel of label 0 becomes label 1
    pred = _one_hot(other, 3)
    # label 0: |A|=4, |B|=3, overlap 3 -> 6/7; label 1: 4, 5, 4 -> 8/9; label 2: 4, 4, 4 -> 1
    expected = -np.mean([6 / 7, 8 / 9, 1.0])
    assert L.dice(onehot, pred).item() == pytest.approx(expected)
    assert L.Dice().loss(onehot, pred).item() == pytest.approx(expected)
    # soft maps
    soft = onehot * 0.5
    assert L.dice(onehot, soft).item() == pytest.approx(-2 * 0.5 / 1.5)
    with pytest.raises(ValueError, match="y_pred"):
        L.dice(onehot, onehot[:, :2])


# ------------------------------------------------------------------------------------------
# Grad
# ------------------------------------------------------------------------------------------


def _grad_numpy(field: np.ndarray, penalty: str) -> float:
    ndim = field.ndim - 2
    per_axis = []
    for axis in range(ndim):
        d = np.diff(field, axis=axis + 2)
        d = np.abs(d) if penalty == "l1" else d**2
        per_axis.append(d.reshape(field.shape[0], -1).mean(1))
    return float(np.mean(sum(per_axis) / ndim))


@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("shape", [(2, 2, 6, 7), (2, 3, 4, 5, 6)])
def test_grad_matches_numpy(penalty, shape, device):
    field = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = _grad_numpy(field.numpy(), penalty)
    field = field.to(device)
    assert L.grad(field, penalty).item() == pytest.approx(expected)
    assert L.grad(field, penalty, loss_mult=2).item() == pytest.approx(2 * expected)
    module = L.Grad(penalty)
    assert module(field).item() == pytest.approx(expected)
    assert module(None, field).item() == pytest.approx(expected)
    assert module.loss(None, field).item() == pytest.approx(expected)


def test_grad_zero_for_constant_field_and_errors():
    field = torch.full((1, 2, 5, 5), 3.0)
    assert L.grad(field, "l2").item() == 0.0
    assert L.grad(field, "l1").item() == 0.0
    with pytest.raises(ValueError, match="penalty"):
        L.Grad("l3")
    with pytest.raises(ValueError, match="disp"):
        L.grad(torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="disp"):
        L.Grad()(None, None)


# ------------------------------------------------------------------------------------------
# bending energy
# ------------------------------------------------------------------------------------------


def _bending_numpy(field: np.ndarray) -> float:
    ndim = field.ndim - 2
    interior = (slice(None), slice(None)) + (slice(1, -1),) * ndim

    def shift(offsets):
        out = field
        for axis, o in offsets.items():
            out = np.roll(out, -o, axis=axis + 2)  # out[x] = field[x + o]
        return out[interior]

    energy = 0.0
    for i in range(ndim):
        second = shift({i: 1}) - 2 * shift({}) + shift({i: -1})
        energy = energy + second**2
        for j in range(i + 1, ndim):
            cross = (shift({i: 1, j: 1}) - shift({i: 1, j: -1}) - shift({i: -1, j: 1})
                     + shift({i: -1, j: -1})) / 4
            energy = energy + 2 * cross**2
    return float(energy.sum(1).mean())


@pytest.mark.parametrize("spatial", [(6, 7), (5, 6, 4)])
def test_bending_energy_zero_for_affine_positive_for_quadratic(spatial):
    ndim = len(spatial)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in spatial],
                                      indexing="ij"))
    rng = np.random.default_rng(0)
    matrix = torch.from_numpy(rng.normal(size=(ndim, ndim)))
    shift = torch.from_numpy(rng.normal(size=(ndim, 1)))
    affine = (matrix @ grid.reshape(ndim, -1) + shift).reshape(1, ndim, *spatial)
    assert abs(L.bending_energy(affine).item()) < 1e-20
    # u_0 = x0^2 (d2/dx0^2 = 2 -> energy 4); u_1 = x0 * x1 (cross term 1 -> 2 * 1)
    quadratic = torch.zeros(1, ndim, *spatial, dtype=torch.float64)
    quadratic[0, 0] = grid[0] ** 2
    quadratic[0, 1] = grid[0] * grid[1]
    assert L.bending_energy(quadratic).item() == pytest.approx(4.0 + 2.0)
    assert L.BendingEnergy()(quadratic).item() == pytest.approx(6.0)
    assert L.BendingEnergy().loss(None, quadratic).item() == pytest.approx(6.0)


@pytest.mark.parametrize("shape", [(2, 2, 6, 7), (2, 3, 5, 4, 6)])
def test_bending_energy_matches_numpy(shape, device):
    field = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = _bending_numpy(field.numpy())
    field = field.to(device)
    assert L.bending_energy(field).item() == pytest.approx(expected)
    field.requires_grad_(True)
    L.bending_energy(field).backward()
    assert torch.isfinite(field.grad).all()
    with pytest.raises(ValueError, match="disp"):
        L.bending_energy(torch.zeros(1, 2, 2, 5))


# ------------------------------------------------------------------------------------------
# combination
# ------------------------------------------------------------------------------------------


def test_weighted_sum_and_loss_sum():
    fixed, moved = _rand(1, 1, 8, 8, seed=1), _rand(1, 1, 8, 8, seed=2)
    flow = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sim, smooth = L.mse(fixed, moved), L.grad(flow, "l2")
    expected = sim.item() + 0.1 * smooth.item()
    assert L.weighted_sum([sim, smooth], [1, 0.1]).item() == pytest.approx(expected)
    total_loss = L.LossSum([L.MSE(), L.Grad("l2")], [1, 0.1])
    assert total_loss([fixed, None], [moved, flow]).item() == pytest.approx(expected)
    total, terms = total_loss([fixed, None], [moved, flow], return_terms=True)
    assert [t.item() for t in terms] == pytest.approx([sim.item(), smooth.item()])
    with pytest.raises(ValueError, match="weights"):
        L.weighted_sum([sim], [1, 2])
    with pytest.raises(ValueError, match="y_true"):
        total_loss([fixed], [moved, flow])
