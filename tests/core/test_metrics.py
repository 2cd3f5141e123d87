"""Metrics against hand-made cases with known answers."""

import numpy as np
import pytest
import torch

from voxreg import metrics


def _cubes(shift=(2, 0, 0), shape=(14, 12, 12)):
    a = np.zeros(shape, np.uint8)
    b = np.zeros(shape, np.uint8)
    a[2:8, 2:8, 2:8] = 1
    s = tuple(slice(2 + d, 8 + d) for d in shift)
    b[s] = 1
    return a, b


def test_dice_two_cubes_offset_by_two_voxels():
    a, b = _cubes()
    # 6x6x6 cubes overlapping on 4x6x6
    assert metrics.dice(a, b) == {1: pytest.approx(2 * 144 / 432)}
    assert metrics.mean_dice(a, b) == pytest.approx(2 / 3)
    assert metrics.dice(a, a)[1] == 1.0


def test_dice_label_sets():
    a = np.array([[0, 1, 1], [2, 2, 0]])
    b = np.array([[0, 1, 3], [2, 0, 0]])
    out = metrics.dice(a, b)
    assert list(out) == [1, 2, 3]  # labels of either map, background excluded
    assert out[1] == pytest.approx(2 * 1 / 3)
    assert out[2] == pytest.approx(2 * 1 / 3)
    assert out[3] == 0.0  # present in b only
    assert np.isnan(metrics.dice(a, b, labels=[7])[7])  # absent from both
    assert metrics.mean_dice(a, b, labels=[1, 7]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same shape"):
        metrics.dice(a, b[:, :2])


def test_dice_accepts_tensors(device):
    a, b = _cubes()
    a, b = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    assert metrics.dice(a, b)[1] == pytest.approx(2 / 3)
    assert metrics.hausdorff95(a, b, 1) == pytest.approx(2.0)


def test_hd95_two_cubes():
    a, b = _cubes()
    assert metrics.hausdorff95(a, b, 1) == pytest.approx(2.0)
    assert metrics.hausdorff95(a, a, 1) == 0.0
    # the offset is along axis 0: its spacing scales the distance, the others do not matter
    assert metrics.hausdorff95(a, b, 1, spacing=(2.0, 1.0, 1.0)) == pytest.approx(4.0)
    a2, b2 = _cubes(shift=(0, 2, 0))
    assert metrics.hausdorff95(a2, b2, 1, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert metrics.hausdorff95(a, b, 1, spacing=(2.0, 1.0, 1.0), percentile=100) == pytest.approx(4.0)


def test_hd95_ignores_a_rare_outlier_but_max_does_not():
    a = np.zeros((40, 40, 40), np.uint8)
    a[5:25, 5:25, 5:25] = 1
    b = a.copy()
    b[38, 38, 38] = 1  # one stray voxel far away
    assert metrics.hausdorff95(a, b, 1) == 0.0
    assert metrics.hausdorff95(a, b, 1, percentile=100) == pytest.approx(np.sqrt(3 * 14**2))


def test_hd95_missing_label_is_nan():
    a, b = _cubes()
    assert np.isnan(metrics.hausdorff95(a, np.zeros_like(b), 1))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hausdorff95(a, b, 1, spacing=(1, 1))


def test_jacobian_stats_identity_and_fold():
    zero = np.zeros((3, 6, 6, 6))
    stats = metrics.jacobian_stats(zero)
    assert stats["folding_percent"] == 0.0
    assert stats["sd_log_jac"] == 0.0
    assert stats["jac_mean"] == pytest.approx(1.0)
    # a uniform scaling x -> 2x along axis 0: det 2 everywhere
    grid = np.arange(6, dtype=np.float64)
    scale = np.zeros((2, 6, 6))
    scale[0] = grid[:, None]
    stats = metrics.jacobian_stats(scale)
    assert stats["jac_min"] == pytest.approx(2.0) and stats["sd_log_jac"] == pytest.approx(0.0)
    # x -> -x along axis 0 folds everywhere
    flip = np.zeros((1, 2, 6, 6))
    flip[0, 0] = -2 * grid[:, None]
    stats = metrics.jacobian_stats(flip)
    assert stats["folding_percent"] == 100.0 and np.isnan(stats["sd_log_jac"])
    # half the rows folded, masked to the other half
    mixed = np.zeros((2, 6, 6))
    mixed[1] = np.where(np.arange(6)[:, None] < 3, 0.0, 1.0) * (-2 * grid[None, :])
    stats = metrics.jacobian_stats(mixed)
    assert stats["folding_percent"] == pytest.approx(50.0)
    mask = np.arange(6)[:, None].repeat(6, 1) < 3
    assert metrics.jacobian_stats(mixed, mask=mask)["folding_percent"] == 0.0
    with pytest.raises(ValueError):
        metrics.jacobian_stats(np.zeros((3, 6, 6)))


def test_jacobian_stats_accepts_tensors(device):
    scale = np.zeros((1, 2, 6, 6))
    scale[0, 0] = np.arange(6, dtype=np.float64)[:, None]  # x -> 2x along axis 0
    stats = metrics.jacobian_stats(torch.from_numpy(scale).to(device))
    assert stats == metrics.jacobian_stats(scale)
    assert stats["jac_min"] == pytest.approx(2.0)
