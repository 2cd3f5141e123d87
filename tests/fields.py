"""Smooth random fields shared by the registration and finetuning tests."""

from __future__ import annotations

import torch


def smooth_random_field(shape, amplitude, seed=0, coarse=4):
    """A smooth random field ``(1, ndim, *shape)`` with largest component ``amplitude``."""
    gen = torch.Generator().manual_seed(seed)
    knots = torch.randn(1, len(shape), *([coarse] * len(shape)), generator=gen)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    field = torch.nn.functional.interpolate(knots, size=shape, mode=mode, align_corners=True)
    return field * (amplitude / field.abs().max())
