"""Thin ``nn.Module`` wrappers around :mod:`voxreg.transforms`.

They hold configuration and cache what can be cached (the identity sampling grid, as a
non-persistent buffer that follows the module across devices); the maths lives in the functional
core. Shapes are checked once per call (cheap, no device synchronisation), so they can sit inside
a training loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from voxreg import _checks
from voxreg import transforms as T


class SpatialTransformer(nn.Module):
    """Warp images by dense displacements on a fixed grid (pull-back).

    Args:
        size: spatial shape of the fixed grid, e.g. ``(160, 192, 224)``.
        interp: ``"linear"`` or ``"nearest"``.
        fill_value: value outside the moving image.

    Forward:
        ``image (B, C, *size)``, ``disp (B, ndim, *size)`` -> ``(B, C, *size)``.
    """

    def __init__(self, size: Sequence[int], interp: T.Interp = "linear", fill_value: float = 0.0):
        super().__init__()
        self.size = _checks.check_shape(size, "size")
        self.interp = _checks.check_interp(interp)
        self.fill_value = float(fill_value)
        identity = T.normalized_identity(self.size, torch.device("cpu"), torch.float32).clone()
        self.register_buffer("identity", identity, persistent=False)
        scale = T.voxel_to_normalized_scale(self.size, "cpu", torch.float32)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, image: Tensor, disp: Tensor) -> Tensor:
        ndim = len(self.size)
        if tuple(disp.shape[1:]) != (ndim, *self.size):
            raise ValueError(
                f"disp must have shape (B, {ndim}, {', '.join(map(str, self.size))}), "
                f"got {tuple(disp.shape)}"
            )
        if image.dim() != ndim + 2 or tuple(image.shape[2:]) != self.size:
            raise ValueError(
                f"image must have shape (B, C, {', '.join(map(str, self.size))}), "
                f"got {tuple(image.shape)}"
            )
        identity, scale = self.identity, self.scale
        if identity.dtype != disp.dtype:
            identity, scale = identity.to(disp.dtype), scale.to(disp.dtype)
        grid = torch.addcmul(identity, disp.movedim(1, -1), scale)
        if image.shape[0] != grid.shape[0]:
            batch = _checks.check_batch(image.shape[0], grid.shape[0], "image", "disp")
            grid = grid.expand(batch, *grid.shape[1:])
        return T.sample_grid(image, grid, self.interp, self.fill_value)

    def extra_repr(self) -> str:
        return f"size={self.size}, interp={self.interp!r}"


class VecInt(nn.Module):
    """Integrate a stationary velocity field by scaling and squaring (``steps`` squarings).

    Forward: ``velocity (B, ndim, *size)`` -> displacement ``(B, ndim, *size)``.
    """

    def __init__(self, size: Sequence[int], steps: int = 7):
        super().__init__()
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self.size = _checks.check_shape(size, "size")
        self.steps = steps
        # fields are resampled with border padding: a field extends past its grid by its edge value
        self.transformer = SpatialTransformer(self.size)

    def forward(self, velocity: Tensor) -> Tensor:
        if tuple(velocity.shape[1:]) != (len(self.size), *self.size):
            raise ValueError(
                f"velocity must have shape (B, {len(self.size)}, {', '.join(map(str, self.size))}), "
                f"got {tuple(velocity.shape)}"
            )
        identity = self.transformer.identity
        if identity.dtype != velocity.dtype:
            identity = identity.to(velocity.dtype)
        return T.scaling_and_squaring(velocity, self.steps, identity)

    def extra_repr(self) -> str:
        return f"size={self.size}, steps={self.steps}"


class ResizeTransform(nn.Module):
    """Resize a displacement (or velocity) field by ``factor`` and rescale its values.

    ``factor < 1`` shrinks (e.g. 0.5 for VoxelMorph's ``int_downsize=2``), ``factor > 1`` grows.
    With ``shape`` the target grid is given exactly (used to return to odd-sized grids).
    """

    def __init__(self, factor: float | None = None, shape: Sequence[int] | None = None):
        super().__init__()
        if (factor is None) == (shape is None):
            raise ValueError("give exactly one of factor or shape")
        self.factor = factor
        self.shape = _checks.check_shape(shape) if shape is not None else None

    def forward(self, disp: Tensor) -> Tensor:
        if self.shape is not None:
            return T.resize_field(disp, self.shape)
        new = tuple(max(1, int(round(s * self.factor))) for s in disp.shape[2:])
        return T.resize_field(disp, new)

    def extra_repr(self) -> str:
        return f"factor={self.factor}" if self.shape is None else f"shape={self.shape}"
