"""Spatial transforms: the functional core of voxreg.

Every function here is a pure function of tensors: 2D and 3D, batched, differentiable, on CPU and
GPU, in float32 and float64. The conventions (stated once in ``docs/conventions.md``):

* images are ``(B, C, *spatial)``, channels first;
* a displacement ``disp`` is ``(B, ndim, *spatial)`` in voxels on the fixed grid, channel ``k``
  being the displacement along spatial axis ``k`` (``ij`` indexing);
* warping pulls back: ``moved(x) = moving(x + disp(x))``;
* an affine ``(B, ndim, ndim+1)`` or ``(B, ndim+1, ndim+1)`` acts on voxel coordinates and also
  pulls back: ``moved(x) = moving(A x)``; with ``shift_center`` the matrix acts on coordinates
  centred on the middle of the grid, ``A x = M (x - c) + t + c`` with ``c = (shape - 1) / 2``.

The public operations are listed in ``__all__``. A few unchecked kernels (``normalized_identity``,
``voxel_to_normalized_scale``, ``disp_to_grid``, ``sample_grid``, ``scaling_and_squaring``,
``resize_field``) skip validation: :mod:`voxreg.nn`'s layers check shapes once per call and then
use them inside training loops. They follow the same conventions and are not in ``__all__``.

This module is kept whole although it is longer than 600 lines: it is one functional core of
about twenty operations that share the conventions above and the private sampling kernels (the
grid cache, the ``ij`` view of ``grid_sample``, the label sampler); splitting it would scatter
the conventions header that every function relies on.

>>> image = torch.zeros(1, 1, 5, 5)               # (B, C, H, W)
>>> image[0, 0, 2, 3] = 1.0
>>> disp = torch.zeros(1, 2, 5, 5)                # (B, ndim, H, W), voxels, ij
>>> disp[:, 1] = 1.0                              # read one voxel further along axis 1
>>> warp(image, disp)[0, 0, 2]                    # pull-back: moved(x) = image(x + disp(x))
tensor([0., 0., 1., 0., 0.])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from voxreg import _checks

Interp = Literal["linear", "nearest", "label"]

__all__ = [
    "affine_to_disp",
    "compose",
    "disp_from_world",
    "disp_to_world",
    "folding_fraction",
    "identity_grid",
    "integrate_velocity",
    "invert",
    "jacobian_determinant",
    "resize_disp",
    "sample",
    "warp",
    "warp_points",
]


# --------------------------------------------------------------------------------------------
# grids and the sampling kernel
# --------------------------------------------------------------------------------------------

_GRID_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()
_GRID_CACHE_SIZE = 8


def _cached(key: tuple, build) -> Tensor:
    grid = _GRID_CACHE.get(key)
    if grid is None:
        grid = build()
        _GRID_CACHE[key] = grid
        if len(_GRID_CACHE) > _GRID_CACHE_SIZE:
            _GRID_CACHE.popitem(last=False)
    else:
        _GRID_CACHE.move_to_end(key)
    return grid


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Voxel coordinates of a grid, ``(ndim, *shape)``, ``ij`` indexing (``grid[k]`` = index on axis k).

    The result is cached (a few grids, keyed by shape, device and dtype): do not modify it.

    >>> identity_grid((2, 3))
    tensor([[[0., 0., 0.],
             [1., 1., 1.]],
    <BLANKLINE>
            [[0., 1., 2.],
             [0., 1., 2.]]])
    """
    shape = _checks.check_shape(shape)
    dtype = dtype or torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.device("cpu")

    def build() -> Tensor:
        axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"))

    return _cached(("ij", shape, device, dtype), build)


