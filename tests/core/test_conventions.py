"""Each rule of docs/conventions.md, checked on tiny hand-made examples (rule number in the name)."""

from __future__ import annotations

import torch

import voxreg.transforms as T


def ramp(shape, axis):
    """An image whose value is its index along ``axis``."""
    grid = T.identity_grid(shape, dtype=torch.float64)
    return grid[axis][None, None].clone()


def test_rule2_channel_k_moves_along_axis_k_in_voxels():
    shape = (6, 7, 8)
    for axis in range(3):
        disp = torch.zeros(1, 3, *shape, dtype=torch.float64)
        disp[0, axis] = 1.0
        moved = T.warp(ramp(shape, axis), disp)
        inner = [slice(None)] * 2 + [slice(0, s - 1) for s in shape]
        # the ramp along `axis` reads one voxel further along that axis, and no other axis moves
        assert torch.allclose(moved[tuple(inner)], ramp(shape, axis)[tuple(inner)] + 1)
        for other in set(range(3)) - {axis}:
            moved_other = T.warp(ramp(shape, other), disp)
            assert torch.allclose(moved_other[tuple(inner)], ramp(shape, other)[tuple(inner)])


def test_rule3_resize_keeps_voxel_centres_at_the_corners():
    disp = torch.zeros(1, 2, 5, 9, dtype=torch.float64)
    disp[0, 0] = 2.0
    resized = T.resize_disp(disp, shape=(9, 17))
    assert torch.allclose(resized[0, 0], torch.full((9, 17), 4.0, dtype=torch.float64))
    assert torch.allclose(resized[0, 1], torch.zeros(9, 17, dtype=torch.float64))


def test_rule4_warping_pulls_back():
    moving = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    moving[0, 0, 6, 4] = 1.0
    disp = torch.zeros(1, 2, 9, 9, dtype=torch.float64)
    disp[0, 0] = 2.0  # read two rows further down
    moved = T.warp(moving, disp)
    assert moved[0, 0, 4, 4] == 1.0 and moved.sum() == 1.0


def test_rule5_affine_acts_on_voxel_coordinates_about_the_centre():
    shape = (9, 9)
    moving = torch.zeros(1, 1, *shape, dtype=torch.float64)
    moving[0, 0, 6, 4] = 1.0
    translation = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert T.warp(moving, translation)[0, 0, 4, 4] == 1.0
    # a quarter turn about the centre (4, 4): moved(x) = moving(R (x - c) + c)
    rotation = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    moved = T.warp(moving, rotation)
    (i, j), = torch.nonzero(moved[0, 0] > 0.5).tolist()
    assert (0 * (i - 4) - 1 * (j - 4) + 4, 1 * (i - 4) + 0 * (j - 4) + 4) == (6, 4)
    # affine_to_disp(A) is A x - x
    disp = T.affine_to_disp(translation, shape)
    assert torch.allclose(disp[0, 0], torch.full(shape, 2.0, dtype=torch.float64))


def test_rule6_compose_applies_first_then_second():
    shape = (20, 20)
    moving = 0.5 * ramp(shape, 0) + ramp(shape, 1)  # linear: resampled exactly inside the grid
    inner = (0, 0, slice(5, -5), slice(5, -5))
    first = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    second = torch.tensor([[1.1, 0.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    composed = T.compose(first, second)
    sequential = T.warp(T.warp(moving, first), second)
    assert torch.allclose(T.warp(moving, composed)[inner], sequential[inner], atol=1e-10)
    # the order matters: the other order does not give the same result
    other = T.compose(second, first)
    assert not torch.allclose(T.warp(moving, other)[inner], sequential[inner], atol=1e-3)


def test_rule7_velocity_exponential_and_its_inverse():
    velocity = torch.zeros(1, 2, 10, 10, dtype=torch.float64)
    velocity[0, 1] = -1.5
    assert torch.allclose(T.integrate_velocity(velocity, 5), velocity)
    assert torch.allclose(T.integrate_velocity(T.invert(velocity, velocity=True), 5), -velocity)


def test_rule8_inverse_solves_disp_after_inverse():
    disp = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    rows = torch.arange(16, dtype=torch.float64)
    disp[0, 0] = (0.5 * torch.sin(rows / 3)).unsqueeze(1)
    inverse, residual = T.invert(disp, return_residual=True)
    assert residual.item() < 1e-3
    assert T.compose(disp, inverse)[..., 2:-2, :].abs().max() < 1e-3


def test_rule9_points_follow_the_inverse_transform():
    shape = (15, 15)
    moving = torch.zeros(1, 1, *shape, dtype=torch.float64)
    moving[0, 0, 5, 9] = 1.0
    point = torch.tensor([[[5.0, 9.0]]], dtype=torch.float64)
    disp = torch.zeros(1, 2, *shape, dtype=torch.float64)
    disp[0, 0], disp[0, 1] = 2.0, -3.0
    moved = T.warp(moving, disp)
    carried = T.warp_points(point, T.invert(disp))
    i, j = carried[0, 0].round().long().tolist()
    assert moved[0, 0, i, j] == 1.0 and (i, j) == (3, 12)


def test_rule10_outside_values():
    image = torch.ones(1, 1, 6, 6, dtype=torch.float64)
    disp = torch.full((1, 2, 6, 6), 10.0, dtype=torch.float64)
    assert torch.all(T.warp(image, disp) == 0) and torch.all(T.warp(image, disp, fill_value=5) == 5)
    # a constant field composed with itself doubles, also at the border (border padding)
    assert torch.allclose(T.compose(disp, disp), 2 * disp)


def test_rule11_jacobian_and_folding():
    disp = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    disp[0, 0] = -2 * T.identity_grid((8, 8), dtype=torch.float64)[0]  # x -> -x along axis 0
    assert torch.allclose(T.jacobian_determinant(disp), torch.full((1, 8, 8), -1.0, dtype=torch.float64))
    assert T.folding_fraction(disp).item() == 1.0


def test_rule12_world_displacement_uses_the_image_affine():
    # an oblique grid with anisotropic voxels
    world = torch.tensor([[0.0, 0.0, 2.0, -90], [-1.5, 0.0, 0.0, 120], [0.0, 1.0, 0.2, -60],
                          [0, 0, 0, 1]], dtype=torch.float64)
    disp = torch.randn(1, 3, 5, 6, 4, dtype=torch.float64)
    disp_mm = T.disp_to_world(disp, world)
    # the world position of the voxel a point maps to, minus the world position of the point
    points = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]], dtype=torch.float64)
    mapped = T.warp_points(points, disp)
    homogeneous = lambda p: torch.cat([p, torch.ones_like(p[..., :1])], -1) @ world.T
    expected = (homogeneous(mapped) - homogeneous(points))[..., :3]
    for n, (i, j, k) in enumerate(points[0].long().tolist()):
        assert torch.allclose(disp_mm[0, :, i, j, k], expected[0, n])
    assert torch.allclose(T.disp_from_world(disp_mm, world), disp)
