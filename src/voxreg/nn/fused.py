"""The UNet's fused decoder step: "nearest x2 upsampling, concatenation with the skip, 3x3(x3)
conv block" computed as a stride-2 transposed conv of the coarse features plus a conv of the skip,
without building the upsampled or concatenated tensors. Same function and parameters (autograd
reaches the conv's own weights); :class:`voxreg.nn.networks.Unet` uses it where it pays off
(:func:`fusable`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FUSE_MIN_VOXELS", "ONEDNN_MIN_ELEMENTS", "fusable", "upsample_concat_conv",
           "upsampled_conv_kernel"]

# A decoder step "nearest x2 upsampling, concatenation with the skip, 3x3(x3) conv" is computed
# without building the upsampled or concatenated tensors (see upsample_concat_conv) when the
# coarse grid holds at least this many voxels (batch included); below it the extra operations
# cost more than they save.
FUSE_MIN_VOXELS = 1024
# PyTorch's CPU convolution runs its slower native kernels instead of oneDNN for batch 1 when
# B * C * size[0] * size[1] <= this (its heuristic in ConvParams::use_mkldnn)
ONEDNN_MIN_ELEMENTS = 20480

# Nearest x2 upsampling then a 3-tap conv (taps w0, w1, w2 reading rows o-1, o, o+1 of the
# upsampled grid) is, along each axis, a stride-2 transposed conv of the coarse input with 4 taps
# (padding 1): coarse row k reaches fine rows 2k-1 .. 2k+2 with w2, w1+w2, w0+w1, w0. Row t of
# this matrix lists which of w0, w1, w2 sum into transposed tap t.
_UPSAMPLE_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))
_TAP_MATRICES: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}


def _tap_matrix(ndim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(4**ndim, 3**ndim)``: row-major transposed-conv taps from row-major 3x3(x3) taps."""
    key = (ndim, device, dtype)
    if key not in _TAP_MATRICES:
        per_axis = torch.tensor(_UPSAMPLE_TAPS, dtype=torch.float64)
        matrix = per_axis
        for _ in range(ndim - 1):
            matrix = torch.kron(matrix, per_axis)
        _TAP_MATRICES[key] = matrix.to(device=device, dtype=dtype)
    return _TAP_MATRICES[key]


def upsampled_conv_kernel(weight: Tensor) -> Tensor:
    """The stride-2 transposed-conv kernel equal to "nearest x2 upsampling, then the 3x3(x3) conv
    ``weight``".

    Args:
        weight: ``(out, in, 3, 3)`` or ``(out, in, 3, 3, 3)``.

    Returns:
        ``(in, out, 4, 4)`` or ``(in, out, 4, 4, 4)`` for ``conv_transpose{2,3}d(x, kernel,
        stride=2, padding=1)``; autograd carries gradients back to ``weight``.

    >>> upsampled_conv_kernel(torch.ones(5, 3, 3, 3)).shape
    torch.Size([3, 5, 4, 4])
    """
    out_ch, in_ch = weight.shape[:2]
    ndim = weight.dim() - 2
    taps = _tap_matrix(ndim, weight.device, weight.dtype)
    kernel = weight.reshape(out_ch, in_ch, 3**ndim) @ taps.T
    return kernel.reshape(out_ch, in_ch, *([4] * ndim)).transpose(0, 1)


def fusable(coarse: Tensor, skip: Tensor) -> bool:
    """Whether :func:`upsample_concat_conv` applies to (and pays off for) these inputs.

    >>> fusable(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 8, 8))   # too small to pay off
    False
    >>> fusable(torch.zeros(1, 8, 4, 5), torch.zeros(1, 8, 8, 11))  # not a plain x2
    False
    """
    if any(s != 2 * c for s, c in zip(skip.shape[2:], coarse.shape[2:])):
        return False  # odd sizes: the nearest upsampling is not a plain x2
    if coarse.shape[0] * coarse.shape[2:].numel() < FUSE_MIN_VOXELS:
        return False
    if coarse.device.type == "cpu" and coarse.shape[0] == 1:
        # the split conv on the skip alone must stay on oneDNN where the full conv would be
        return skip.shape[1] * skip.shape[2] * skip.shape[3] > ONEDNN_MIN_ELEMENTS
    return True


def upsample_concat_conv(block: nn.Module, coarse: Tensor, skip: Tensor) -> Tensor:
    """``block(cat([upsample_nearest_x2(coarse), skip], dim=1))`` without building either tensor.

    The conv is linear, so it splits into the part reading the upsampled channels and the part
    reading the skip's; the first is a stride-2 transposed conv of ``coarse`` whose kernel
    (:func:`upsampled_conv_kernel`) is derived from the same weights, so autograd gives the
    gradients of the original parameters. Exact, zero padding at the borders included; it needs
    ``skip``'s spatial size to be twice ``coarse``'s.

    Args:
        block: a :class:`voxreg.nn.networks.ConvBlock` (``main``: 3x3(x3) conv, padding 1;
            ``activation``: LeakyReLU).
        coarse: ``(B, C1, *spatial)``.
        skip: ``(B, C2, *2 spatial)``.

    Returns:
        ``(B, out, *2 spatial)``.

    >>> from voxreg.nn.networks import ConvBlock
    >>> block = ConvBlock(2, 3 + 2, 4)
    >>> coarse, skip = torch.randn(1, 3, 4, 4), torch.randn(1, 2, 8, 8)
    >>> plain = block(torch.cat([F.interpolate(coarse, scale_factor=2.0), skip], dim=1))
    >>> torch.allclose(upsample_concat_conv(block, coarse, skip), plain, atol=1e-6)
    True
    """
    conv = block.main
    ndim = coarse.dim() - 2
    weight_coarse, weight_skip = conv.weight.split([coarse.shape[1], skip.shape[1]], dim=1)
    kernel = upsampled_conv_kernel(weight_coarse)
    conv_transpose = F.conv_transpose2d if ndim == 2 else F.conv_transpose3d
    conv_nd = F.conv2d if ndim == 2 else F.conv3d
    out = conv_transpose(coarse, kernel, stride=2, padding=1)
    out = out.add_(conv_nd(skip, weight_skip, conv.bias, padding=1))
    return block.activation(out)
