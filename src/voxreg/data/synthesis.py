"""Synthetic label maps and images for SynthMorph-style training (Hoffmann et al., 2021/2023).

SynthMorph trains a registration network without ever looking at real images: each training pair
is drawn from a random *label map*, and the network is fitted with a Dice loss between the warped
moving labels and the fixed labels. Since the image contrast is random for every image, the
network cannot rely on intensities and learns to register shapes, whatever the contrast.

Everything here is torch, batched, 2D and 3D, and seeded by a ``torch.Generator`` (CPU), so a
given seed always gives the same sample:

* :func:`smooth_noise`: Gaussian noise drawn on a coarse grid and upsampled (linear);
* :func:`random_deformation`: the displacement ``exp(v)`` of a random smooth stationary velocity
  ``v`` (:func:`voxreg.transforms.integrate_velocity`): smooth and invertible;
* :func:`warp_labels`: nearest-neighbour warping that keeps labels labels (and reads the border
  label outside the grid, so no fake background enters);
* :func:`synth_label_maps`: ``argmax`` over ``num_labels`` smooth noise images, then a random
  deformation: label maps with values ``1 .. num_labels``;
* :func:`synth_images`: an image from a label map: a random mean intensity and noise level per
  label, Gaussian blur, a smooth multiplicative bias field, additive noise and a random gamma;
  normalised to ``[0, 1]``;
* :func:`synth_pair`: a moving/fixed pair: one base label map (synthetic or real) deformed twice,
  each side given its own random contrast;
* :class:`SynthPairDataset`: a torch ``Dataset`` of such pairs for :class:`voxreg.training.Trainer`
  (items ``{"moving", "fixed", "moving_seg", "fixed_seg"}``), deterministic per
  ``(seed, epoch, index)``, optionally seeded by real label maps.

The options live in two small dataclasses, :class:`LabelSynthesis` and :class:`ImageSynthesis`,
whose defaults suit brain slices of about 100 voxels a side at 2 mm.

This module is kept whole although it is longer than 600 lines: it is one recipe read top to
bottom (options, random fields, label maps, images, pairs, the dataset), each step built on the
previous ones and all sharing the option parsing and shape checks; the dataset at the end only
draws :func:`synth_pair` with a generator seeded per item.

>>> generator = torch.Generator().manual_seed(0)
>>> labels = synth_label_maps((32, 32), batch=2, options={"num_labels": 4}, generator=generator)
>>> labels.shape, labels.dtype, int(labels.min()) >= 1, int(labels.max()) <= 4
(torch.Size([2, 1, 32, 32]), torch.int64, True, True)
>>> pair = synth_pair(labels, generator=generator)
>>> {key: tuple(value.shape) for key, value in pair.items()}   # doctest: +NORMALIZE_WHITESPACE
{'moving': (2, 1, 32, 32), 'fixed': (2, 1, 32, 32), 'moving_seg': (2, 1, 32, 32),
 'fixed_seg': (2, 1, 32, 32)}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from voxreg import _checks
from voxreg import transforms as T

__all__ = [
    "ImageSynthesis",
    "LabelSynthesis",
    "SynthPairDataset",
    "invert_contrast",
    "label_intensities",
    "random_deformation",
    "random_velocity",
    "smooth_noise",
    "synth_images",
    "synth_label_maps",
    "synth_pair",
    "warp_labels",
]


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------


def _positive(value: float, name: str, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LabelSynthesis:
    """How label maps and the deformations of a pair are drawn (distances in voxels).

    Attributes:
        num_labels: classes of a synthetic label map (values ``1 .. num_labels``).
        label_spacing: distance between the nodes of the coarse noise whose ``argmax`` gives the
            labels: about the size of one blob.
        shape_warp_std: the base label map is deformed by ``exp(v)`` with ``v`` smooth noise of
            standard deviation drawn uniformly in ``[0, shape_warp_std]`` (irregular shapes).
        shape_warp_spacing: node distance of that velocity's coarse noise.
        warp_std: each side of a pair is deformed by ``exp(v)``, ``v`` of standard deviation drawn
            uniformly in ``[0, warp_std]``: sets how far apart moving and fixed are.
        warp_spacing: node distance of the pair velocities' coarse noise.
        int_steps: scaling-and-squaring steps of the integration.
    """

    num_labels: int = 16
    label_spacing: float = 12.0
    shape_warp_std: float = 3.0
    shape_warp_spacing: float = 16.0
    warp_std: float = 4.0
    warp_spacing: float = 12.0
    int_steps: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) \
                or self.num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2, got {self.num_labels!r}")
        if isinstance(self.int_steps, bool) or not isinstance(self.int_steps, int) \
                or self.int_steps < 1:
            raise ValueError(f"int_steps must be a positive integer, got {self.int_steps!r}")
        for name in ("label_spacing", "shape_warp_spacing", "warp_spacing"):
            _positive(getattr(self, name), name, allow_zero=False)
        for name in ("shape_warp_std", "warp_std"):
            _positive(getattr(self, name), name)


@dataclass(frozen=True)
class ImageSynthesis:
    """How an image is drawn from a label map (intensities before the final ``[0, 1]`` scaling).

    Attributes:
        mean_range: each label's mean intensity is uniform in this range.
        noise_std: each label's within-label noise has a standard deviation uniform in
            ``[0, noise_std]``.
        blur_sigma: Gaussian blur of standard deviation uniform in ``[0, blur_sigma]`` voxels.
        bias_std: the log of the multiplicative bias field is smooth noise of standard deviation
            uniform in ``[0, bias_std]``.
        bias_spacing: node distance of the bias field's coarse noise (voxels).
        additive_noise: after scaling to ``[0, 1]``, Gaussian noise of standard deviation uniform
            in ``[0, additive_noise]`` is added.
        gamma_std: the image (in ``[0, 1]``) is raised to ``exp(g)``, ``g ~ N(0, gamma_std)``.
        same_contrast: probability that the two images of a pair share their label intensities
            (means and noise levels; blur, bias, noise and gamma stay independent). 0 is
            SynthMorph (always independent contrasts). Pairs of one contrast are far easier to
            start learning from: a little of them shortens the initial plateau of training.
    """

    mean_range: tuple[float, float] = (0.0, 1.0)
    noise_std: float = 0.1
    blur_sigma: float = 1.0
    bias_std: float = 0.3
    bias_spacing: float = 24.0
    additive_noise: float = 0.03
    gamma_std: float = 0.25
    same_contrast: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= _positive(self.same_contrast, "same_contrast") <= 1:
            raise ValueError(f"same_contrast must be a probability in [0, 1], got {self.same_contrast}")
        low, high = (float(v) for v in self.mean_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"mean_range must be two finite numbers low < high, got {self.mean_range!r}")
        object.__setattr__(self, "mean_range", (low, high))
        for name in ("noise_std", "blur_sigma", "bias_std", "additive_noise", "gamma_std"):
            _positive(getattr(self, name), name)
        _positive(self.bias_spacing, "bias_spacing", allow_zero=False)


def _options(value: Any, cls: type, name: str) -> Any:
    """An options dataclass from ``None`` (defaults), an instance, or a dict of its fields."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{name}: unknown option(s) {unknown}; known: {sorted(known)}")
        return replace(cls(), **value)
    raise TypeError(f"{name} must be a {cls.__name__}, a dict or None, got {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# random fields
# --------------------------------------------------------------------------------------------


def _check_spatial(shape: Sequence[int]) -> tuple[int, ...]:
    shape = _checks.check_shape(shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 entries, got {shape}")
    if min(shape) < 2:
        raise ValueError(f"shape must be at least 2 voxels along each axis, got {shape}")
    return shape


def _coarse_shape(shape: tuple[int, ...], spacing: float) -> tuple[int, ...]:
    """Nodes, at most ``spacing`` voxels apart, spanning first to last voxel centre."""
    return tuple(max(2, math.ceil((s - 1) / spacing) + 1) for s in shape)


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """``(B,)`` -> ``(B, 1, 1, ...)`` for broadcasting against ``(B, C, *spatial)``."""
    return values.view(-1, *([1] * (ndim + 1)))


def smooth_noise(
    shape: Sequence[int],
    channels: int = 1,
    batch: int = 1,
    spacing: float = 8.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Smooth random images: standard Gaussian noise on a coarse grid, upsampled linearly.

    Args:
        shape: spatial shape, 2 or 3 integers.
        channels: independent noise images per sample.
        batch: samples.
        spacing: distance in voxels between the coarse nodes (the corner voxels are nodes).
        generator: a CPU ``torch.Generator`` (``None``: torch's global generator).

    Returns:
        ``(batch, channels, *shape)`` float tensor (CPU, default dtype); the nodes are N(0, 1).
    """
    shape = _check_spatial(shape)
    coarse = _coarse_shape(shape, _positive(spacing, "spacing", allow_zero=False))
    noise = torch.randn((int(batch), int(channels), *coarse), generator=generator)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(noise, size=shape, mode=mode, align_corners=True)


def random_velocity(
    shape: Sequence[int],
    batch: int = 1,
    max_std: float = 3.0,
    spacing: float = 12.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A random smooth stationary velocity field ``(batch, ndim, *shape)`` in voxels.

    Each sample's field is :func:`smooth_noise` times a standard deviation drawn uniformly in
    ``[0, max_std]``.
    """
    shape = _check_spatial(shape)
    _positive(max_std, "max_std")
    std = torch.rand(int(batch), generator=generator) * max_std
    noise = smooth_noise(shape, len(shape), batch, spacing, generator)
    return noise * _per_sample(std, len(shape))


def random_deformation(
    shape: Sequence[int],
    batch: int = 1,
    max_std: float = 3.0,
    spacing: float = 12.0,
    int_steps: int = 5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Displacement ``(batch, ndim, *shape)`` of ``exp(v)``, ``v`` from :func:`random_velocity`.

    The map ``x -> x + disp(x)`` is smooth and invertible (its inverse is ``exp(-v)``).
    """
    velocity = random_velocity(shape, batch, max_std, spacing, generator)
    return T.integrate_velocity(velocity, int(int_steps))


def warp_labels(labels: Tensor, disp: Tensor) -> Tensor:
    """Warp a label map by a displacement with nearest-neighbour sampling (pull-back).

    Points mapped beyond the grid read the nearest border voxel (not a fill value), so the
    warped map holds only labels of the input.

    Args:
        labels: ``(B, 1, *spatial)`` integer label map.
        disp: ``(B, ndim, *spatial)`` displacement in voxels (a batch of 1 broadcasts).

    Returns:
        ``(B, 1, *spatial)`` label map of ``labels``' dtype.
    """
    _checks.check_image(labels, "labels")
    ndim = _checks.check_disp(disp, "disp")
    shape = tuple(labels.shape[2:])
    if tuple(disp.shape[2:]) != shape or len(shape) != ndim:
        raise ValueError(
            f"disp must be (B, {len(shape)}, {', '.join(map(str, shape))}) for these labels, got "
            f"{tuple(disp.shape)}"
        )
    grid = T.identity_grid(shape, disp.device, disp.dtype)
    upper = torch.tensor([s - 1 for s in shape], device=disp.device, dtype=disp.dtype)
    target = torch.minimum((grid + disp).clamp(min=0), upper.view(1, ndim, *([1] * ndim)))
    return T.warp(labels, target - grid, interp="nearest")


# --------------------------------------------------------------------------------------------
# label maps and images
# --------------------------------------------------------------------------------------------


def synth_label_maps(
    shape: Sequence[int],
    batch: int = 1,
    options: LabelSynthesis | dict | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random label maps: ``argmax`` over ``num_labels`` smooth noise images, then a random
    smooth deformation (nearest, so the maps stay label maps).

    Args:
        shape: spatial shape (2D or 3D).
        batch: maps to draw.
        options: a :class:`LabelSynthesis` (or a dict of its fields).
        generator: a CPU ``torch.Generator``.

    Returns:
        ``(batch, 1, *shape)`` int64 label maps with values in ``1 .. num_labels``.
    """
    opts = _options(options, LabelSynthesis, "options")
    shape = _check_spatial(shape)
    noise = smooth_noise(shape, opts.num_labels, batch, opts.label_spacing, generator)
    base = noise.max(1, keepdim=True).indices + 1  # argmax (max().indices is faster on CPU)
    disp = random_deformation(shape, batch, opts.shape_warp_std, opts.shape_warp_spacing,
                              opts.int_steps, generator)
    return warp_labels(base, disp)


def _gaussian_blur(image: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur of ``(B, 1, *spatial)`` with one ``sigma`` (voxels) per sample
    (borders replicated); vectorised over the batch with a grouped convolution."""
    ndim = image.dim() - 2
    batch = image.shape[0]
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    s = sigma.to(image).clamp(min=1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K)
    conv = F.conv2d if ndim == 2 else F.conv3d
    out = image.transpose(0, 1)  # (1, B, *spatial): one group per sample
    for axis in range(ndim):
        view = [batch, 1] + [1] * ndim
        view[2 + axis] = kernel.shape[1]
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), kernel.view(view), groups=batch)
    return out.transpose(0, 1)


def _minmax(image: Tensor) -> Tensor:
    """Scale each sample of ``(B, C, *spatial)`` to ``[0, 1]`` (a constant sample gives 0)."""
    flat = image.flatten(1)
    low = flat.min(1).values
    span = (flat.max(1).values - low).clamp(min=1e-8)
    ndim = image.dim() - 2
    return ((image - _per_sample(low, ndim)) / _per_sample(span, ndim)).clamp(0, 1)


def label_intensities(batch: int, count: int, options: ImageSynthesis | dict | None = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random per-label mean intensities and noise levels, ``(means, stds)`` each
    ``(batch, count)`` (the Gaussian mixture of :func:`synth_images`)."""
    opts = _options(options, ImageSynthesis, "options")
    low, high = opts.mean_range
    means = low + (high - low) * torch.rand((batch, count), generator=generator)
    stds = opts.noise_std * torch.rand((batch, count), generator=generator)
    return means, stds


def synth_images(
    labels: Tensor,
    options: ImageSynthesis | dict | None = None,
    generator: torch.Generator | None = None,
    label_values: Sequence[int] | Tensor | None = None,
    intensities: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Random-contrast images of label maps (SynthMorph's image model).

    Per sample: each label gets a mean intensity and a noise level (a random Gaussian mixture),
    then the image is blurred, multiplied by a smooth bias field, scaled to ``[0, 1]``, given
    additive noise, scaled again and raised to a random gamma. Two calls on the same labels give
    different contrasts.

    Args:
        labels: ``(B, 1, *spatial)`` integer label maps.
        options: an :class:`ImageSynthesis` (or a dict of its fields).
        generator: a CPU ``torch.Generator``.
        label_values: every value the maps may hold (sorted or not); default the values present.
            Giving it makes the draw of a label's intensity independent of which other labels
            happen to be present.
        intensities: optional ``(means, stds)``, each ``(B, L)`` over the sorted
            ``label_values``, replacing the random draw of the label intensities (see
            :func:`label_intensities`).

    Returns:
        ``(B, 1, *spatial)`` float images in ``[0, 1]``.
    """
    opts = _options(options, ImageSynthesis, "options")
    ndim = _checks.check_image(labels, "labels")
    if labels.shape[1] != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer label map (B, 1, *spatial), got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    labels = labels.cpu()
    batch, spatial = labels.shape[0], tuple(labels.shape[2:])
    seg = labels.reshape(batch, -1).to(torch.int64)
    if label_values is None:
        values = torch.unique(seg)
    else:
        values = torch.unique(torch.as_tensor(label_values, dtype=torch.int64).flatten())
    index = torch.searchsorted(values, seg).clamp(max=len(values) - 1)
    if not torch.equal(values[index], seg):
        raise ValueError("labels hold values that are not in label_values")
    if intensities is None:
        means, stds = label_intensities(batch, len(values), opts, generator)
    else:
        means, stds = (torch.as_tensor(v, dtype=torch.get_default_dtype()) for v in intensities)
        if means.shape != (batch, len(values)) or stds.shape != (batch, len(values)):
            raise ValueError(f"intensities must be two (B, L) = {(batch, len(values))} tensors, "
                             f"got {tuple(means.shape)} and {tuple(stds.shape)}")
    noise = torch.randn(seg.shape, generator=generator)
    image = (means.gather(1, index) + stds.gather(1, index) * noise).view(batch, 1, *spatial)

    sigma = opts.blur_sigma * torch.rand(batch, generator=generator)
    if opts.blur_sigma > 0:
        image = _gaussian_blur(image, sigma)
    bias_std = opts.bias_std * torch.rand(batch, generator=generator)
    log_bias = smooth_noise(spatial, 1, batch, opts.bias_spacing, generator)
    image = _minmax(image * torch.exp(log_bias * _per_sample(bias_std, ndim)))
    additive = opts.additive_noise * torch.rand(batch, generator=generator)
    image = image + _per_sample(additive, ndim) * torch.randn(image.shape, generator=generator)
    gamma = torch.exp(opts.gamma_std * torch.randn(batch, generator=generator))
    return _minmax(image) ** _per_sample(gamma, ndim)


def synth_pair(
    base_labels: Tensor,
    label_options: LabelSynthesis | dict | None = None,
    image_options: ImageSynthesis | dict | None = None,
    generator: torch.Generator | None = None,
    label_values: Sequence[int] | Tensor | None = None,
    fixed_base_labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """A moving/fixed training pair from base label maps.

    The base map is deformed twice by independent random deformations (``warp_std``), giving the
    moving and the fixed label maps; each gets its own random-contrast image (both share their
    label intensities with probability ``image_options.same_contrast``).

    Args:
        base_labels: ``(B, 1, *spatial)`` integer label maps (e.g. :func:`synth_label_maps`, or
            real anatomy).
        label_options: a :class:`LabelSynthesis` (only the ``warp_*`` and ``int_steps`` fields
            are used here).
        image_options: an :class:`ImageSynthesis`.
        generator: a CPU ``torch.Generator``.
        label_values: all values the maps may hold (see :func:`synth_images`).
        fixed_base_labels: optional other base maps for the fixed side (e.g. another subject).

    Returns:
        ``{"moving", "fixed"}`` float ``(B, 1, *spatial)`` in ``[0, 1]`` and
        ``{"moving_seg", "fixed_seg"}`` int64 ``(B, 1, *spatial)``.
    """
    lopts = _options(label_options, LabelSynthesis, "label_options")
    iopts = _options(image_options, ImageSynthesis, "image_options")
    _checks.check_image(base_labels, "base_labels")
    fixed_base = base_labels if fixed_base_labels is None else fixed_base_labels
    if fixed_base.shape != base_labels.shape:
        raise ValueError(f"fixed_base_labels must have the shape of base_labels "
                         f"{tuple(base_labels.shape)}, got {tuple(fixed_base.shape)}")
    batch, spatial = base_labels.shape[0], tuple(base_labels.shape[2:])
    segs = {}
    for name, base in (("moving_seg", base_labels), ("fixed_seg", fixed_base)):
        disp = random_deformation(spatial, batch, lopts.warp_std, lopts.warp_spacing,
                                  lopts.int_steps, generator)
        segs[name] = warp_labels(base.cpu().to(torch.int64), disp)
    if label_values is None:
        values = torch.unique(torch.cat([segs["moving_seg"].flatten(), segs["fixed_seg"].flatten()]))
    else:
        values = torch.unique(torch.as_tensor(label_values, dtype=torch.int64).flatten())
    moving_intensities = label_intensities(batch, len(values), iopts, generator)
    moving = synth_images(segs["moving_seg"], iopts, generator, values, moving_intensities)
    fixed_intensities = label_intensities(batch, len(values), iopts, generator)
    if iopts.same_contrast > 0:
        share = (torch.rand(batch, generator=generator) < iopts.same_contrast).view(-1, 1)
        fixed_intensities = tuple(torch.where(share, m, f)
                                  for m, f in zip(moving_intensities, fixed_intensities))
    fixed = synth_images(segs["fixed_seg"], iopts, generator, values, fixed_intensities)
    return {"moving": moving, "fixed": fixed, **segs}


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------


class SynthPairDataset(Dataset):
    """On-the-fly synthetic training pairs (SynthMorph), a torch ``Dataset``.

    Item ``i`` is a dict of tensors ``moving``, ``fixed`` (float32 ``(1, *shape)`` in ``[0, 1]``)
    and ``moving_seg``, ``fixed_seg`` (int64 ``(1, *shape)``), drawn from a generator seeded by
    ``(seed, epoch, i)``: the same index, seed and epoch always give the same pair.
    :meth:`set_epoch` (called by the trainer) draws fresh pairs each epoch.

    Args:
        shape: spatial shape (2D or 3D); may be left out when ``label_maps`` are given.
        pairs_per_epoch: length of the dataset.
        seed: seed of the draw.
        label_options: :class:`LabelSynthesis` (or dict).
        image_options: :class:`ImageSynthesis` (or dict).
        label_maps: optional real label maps ``(N, *shape)`` (array, tensor or list of arrays)
            that replace the synthetic base maps: each pair deforms one of them twice (or, with
            ``pair_mode="different"``, deforms two different ones), so real anatomy seeds the
            synthesis.
        pair_mode: ``"same"`` (one base map per pair) or ``"different"`` (two; needs at least 2
            label maps).

    Attributes:
        labels: every label value the pairs can hold (``1 .. num_labels`` for synthetic maps; the
            values of ``label_maps``, 0 included, otherwise). The trainer's seg loss uses them
            without 0.
        inshape: the spatial shape.
    """

    def __init__(
        self,
        shape: Sequence[int] | None = None,
        pairs_per_epoch: int = 100,
        seed: int = 0,
        label_options: LabelSynthesis | dict | None = None,
        image_options: ImageSynthesis | dict | None = None,
        label_maps: Any = None,
        pair_mode: str = "same",
    ):
        if isinstance(pairs_per_epoch, bool) or not isinstance(pairs_per_epoch, int) \
                or pairs_per_epoch < 1:
            raise ValueError(f"pairs_per_epoch must be a positive integer, got {pairs_per_epoch!r}")
        if pair_mode not in ("same", "different"):
            raise ValueError(f"pair_mode must be 'same' or 'different', got {pair_mode!r}")
        self.label_options = _options(label_options, LabelSynthesis, "label_options")
        self.image_options = _options(image_options, ImageSynthesis, "image_options")
        self.pairs_per_epoch = pairs_per_epoch
        self.seed = int(seed)
        self.epoch = 0
        self.pair_mode = pair_mode
        self.label_maps: Tensor | None = None
        if label_maps is not None:
            maps = self._stack_maps(label_maps)
            if shape is not None and tuple(shape) != tuple(maps.shape[1:]):
                raise ValueError(f"label_maps have shape {tuple(maps.shape[1:])} but shape is "
                                 f"{tuple(shape)}")
            if pair_mode == "different" and len(maps) < 2:
                raise ValueError("pair_mode='different' needs at least 2 label maps")
            self.label_maps = maps
            shape = tuple(maps.shape[1:])
            self.labels = [int(v) for v in np.unique(maps.numpy())]
        else:
            if shape is None:
                raise ValueError("give shape (the spatial shape of the pairs) or label_maps")
            if pair_mode == "different":
                raise ValueError("pair_mode='different' needs label_maps")
            self.labels = list(range(1, self.label_options.num_labels + 1))
        self.inshape = _check_spatial(shape)
        self._values = torch.as_tensor(self.labels, dtype=torch.int64)

    @staticmethod
    def _stack_maps(label_maps: Any) -> Tensor:
        """``(N, *shape)`` integer tensor of the label maps, in a small dtype (uint8, int32 or
        int64: a set of 3D maps can be large); converted to int64 per pair."""
        if isinstance(label_maps, Tensor):
            maps = label_maps.detach().cpu().numpy()
        elif isinstance(label_maps, np.ndarray):
            maps = label_maps
        elif isinstance(label_maps, Sequence) and not isinstance(label_maps, (str, bytes)):
            if len(label_maps) == 0:
                raise ValueError("label_maps must hold at least one label map")
            arrays = [np.asarray(m.detach().cpu() if isinstance(m, Tensor) else m)
                      for m in label_maps]
            shapes = {a.shape for a in arrays}
            if len(shapes) != 1:
                raise ValueError(f"label_maps must all share one shape, got {sorted(shapes)}")
            maps = np.stack(arrays)
        else:
            raise TypeError(f"label_maps must be an array (N, *shape) or a list of arrays, got "
                            f"{type(label_maps).__name__}")
        if maps.ndim not in (3, 4) or len(maps) == 0:
            raise ValueError(f"label_maps must be (N, H, W) or (N, D, H, W), got {maps.shape}")
        if maps.dtype.kind == "f":
            if not np.all(np.isfinite(maps)) or not np.array_equal(maps, np.round(maps)):
                raise ValueError("label_maps must hold integer labels, got non-integer values")
        elif maps.dtype.kind not in "iub":
            raise ValueError(f"label_maps must hold integer labels, got dtype {maps.dtype}")
        low, high = (int(maps.min()), int(maps.max()))
        if 0 <= low and high <= 255:
            dtype = np.uint8
        elif -(2**31) <= low and high < 2**31:
            dtype = np.int32
        else:
            dtype = np.int64
        return torch.from_numpy(np.ascontiguousarray(maps.astype(dtype, copy=False)))

    def set_epoch(self, epoch: int) -> None:
        """Draw the pairs of epoch ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.pairs_per_epoch

    def generator(self, index: int) -> torch.Generator:
        """The seeded generator of pair ``index`` in the current epoch."""
        seed = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, int(index), 31])
        return torch.Generator().manual_seed(int(seed.integers(2**62)))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = int(index)
        if not 0 <= index < self.pairs_per_epoch:
            raise IndexError(f"pair index {index} out of range for {self.pairs_per_epoch} pairs")
        gen = self.generator(index)
        fixed_base = None
        if self.label_maps is None:
            base = synth_label_maps(self.inshape, 1, self.label_options, gen)
        else:
            count = len(self.label_maps)
            pick = (torch.randperm(count, generator=gen)[:2] if count > 1
                    else torch.zeros(1, dtype=torch.int64))
            base = self.label_maps[int(pick[0])][None, None].to(torch.int64)
            if self.pair_mode == "different":
                fixed_base = self.label_maps[int(pick[1])][None, None].to(torch.int64)
        pair = synth_pair(base, self.label_options, self.image_options, gen, self._values,
                          fixed_base_labels=fixed_base)
        return {
            "moving": pair["moving"][0].float(),
            "fixed": pair["fixed"][0].float(),
            "moving_seg": pair["moving_seg"][0],
            "fixed_seg": pair["fixed_seg"][0],
        }

    def settings(self) -> dict[str, Any]:
        """The synthesis settings as plain values (for a model's metadata)."""
        return {
            "shape": list(self.inshape),
            "label_options": asdict(self.label_options),
            "image_options": {k: list(v) if isinstance(v, tuple) else v
                              for k, v in asdict(self.image_options).items()},
            "real_label_maps": 0 if self.label_maps is None else len(self.label_maps),
            "pair_mode": self.pair_mode,
            "seed": self.seed,
        }


# --------------------------------------------------------------------------------------------
# evaluation helpers
# --------------------------------------------------------------------------------------------


def invert_contrast(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``1 - image`` where ``labels`` is non-zero (inside the brain), 0 elsewhere: a T1 with
    inverted contrast, for checking that a model is contrast-agnostic.

    Args:
        images: ``(..., *spatial)`` intensities in ``[0, 1]``.
        labels: label maps of the same shape (0 = background).

    Returns:
        float32 array of the shape of ``images``.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.shape != labels.shape:
        raise ValueError(f"images {images.shape} and labels {labels.shape} must have the same "
                         "shape")
    return np.where(labels > 0, 1.0 - images, 0.0).astype(np.float32)