def normalized_identity(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Identity sampling grid ``(*shape, ndim)`` in ``ij`` order, values in [-1, 1]
    (``align_corners=True``: -1 and 1 are the first and last voxel centres). Unchecked and
    cached: do not modify it.

    >>> normalized_identity((3, 2), torch.device("cpu"), torch.float32)[:, :, 0]
    tensor([[-1., -1.],
            [ 0.,  0.],
            [ 1.,  1.]])
    """

    def build() -> Tensor:
        axes = [torch.linspace(-1.0, 1.0, s, device=device, dtype=dtype) if s > 1
                else torch.zeros(1, device=device, dtype=dtype) for s in shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)

    return _cached(("norm", tuple(shape), device, dtype), build)


def voxel_to_normalized_scale(shape: Sequence[int], device, dtype) -> Tensor:
    """Per-axis factor ``2 / (n - 1)`` turning voxels into normalised grid units, ``ij`` order.

    >>> voxel_to_normalized_scale((5, 3), "cpu", torch.float32)
    tensor([0.5000, 1.0000])
    """
    return torch.tensor([2.0 / max(s - 1, 1) for s in shape], device=device, dtype=dtype)


def _split_factor(batch: int, first_axis: int, device: torch.device, numel: int) -> int:
    """How many pieces to cut a 3D sampling job into so that torch's CPU kernel, which parallelises
    over the batch only, uses every core. 1 means no split."""
    if device.type != "cpu" or batch != 1 or numel < 1 << 16:
        return 1
    threads = torch.get_num_threads()
    for pieces in range(min(threads, first_axis), 1, -1):
        if first_axis % pieces == 0:
            return pieces
    return 1


def _grid_sample(
    image: Tensor, grid: Tensor, mode: str, padding: str, accumulate: Tensor | None = None
) -> Tensor:
    """Sample ``image (B, C, *spatial)`` at ``grid (B, *out_spatial, ndim)``.

    ``grid`` holds normalised coordinates in ``ij`` order (voxreg's), not grid_sample's ``xy``:
    instead of flipping the grid (a copy), the image is handed to ``F.grid_sample`` with its
    spatial axes reversed (a view), which makes ``ij`` coordinates the ``xy`` of that view.

    On CPU torch runs its 3D kernel on one thread per batch element; a single volume's grid is
    viewed as ``k`` batch elements (the image expanded, not copied) so that ``k`` threads share it.

    With ``accumulate`` (no autograd), the samples are added into that tensor in place and it is
    returned; this avoids a copy when the pieces come back in another layout.
    """
    ndim = image.dim() - 2
    reversed_view = image.permute(0, 1, *range(ndim + 1, 1, -1))
    if ndim == 3:
        batch, channels = image.shape[:2]
        out_shape = tuple(grid.shape[1:4])
        pieces = _split_factor(batch, out_shape[0], image.device, math.prod(out_shape))
        if pieces > 1:
            piece_grid = grid.reshape(pieces, out_shape[0] // pieces, *out_shape[1:], 3)
            out = F.grid_sample(
                reversed_view.expand(pieces, -1, -1, -1, -1), piece_grid, mode=mode,
                padding_mode=padding, align_corners=True,
            )
            if channels == 1:
                out = out.reshape(1, 1, *out_shape)
            elif accumulate is not None:
                target = accumulate.view(channels, pieces, out_shape[0] // pieces, *out_shape[1:])
                target.transpose(0, 1).add_(out)
                return accumulate
            else:
                out = out.transpose(0, 1).reshape(1, channels, *out_shape)
            return accumulate.add_(out) if accumulate is not None else out
    out = F.grid_sample(reversed_view, grid, mode=mode, padding_mode=padding, align_corners=True)
    return accumulate.add_(out) if accumulate is not None else out


def disp_to_grid(disp: Tensor) -> Tensor:
    """Sampling grid ``(B, *spatial, ndim)`` (normalised, ``ij``) of ``x + disp(x)``: one pass.
    Unchecked: ``disp`` must be a float ``(B, ndim, *spatial)``.

    >>> disp_to_grid(torch.zeros(1, 2, 3, 3))[0, 1, 1]   # the middle voxel
    tensor([0., 0.])
    """
    shape = tuple(disp.shape[2:])
    identity = normalized_identity(shape, disp.device, disp.dtype)
    scale = voxel_to_normalized_scale(shape, disp.device, disp.dtype)
    return torch.addcmul(identity, disp.movedim(1, -1), scale)


def _sample_disp(image: Tensor, disp: Tensor, mode: str = "bilinear", padding: str = "zeros") -> Tensor:
    """Unchecked pull-back warp by a dense displacement (shapes already validated)."""
    return _grid_sample(image, disp_to_grid(disp), mode, padding)


def _centered_matrix(affine: Tensor, shape: Sequence[int], shift_center: bool) -> Tensor:
    """Turn ``(B, n, n+1)`` acting on centred coordinates into one acting on voxel indices."""
    if not shift_center:
        return affine
    ndim = affine.shape[1]
    center = torch.tensor([(s - 1) / 2.0 for s in shape], device=affine.device, dtype=affine.dtype)
    linear = affine[:, :, :ndim]
    translation = affine[:, :, ndim] + center - linear @ center
    return torch.cat([linear, translation.unsqueeze(-1)], dim=-1)


def _affine_to_grid(affine: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sampling grid (normalised, ``ij``) for a voxel-index affine ``(B, n, n+1)`` (pull-back)."""
    ndim = len(shape)
    dtype, device = affine.dtype, affine.device
    # normalised u = s * x - 1 (align_corners=True), so u_out = S L S^-1 (u_in + 1) + S t - 1
    scale = voxel_to_normalized_scale(shape, device, dtype)
    linear = scale[:, None] * affine[:, :, :ndim] / scale[None, :]
    translation = linear.sum(-1) + scale * affine[:, :, ndim] - 1.0
    identity = normalized_identity(shape, device, dtype).reshape(1, -1, ndim)
    grid = torch.baddbmm(translation.unsqueeze(1), identity.expand(affine.shape[0], -1, -1),
                         linear.transpose(1, 2))
    return grid.reshape(affine.shape[0], *shape, ndim)


# --------------------------------------------------------------------------------------------
# warping
# --------------------------------------------------------------------------------------------


def warp(
    image: Tensor,
    transform: Tensor,
    interp: Interp = "linear",
    fill_value: float = 0.0,
    shift_center: bool = True,
) -> Tensor:
    """Warp ``image`` by a dense displacement or an affine matrix (pull-back).

    Args:
        image: ``(B, C, *spatial)`` moving image; integer label maps are allowed with
            ``interp="nearest"`` and come back with their dtype and exact values.
        transform: a displacement ``(B, ndim, *spatial)`` in voxels on the fixed grid
            (``moved(x) = image(x + disp(x))``), or an affine ``(B, ndim, ndim+1)`` /
            ``(B, ndim+1, ndim+1)`` (or without the batch axis) in voxel coordinates
            (``moved(x) = image(A x)``). A batch of 1 on either side is broadcast.
        interp: ``"linear"``, ``"nearest"`` or ``"label"`` (label maps: at each point the
            label whose linearly interpolated indicator is largest, as ANTs' ``genericLabel``;
            smoother boundaries than nearest; the dtype is kept; not differentiable).
        fill_value: value of samples that fall outside the image.
        shift_center: affines only: the matrix acts on coordinates centred on the grid's middle,
            ``(shape - 1) / 2``, as VoxelMorph's affine layers do.

    Returns:
        ``(B, C, *spatial)`` moved image on the fixed grid (the displacement's grid; the
        image's own grid for an affine).

    >>> image = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> disp = torch.zeros(1, 2, 4, 4)
    >>> disp[:, 1] = 1.0                          # one voxel along axis 1 (columns)
    >>> warp(image, disp)[0, 0, 0]                # row 0 read one column further; 0 outside
    tensor([1., 2., 3., 0.])
    >>> shift = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])   # (ndim, ndim+1): A x = x + (0, 1)
    >>> torch.allclose(warp(image, shift), warp(image, disp))
    True
    >>> labels = torch.tensor([[[[0, 1], [2, 3]]]])
    >>> warp(labels, torch.zeros(1, 2, 2, 2), interp="nearest")   # integer labels keep their dtype
    tensor([[[[0, 1],
              [2, 3]]]])
    """
    ndim = _checks.check_image(image, "image")
    _checks.check_interp(interp)
    _checks.as_tensor(transform, "transform")
    if not math.isfinite(fill_value):
        raise ValueError(f"fill_value must be finite, got {fill_value}")
    if _checks.is_affine(transform):
        affine = _checks.check_affine(transform, ndim, "transform")
        _checks.check_finite(affine, "transform")
        batch = _checks.check_batch(image.shape[0], affine.shape[0], "image", "transform")
        shape = tuple(image.shape[2:])
        affine = _centered_matrix(affine.to(_float_dtype(image)), shape, shift_center)
        grid = _affine_to_grid(affine.expand(batch, -1, -1), shape)
    else:
        if transform.dim() != image.dim():
            raise ValueError(
                f"transform must be a displacement (B, {ndim}, *spatial) or an affine "
                f"(B, {ndim}, {ndim + 1}) for a {ndim}D image, got {tuple(transform.shape)}"
            )
        _checks.check_disp(transform, "transform", ndim)
        if transform.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"transform must have the image's spatial shape, (B, {ndim}, "
                f"{', '.join(map(str, image.shape[2:]))}), got {tuple(transform.shape)}; "
                "resample the image onto the field's grid first"
            )
        _checks.check_finite(transform, "transform")
        batch = _checks.check_batch(image.shape[0], transform.shape[0], "image", "transform")
        grid = disp_to_grid(transform.to(_float_dtype(image))).expand(batch, *([-1] * (ndim + 1)))
    _checks.check_finite(image, "image") if image.is_floating_point() else None
    return sample_grid(image, grid, interp, fill_value)


def sample(
    image: Tensor,
    coords: Tensor,
    interp: Interp = "linear",
    fill_value: float = 0.0,
) -> Tensor:
    """Sample ``image`` at absolute voxel coordinates of its own grid, onto any other grid.

    ``out[b, :, y] = image[b, :, coords[b, :, y]]``: the pull-back of :func:`warp` between two
    grids. ``coords`` lives on the output grid and says, for each output voxel, where to read in
    the image, in the image's voxel indices (``ij`` order, voxel centres at integers). With
    ``coords = identity + disp`` on the image's own grid it is :func:`warp` by ``disp``.

    Args:
        image: ``(B, C, *in_spatial)``; integer label maps keep their dtype with
            ``interp="nearest"`` or ``"label"``.
        coords: ``(B, ndim, *out_spatial)`` voxel coordinates into ``image`` (a batch of 1 on
            either side is broadcast).
        interp: ``"linear"``, ``"nearest"`` or ``"label"`` (as in :func:`warp`).
        fill_value: value of samples that fall outside the image.

    Returns:
        ``(B, C, *out_spatial)``.

    Raises:
        ValueError: for shapes that do not match, or non-finite coordinates.

    >>> image = torch.arange(6.0).view(1, 1, 2, 3)        # a 2x3 image
    >>> coords = torch.tensor([[[[0.0, 1.0, 5.0]], [[0.5, 2.0, 0.0]]]])  # 3 points, 1x3 grid
    >>> sample(image, coords)
    tensor([[[[0.5000, 5.0000, 0.0000]]]])
    """
    _checks.check_image(image, "image")
    _checks.check_interp(interp)
    ndim = image.dim() - 2
    if coords.dim() != ndim + 2 or coords.shape[1] != ndim:
        raise ValueError(f"coords must be (B, {ndim}, *out_spatial) voxel coordinates for a "
                         f"{ndim}D image, got {tuple(coords.shape)}")
    _checks.check_finite(coords, "coords")
    if not math.isfinite(fill_value):
        raise ValueError(f"fill_value must be finite, got {fill_value}")
    batch = _checks.check_batch(image.shape[0], coords.shape[0], "image", "coords")
    dtype = _float_dtype(image)
    shape = tuple(image.shape[2:])
    scale = voxel_to_normalized_scale(shape, coords.device, dtype)
    grid = (coords.to(dtype).movedim(1, -1) * scale - 1.0).expand(batch, *([-1] * (ndim + 1)))
    return sample_grid(image, grid, interp, fill_value)


def _float_dtype(image: Tensor) -> torch.dtype:
    return image.dtype if image.is_floating_point() else torch.get_default_dtype()


def sample_grid(image: Tensor, grid: Tensor, interp: Interp, fill_value: float) -> Tensor:
    """Sample ``image (B', C, *spatial)`` at ``grid (B, *out_spatial, ndim)`` (normalised, ``ij``;
    ``B'`` is ``B`` or 1), handling integer labels and the fill value. Unchecked: both must be
    validated already (``interp``: ``"linear"``, ``"nearest"`` or ``"label"``).

    >>> image = torch.arange(4.0).reshape(1, 1, 2, 2)
    >>> sample_grid(image, disp_to_grid(torch.zeros(1, 2, 2, 2)), "linear", 0.0)
    tensor([[[[0., 1.],
              [2., 3.]]]])
    """
    batch = grid.shape[0]
    if image.shape[0] != batch:
        image = image.expand(batch, *image.shape[1:])
    if interp == "label":
        return _sample_labels(image, grid, fill_value)
    mode = "bilinear" if interp == "linear" else "nearest"
    if not image.is_floating_point():
        if interp == "linear":
            image = image.to(torch.get_default_dtype())
        else:
            # float64 keeps every integer label up to 2**53 exact
            values = image.to(torch.float64) - fill_value
            moved = _grid_sample(values, grid.to(torch.float64), mode, "zeros") + fill_value
            return moved.round().to(image.dtype)
    if fill_value != 0.0:
        return _grid_sample(image - fill_value, grid, mode, "zeros") + fill_value
    return _grid_sample(image, grid, mode, "zeros")


_LABEL_CHUNK = 1 << 16  # output voxels per pass of the label sampler (~20 MB of scratch)


def _sample_labels(image: Tensor, grid: Tensor, fill_value: float) -> Tensor:
    """Label interpolation: at every point, the label whose indicator, linearly interpolated,
    is largest (ANTs' ``genericLabel``; smoother boundaries than nearest, without mixing
    labels).

    That is the label with the largest total linear weight among the ``2**ndim`` corners of the
    point's cell, so the cost does not grow with the number of labels. Corners outside the image
    count as ``fill_value``. Ties go to the first corner in memory order (at a voxel centre: that
    voxel's label, so the identity reproduces the map exactly).

    Args:
        image: ``(B, C, *spatial)`` labels (any dtype; the values are compared exactly).
        grid: ``(B, *out_spatial, ndim)`` normalised ``ij`` coordinates (``align_corners``).
    """
    if image.dtype in (torch.uint16, torch.uint32):  # torch's gather lacks these: compute in int64
        return _sample_labels(image.to(torch.int64), grid, fill_value).to(image.dtype)
    batch, channels = image.shape[:2]
    shape = image.shape[2:]
    ndim = len(shape)
    out_shape = grid.shape[1:-1]
    sizes = torch.tensor(list(shape), device=grid.device)
    half_span = torch.tensor([(n - 1) / 2.0 for n in shape], device=grid.device, dtype=torch.float64)
    corners = torch.cartesian_prod(*[torch.tensor([0, 1], device=grid.device)] * ndim)
    corners = corners.reshape(-1, ndim)  # (K, ndim), first axis slowest
    strides = torch.tensor([math.prod(shape[a + 1:]) for a in range(ndim)], device=grid.device)
    if not image.is_floating_point() and not float(fill_value).is_integer():
        raise ValueError(f"fill_value must be an integer for integer labels, got {fill_value}")
    fill = torch.tensor(fill_value, dtype=image.dtype, device=image.device)
    out = torch.empty(batch, channels, *out_shape, dtype=image.dtype, device=image.device)
    flat_out = out.reshape(batch, channels, -1)
    for b in range(batch):
        coords_all = (grid[b].reshape(-1, ndim).to(torch.float64) + 1.0) * half_span
        volumes = image[b].reshape(channels, -1)
        for start in range(0, coords_all.shape[0], _LABEL_CHUNK):
            coords = coords_all[start:start + _LABEL_CHUNK]
            lower = coords.floor()
            frac = coords - lower
            lower = lower.long()
            index = lower[:, None, :] + corners  # (n, K, ndim)
            valid = ((index >= 0) & (index < sizes)).all(-1)
            flat = (index.clamp(min=0) * strides).sum(-1).clamp(max=volumes.shape[1] - 1)
            weights = torch.where(corners.bool(), frac[:, None, :], 1.0 - frac[:, None, :])
            weights = weights.prod(-1).to(torch.float32)  # (n, K)
            for c in range(channels):
                values = torch.where(valid, volumes[c][flat], fill)  # (n, K)
                result = values[:, 0].clone()
                mixed = (values != values[:, :1]).any(1)  # cells with more than one label
                if bool(mixed.any()):
                    mixed_values, mixed_weights = values[mixed], weights[mixed]
                    # total weight of each corner's label: sum over the corners carrying it
                    same = mixed_values[:, :, None] == mixed_values[:, None, :]  # (m, K, K)
                    score = (same * mixed_weights[:, None, :]).sum(-1)
                    best = score.argmax(-1, keepdim=True)
                    result[mixed] = mixed_values.gather(1, best)[:, 0]
                flat_out[b, c, start:start + coords.shape[0]] = result
    return out


def affine_to_disp(affine: Tensor, shape: Sequence[int], shift_center: bool = True) -> Tensor:
    """Dense displacement equal to an affine: ``disp(x) = A x - x`` on a grid of ``shape``.

    Args:
        affine: ``(B, ndim, ndim+1)`` or ``(B, ndim+1, ndim+1)`` (or unbatched) in voxel coordinates.
        shape: spatial shape of the grid, ``ndim`` integers.
        shift_center: the matrix acts on coordinates centred on ``(shape - 1) / 2``.

    Returns:
        ``(B, ndim, *shape)`` displacement in voxels.

    >>> shift = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])   # x -> x + (0, 1)
    >>> affine_to_disp(shift, (4, 4))[0, :, 0, 0]
    tensor([0., 1.])
    >>> affine_to_disp(shift, (4, 4)).shape
    torch.Size([1, 2, 4, 4])
    """
    shape = _checks.check_shape(shape)
    affine = _checks.check_affine(affine, len(shape), "affine")
    _checks.check_finite(affine, "affine")
    ndim = len(shape)
    matrix = _centered_matrix(affine, shape, shift_center)
    grid = identity_grid(shape, affine.device, affine.dtype).reshape(ndim, -1)
    linear = matrix[:, :, :ndim] - torch.eye(ndim, device=affine.device, dtype=affine.dtype)
    disp = linear @ grid + matrix[:, :, ndim:]
    return disp.reshape(affine.shape[0], ndim, *shape)


# --------------------------------------------------------------------------------------------
# composition, integration, inversion, resizing
# --------------------------------------------------------------------------------------------


def _warp_field(field: Tensor, disp: Tensor) -> Tensor:
    """Resample a displacement field at ``x + disp(x)``; outside the grid the border value holds
    (a field extends beyond its grid more naturally than by zeros)."""
    return _sample_disp(field, disp, "bilinear", "border")


def compose(first: Tensor, second: Tensor, shift_center: bool = True) -> Tensor:
    """The transform that applies ``first`` then ``second`` to an image.

    ``warp(warp(image, first), second) == warp(image, compose(first, second))`` (up to
    interpolation). In point terms, with pull-back maps ``phi(x) = x + disp(x)`` the result maps
    ``x -> phi_first(phi_second(x))``.

    Two affines give an affine (``(B, n, n+1)``, about the same centre). Otherwise the result is a
    displacement ``(B, ndim, *spatial)`` on the grid of the dense argument (the grid of ``second``
    when both are dense): that is the final fixed grid. An affine combined with a dense field is
    first turned into a field on that grid.

    >>> shift = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])   # x -> x + (0, 1)
    >>> compose(shift, shift)                                       # two affines: an affine
    tensor([[[1., 0., 0.],
             [0., 1., 2.]]])
    >>> disp = torch.zeros(1, 2, 4, 4)
    >>> disp[:, 0] = 1.0
    >>> compose(disp, disp)[0, :, 0, 0]                             # fields: a field, in voxels
    tensor([2., 0.])
    """
    _checks.as_tensor(first, "first")
    _checks.as_tensor(second, "second")
    first_affine, second_affine = _checks.is_affine(first), _checks.is_affine(second)
    if first_affine and second_affine:
        a = _checks.check_affine(first, None, "first")
        b = _checks.check_affine(second, a.shape[1], "second")
        _checks.check_batch(a.shape[0], b.shape[0], "first", "second")
        return _compose_affine(a, b)
    if first_affine:
        ndim = _checks.check_disp(second, "second")
        first = affine_to_disp(_checks.check_affine(first, ndim, "first"), second.shape[2:], shift_center)
    elif second_affine:
        ndim = _checks.check_disp(first, "first")
        second = affine_to_disp(_checks.check_affine(second, ndim, "second"), first.shape[2:], shift_center)
    else:
        ndim = _checks.check_disp(first, "first")
        _checks.check_disp(second, "second", ndim)
    if first.shape[2:] != second.shape[2:]:
        raise ValueError(
            f"first and second must share a grid, got spatial shapes {tuple(first.shape[2:])} "
            f"and {tuple(second.shape[2:])}"
        )
    batch = _checks.check_batch(first.shape[0], second.shape[0], "first", "second")
    _checks.check_finite(first, "first")
    _checks.check_finite(second, "second")
    first = first.expand(batch, *first.shape[1:])
    second = second.expand(batch, *second.shape[1:])
    return second + _warp_field(first, second)


def _homogeneous(affine: Tensor) -> Tensor:
    ndim = affine.shape[1]
    bottom = torch.zeros(affine.shape[0], 1, ndim + 1, device=affine.device, dtype=affine.dtype)
    bottom[:, 0, ndim] = 1
    return torch.cat([affine, bottom], dim=1)


def _compose_affine(first: Tensor, second: Tensor) -> Tensor:
    ndim = first.shape[1]
    # moved(x) = image(A1 A2 x): the product, restricted to its top rows
    return (_homogeneous(first) @ _homogeneous(second))[:, :ndim]


def integrate_velocity(velocity: Tensor, steps: int = 7, downsize: int = 1) -> Tensor:
    """Integrate a stationary velocity field by scaling and squaring.

    ``disp = exp(velocity)``: the field is divided by ``2**steps`` and composed with itself
    ``steps`` times. ``steps=0`` returns the field unchanged (a plain displacement model).

    Args:
        velocity: ``(B, ndim, *spatial)`` in voxels.
        steps: number of squarings, >= 0.
        downsize: integrate on a grid ``downsize`` times coarser and resize the result back (as
            the original VoxelMorph did with ``int_downsize=2``): about ``downsize**ndim`` times
            less work, for a field that is smooth at that scale.

    Returns:
        ``(B, ndim, *spatial)`` displacement of the diffeomorphism ``exp(velocity)``.

    >>> velocity = torch.full((1, 2, 5, 5), 0.5)   # a constant velocity integrates to itself
    >>> integrate_velocity(velocity)[0, :, 2, 2]
    tensor([0.5000, 0.5000])
    >>> integrate_velocity(velocity, steps=0) is velocity
    True
    """
    _checks.check_disp(velocity, "velocity")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not isinstance(downsize, int) or downsize < 1:
        raise ValueError(f"downsize must be a positive integer, got {downsize!r}")
    _checks.check_finite(velocity, "velocity")
    if downsize == 1 or steps == 0:
        return scaling_and_squaring(velocity, steps)
    shape = tuple(velocity.shape[2:])
    coarse = tuple(max(1, int(round(s / downsize))) for s in shape)
    return resize_field(scaling_and_squaring(resize_field(velocity, coarse), steps), shape)


def scaling_and_squaring(velocity: Tensor, steps: int, identity: Tensor | None = None) -> Tensor:
    """Scaling and squaring without checks (``velocity`` a float ``(B, ndim, *spatial)``,
    ``steps >= 0``; ``identity``: :func:`normalized_identity` of the grid, to reuse a cached one).

    The field is kept in normalised grid units (``ij``, channels first) during the squarings, so
    each step costs one pass to build the sampling grid, the sampling, and one addition; without
    autograd the addition is made in place.

    >>> scaling_and_squaring(torch.full((1, 2, 3, 3), 0.25), 3)[0, :, 1, 1]
    tensor([0.2500, 0.2500])
    """
    if steps == 0:
        return velocity
    shape = tuple(velocity.shape[2:])
    ndim = len(shape)
    scale = voxel_to_normalized_scale(shape, velocity.device, velocity.dtype)
    scale = scale.view(1, ndim, *([1] * ndim))
    if identity is None:
        identity = normalized_identity(shape, velocity.device, velocity.dtype)
    field = velocity * (scale / 2**steps)
    in_place = not (torch.is_grad_enabled() and field.requires_grad)
    for _ in range(steps):
        grid = identity + field.movedim(1, -1)
        if in_place:
            field = _grid_sample(field, grid, "bilinear", "border", accumulate=field)
        else:
            field = field + _grid_sample(field, grid, "bilinear", "border")
    return field / scale


def resize_disp(
    disp: Tensor, factor: float | None = None, shape: Sequence[int] | None = None
) -> Tensor:
    """Resample a displacement field to another resolution and rescale its values.

    Give either ``factor`` (new size = round(size * factor)) or the target ``shape``. The grids
    are matched corner to corner (voxel 0 to voxel 0, last voxel to last voxel, as
    ``align_corners=True``), and each component is scaled by ``(new - 1) / (old - 1)`` along its
    axis, so an affine field stays exactly the same transform.

    Returns:
        ``(B, ndim, *new_shape)``.

    >>> disp = torch.zeros(1, 2, 5, 5)
    >>> disp[:, 1] = 1.0                          # one voxel of the 5x5 grid
    >>> resize_disp(disp, factor=2)[0, :, 0, 0]   # 9 / 4 voxels of the 10x10 grid
    tensor([0.0000, 2.2500])
    >>> resize_disp(disp, shape=(9, 9)).shape
    torch.Size([1, 2, 9, 9])
    """
    ndim = _checks.check_disp(disp, "disp")
    old = tuple(disp.shape[2:])
    if (factor is None) == (shape is None):
        raise ValueError("give exactly one of factor or shape")
    if factor is not None:
        if not (isinstance(factor, (int, float)) and factor > 0 and math.isfinite(factor)):
            raise ValueError(f"factor must be a positive number, got {factor!r}")
        new = tuple(max(1, int(round(s * factor))) for s in old)
    else:
        new = _checks.check_shape(shape)
        if len(new) != ndim:
            raise ValueError(f"shape must have {ndim} entries for this field, got {new}")
    return resize_field(disp, new)


def resize_field(disp: Tensor, new: tuple[int, ...]) -> Tensor:
    """:func:`resize_disp` to the shape ``new`` without checks (``disp`` a float
    ``(B, ndim, *spatial)``, ``new`` a tuple of ``ndim`` sizes); returns ``disp`` itself when the
    shape is already ``new``.

    >>> resize_field(torch.ones(1, 2, 3, 3), (5, 5))[0, :, 0, 0]
    tensor([2., 2.])
    """
    old = tuple(disp.shape[2:])
    if new == old:
        return disp
    mode = "bilinear" if len(new) == 2 else "trilinear"
    scale = torch.tensor(
        [(n - 1) / (o - 1) if o > 1 else 1.0 for n, o in zip(new, old)],
        device=disp.device, dtype=disp.dtype,
    ).view(1, -1, *([1] * len(new)))
    if math.prod(new) < math.prod(old):  # shrink first: fewer values to scale
        return F.interpolate(disp, size=new, mode=mode, align_corners=True) * scale
    return F.interpolate(disp * scale, size=new, mode=mode, align_corners=True)


def invert(
    transform: Tensor,
    velocity: bool = False,
    iterations: int = 50,
    tolerance: float = 1e-3,
    return_residual: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Invert a transform.

    * affine ``(B, n, n+1)`` / ``(B, n+1, n+1)``: exact matrix inverse, returned as ``(B, n, n+1)``;
    * velocity field (``velocity=True``): the inverse of ``exp(v)`` is ``exp(-v)``, so the
      negated velocity is returned (integrate it as usual);
    * displacement: fixed-point iteration ``u <- -disp(y + u(y))`` until the largest change is
      below ``tolerance`` voxels or ``iterations`` are done. It converges where the field is
      invertible and not too steep (|grad disp| < 1).

    With ``return_residual`` also returns, per batch element, the mean norm (voxels) of
    ``compose(inverse, transform)`` (for fields; 0 for affines and velocities), so a caller can
    tell how well the inverse holds.

    >>> shift = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])   # x -> x + (0, 1)
    >>> invert(shift)
    tensor([[[ 1.,  0.,  0.],
             [ 0.,  1., -1.]]])
    >>> disp = torch.full((1, 2, 6, 6), 0.5)
    >>> inverse, residual = invert(disp, return_residual=True)
    >>> inverse[0, :, 3, 3], float(residual)
    (tensor([-0.5000, -0.5000]), 0.0)
    """
    _checks.as_tensor(transform, "transform")
    if _checks.is_affine(transform):
        affine = _checks.check_affine(transform, None, "transform")
        _checks.check_finite(affine, "transform")
        ndim = affine.shape[1]
        inverse = torch.linalg.inv(_homogeneous(affine))[:, :ndim]
        residual = torch.zeros(affine.shape[0], device=affine.device, dtype=affine.dtype)
    else:
        _checks.check_disp(transform, "transform")
        _checks.check_finite(transform, "transform")
        if velocity:
            inverse = -transform
            residual = torch.zeros(transform.shape[0], device=transform.device, dtype=transform.dtype)
        else:
            if not isinstance(iterations, int) or iterations < 1:
                raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
            inverse = -transform
            for _ in range(iterations):
                updated = -_warp_field(transform, inverse)
                change = (updated - inverse).abs().max()
                inverse = updated
                if change < tolerance:
                    break
            # phi(psi(y)) - y = u(y) + d(y + u(y))
            error = inverse + _warp_field(transform, inverse)
            residual = error.norm(dim=1).flatten(1).mean(1)
    return (inverse, residual) if return_residual else inverse


# --------------------------------------------------------------------------------------------
# points
# --------------------------------------------------------------------------------------------


def warp_points(
    points: Tensor,
    transform: Tensor,
    shape: Sequence[int] | None = None,
    shift_center: bool = True,
) -> Tensor:
    """Map points through a transform: ``p -> p + disp(p)`` (or ``A p`` for an affine).

    ``points`` are ``(B, P, ndim)`` voxel coordinates (``ij`` order, like the field's channels);
    the displacement is interpolated linearly at each point (border values outside the grid).

    Warping an image pulls back (``moved(x) = moving(x + disp(x))``), so to carry annotations
    made on the *moving* image into the *moved* image, pass the inverse transform: the field that
    maps moving positions to fixed ones (for an affine, ``invert(A)`` or
    ``affine_to_disp(invert(A), shape)``; for a velocity model, the field integrated from
    ``-velocity``; for a displacement, ``invert(disp)``).

    Args:
        points: ``(B, P, ndim)`` or ``(P, ndim)`` voxel coordinates.
        transform: displacement ``(B, ndim, *spatial)`` or affine matrix.
        shape: grid shape, needed for an affine with ``shift_center``.

    Returns:
        points of the same shape, moved.

    >>> disp = torch.zeros(1, 2, 4, 4)
    >>> disp[:, 1] = 1.0
    >>> warp_points(torch.tensor([[1.0, 1.0]]), disp)   # (P, ndim) voxel coordinates, ij
    tensor([[1., 2.]])
    """
    _checks.as_tensor(points, "points")
    _checks.as_tensor(transform, "transform")
    unbatched = points.dim() == 2
    if unbatched:
        points = points.unsqueeze(0)
    if points.dim() != 3 or points.shape[-1] not in (2, 3):
        raise ValueError(f"points must have shape (B, P, 2) or (B, P, 3), got {tuple(points.shape)}")
    if not points.is_floating_point():
        points = points.to(torch.get_default_dtype())
    _checks.check_finite(points, "points")
    ndim = points.shape[-1]
    if _checks.is_affine(transform):
        affine = _checks.check_affine(transform, ndim, "transform").to(points.dtype)
        if shift_center:
            if shape is None:
                raise ValueError("shape is required to warp points by an affine with shift_center")
            affine = _centered_matrix(affine, _checks.check_shape(shape), True)
        _checks.check_batch(points.shape[0], affine.shape[0], "points", "transform")
        moved = points @ affine[:, :, :ndim].transpose(1, 2) + affine[:, :, ndim].unsqueeze(1)
    else:
        _checks.check_disp(transform, "transform", ndim)
        _checks.check_finite(transform, "transform")
        batch = _checks.check_batch(points.shape[0], transform.shape[0], "points", "transform")
        grid_shape = transform.shape[2:]
        scale = voxel_to_normalized_scale(grid_shape, points.device, points.dtype)
        locations = points * scale - 1.0  # (B, P, ndim), normalised, ij
        locations = locations.expand(batch, -1, -1).reshape(batch, -1, *([1] * (ndim - 1)), ndim)
        field = transform.to(points.dtype).expand(batch, *transform.shape[1:])
        sampled = _grid_sample(field, locations, "bilinear", "border")
        moved = points + sampled.reshape(batch, ndim, -1).transpose(1, 2)
    return moved[0] if unbatched else moved


# --------------------------------------------------------------------------------------------
# Jacobian
# --------------------------------------------------------------------------------------------


def _gradient(field: Tensor, axis: int) -> Tensor:
    """Finite difference along a spatial axis: central inside, one-sided at the borders
    (``numpy.gradient``'s rule). ``field`` is ``(B, C, *spatial)``; ``axis`` counts spatial axes."""
    dim = axis + 2
    size = field.shape[dim]
    if size < 2:
        return torch.zeros_like(field)
    forward = field.narrow(dim, 1, size - 1) - field.narrow(dim, 0, size - 1)
    if size == 2:
        return torch.cat([forward, forward], dim)
    central = (field.narrow(dim, 2, size - 2) - field.narrow(dim, 0, size - 2)) / 2
    return torch.cat([forward.narrow(dim, 0, 1), central, forward.narrow(dim, size - 2, 1)], dim)


def jacobian_determinant(disp: Tensor) -> Tensor:
    """Determinant of the Jacobian of ``x -> x + disp(x)``.

    Derivatives are finite differences in voxel units (central inside, one-sided at the border).

    Returns:
        ``(B, *spatial)``; values <= 0 mark folding.

    >>> jacobian_determinant(torch.zeros(1, 2, 3, 3))     # the identity
    tensor([[[1., 1., 1.],
             [1., 1., 1.],
             [1., 1., 1.]]])
    >>> stretch = affine_to_disp(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (3, 3))
    >>> jacobian_determinant(stretch)[0, 1, 1]           # twice as long along axis 0
    tensor(2.)
    """
    ndim = _checks.check_disp(disp, "disp")
    _checks.check_finite(disp, "disp")
    # jac[i][j] = d(x_i + disp_i) / d x_j
    derivatives = [_gradient(disp, axis) for axis in range(ndim)]  # each (B, ndim, *spatial)
    jac = [[derivatives[j][:, i] + (1.0 if i == j else 0.0) for j in range(ndim)] for i in range(ndim)]
    if ndim == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )


def folding_fraction(disp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Share of voxels (within ``mask`` if given) whose Jacobian determinant is <= 0.

    Args:
        disp: ``(B, ndim, *spatial)``.
        mask: ``(B, 1, *spatial)``, ``(B, *spatial)`` or ``(*spatial)``; non-zero = counted.

    Returns:
        ``(B,)`` fractions in [0, 1] (multiply by 100 for a percentage).

    >>> flip = affine_to_disp(torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (4, 4))
    >>> folding_fraction(torch.cat([torch.zeros(1, 2, 4, 4), flip]))   # identity, mirror
    tensor([0., 1.])
    """
    det = jacobian_determinant(disp)
    folded = (det <= 0).to(disp.dtype)
    if mask is None:
        return folded.flatten(1).mean(1)
    _checks.as_tensor(mask, "mask")
    spatial = tuple(disp.shape[2:])
    if tuple(mask.shape[-len(spatial):]) != spatial:
        raise ValueError(f"mask must have spatial shape {spatial}, got {tuple(mask.shape)}")
    mask = mask.reshape(-1, *spatial) if mask.dim() > len(spatial) else mask.unsqueeze(0)
    if mask.shape[0] not in (1, det.shape[0]):
        raise ValueError(f"mask batch ({mask.shape[0]}) must be 1 or match disp ({det.shape[0]})")
    weights = (mask != 0).to(disp.dtype).expand_as(folded)
    count = weights.flatten(1).sum(1)
    if (count == 0).any():
        raise ValueError("mask selects no voxel")
    return (folded * weights).flatten(1).sum(1) / count


# --------------------------------------------------------------------------------------------
# world space


def _vox2world_linear(vox2world: Tensor | object, ndim: int, like: Tensor) -> Tensor:
    matrix = torch.as_tensor(vox2world, dtype=like.dtype, device=like.device)
    if matrix.shape not in ((ndim + 1, ndim + 1), (ndim, ndim + 1), (ndim, ndim)):
        raise ValueError(
            f"vox2world must be a ({ndim + 1}, {ndim + 1}) voxel-to-world matrix (a NIfTI affine), "
            f"got shape {tuple(matrix.shape)}"
        )
    return matrix[:ndim, :ndim]


def disp_to_world(disp: Tensor, vox2world: Tensor | object) -> Tensor:
    """Voxel displacement ``(B, ndim, *spatial)`` to world units (e.g. RAS mm) with the grid's
    voxel-to-world matrix (a NIfTI affine): ``d_world = W[:ndim, :ndim] @ d_voxel`` at each voxel.
    The field still lives on the same grid; it maps a fixed point to its moving point.

    >>> disp = torch.zeros(1, 2, 3, 3)
    >>> disp[:, 1] = 1.0                                       # one voxel along axis 1
    >>> spacing = torch.diag(torch.tensor([2.0, 3.0, 1.0]))    # 2 x 3 mm voxels
    >>> disp_to_world(disp, spacing)[0, :, 0, 0]               # 3 mm
    tensor([0., 3.])
    """
    ndim = _checks.check_disp(disp, "disp")
    linear = _vox2world_linear(vox2world, ndim, disp)
    return torch.einsum("ij,bj...->bi...", linear, disp)


def disp_from_world(disp_world: Tensor, vox2world: Tensor | object) -> Tensor:
    """Inverse of :func:`disp_to_world`: world-unit displacement back to voxels of the grid.

    >>> disp_mm = torch.zeros(1, 2, 3, 3)
    >>> disp_mm[:, 1] = 3.0                                    # 3 mm along axis 1
    >>> disp_from_world(disp_mm, torch.diag(torch.tensor([2.0, 3.0, 1.0])))[0, :, 0, 0]
    tensor([0., 1.])
    """
    ndim = _checks.check_disp(disp_world, "disp_world")
    linear = _vox2world_linear(vox2world, ndim, disp_world)
    return torch.einsum("ij,bj...->bi...", torch.linalg.inv(linear), disp_world)
