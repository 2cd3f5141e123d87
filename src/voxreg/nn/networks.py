"""Registration networks: VoxelMorph's UNet and dense registration model, and a warping module.

Conventions (see :mod:`voxreg.transforms`): images are ``(B, C, *spatial)`` channels first;
displacements are ``(B, ndim, *spatial)`` in voxels on the fixed grid (``ij`` indexing) and warping
pulls back, ``moved(x) = moving(x + disp(x))``.

Every model has a :attr:`config` property, a JSON-serialisable dict ``{"class": name, **args}``
holding its class name and constructor arguments, and :func:`voxreg.nn.build_model` rebuilds an (untrained)
model from it: ``build_model(model.config)`` then ``load_state_dict`` restores a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxreg import _checks
from voxreg import transforms as T
from voxreg.nn import fused
from voxreg.nn.layers import ResizeTransform, SpatialTransformer, VecInt

__all__ = ["Transform", "Unet", "VxmDense", "default_unet_features"]


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def default_unet_features() -> list[list[int]]:
    """VoxelMorph's default UNet features: ``[[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]]``."""
    return [[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]]


def _conv(ndim: int) -> type[nn.Module]:
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _layout(x: Tensor) -> torch.memory_format | None:
    """The memory layout the UNet keeps its activations in: channels-last on the CPU (oneDNN's
    convolutions are faster on it), ``None`` (as given) on other devices."""
    if x.device.type == "cpu" and x.dim() in _CHANNELS_LAST:
        return _CHANNELS_LAST[x.dim()]
    return None


def _to_layout(x: Tensor, layout: torch.memory_format | None) -> Tensor:
    return x if layout is None else x.contiguous(memory_format=layout)


class ConvBlock(nn.Module):
    """Convolution (3x3 or 3x3x3, stride 1, same padding) followed by LeakyReLU(0.2)."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int):
        super().__init__()
        self.main = _conv(ndim)(in_channels, out_channels, 3, 1, 1)
        # in place on the conv's fresh output (the conv's backward does not need it)
        self.activation = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.main(x))


class Unet(nn.Module):
    """VoxelMorph's UNet, 2D or 3D.

    Each encoder level runs ``nb_conv_per_level`` conv blocks (3x3(x3) conv + LeakyReLU(0.2)),
    keeps the result for the skip connection and max-pools by 2. Each decoder level runs its conv
    blocks, upsamples by 2 (nearest) and concatenates the matching encoder output (the last one is
    the first encoder level's, at full resolution; the raw input is not a skip). Decoder entries
    beyond the encoder's count are extra conv blocks at full resolution.

    Implementation (same function and parameters): on the CPU the activations are kept
    channels-last; a decoder step "upsample x2, concatenate, conv block" is computed as a stride-2
    transposed conv of the coarse features (kernel derived from the conv's weights) plus a conv of
    the skip, without building the upsampled or concatenated tensors, when the sizes double
    exactly and the grid is large enough for it to pay off.

    Args:
        inshape: spatial shape, e.g. ``(160, 192, 224)``; it sets :attr:`input_shape` and
            :attr:`output_shape` (the network itself runs on any size; sizes divisible by
            ``2**(nb_levels - 1)`` give exactly VoxelMorph's behaviour).
        infeats: number of input channels.
        nb_features: ``[encoder_features, decoder_features]`` (default
            :func:`default_unet_features`), or an integer: then ``nb_levels`` is required and the
            features are ``round(nb_features * feat_mult**level)`` per level, as in VoxelMorph.
        nb_levels: number of resolution levels; only with an integer ``nb_features``.
        feat_mult: per-level feature multiplier; only with an integer ``nb_features``.
        nb_conv_per_level: conv blocks per level.
        half_res: skip the last upsampling: the output is at half resolution.

    Forward:
        ``x (B, infeats, *spatial)`` -> ``(B, final_nf, *spatial)`` (half of each size, rounded
        down, with ``half_res``).

    Attributes:
        input_shape: ``(None, infeats, *inshape)``.
        output_shape: ``(None, final_nf, *out_spatial)``.
        final_nf: number of output channels.
        nb_levels: number of resolution levels (pooling steps + 1).
    """

    def __init__(
        self,
        inshape: Sequence[int],
        infeats: int,
        nb_features: Sequence[Sequence[int]] | int | None = None,
        nb_levels: int | None = None,
        feat_mult: float = 1,
        nb_conv_per_level: int = 1,
        half_res: bool = False,
    ):
        super().__init__()
        inshape = _checks.check_shape(inshape, "inshape")
        infeats = _checks.positive_int(infeats, "infeats")
        nb_conv_per_level = _checks.positive_int(nb_conv_per_level, "nb_conv_per_level")
        ndim = len(inshape)
        self._config = {
            "inshape": list(inshape),
            "infeats": infeats,
            "nb_features": None,
            "nb_levels": nb_levels,
            "feat_mult": feat_mult,
            "nb_conv_per_level": nb_conv_per_level,
            "half_res": bool(half_res),
        }

        if nb_features is None:
            if nb_levels is not None:
                raise ValueError("nb_levels can only be given with an integer nb_features")
            nb_features = default_unet_features()
        if isinstance(nb_features, int) and not isinstance(nb_features, bool):
            _checks.positive_int(nb_features, "nb_features")
            nb_levels = _checks.positive_int(nb_levels, "nb_levels", 2) if nb_levels is not None else None
            if nb_levels is None:
                raise ValueError("nb_levels is required when nb_features is an integer")
            if not (isinstance(feat_mult, (int, float)) and feat_mult > 0):
                raise ValueError(f"feat_mult must be a positive number, got {feat_mult!r}")
            self._config["nb_features"] = nb_features
            feats = [int(round(nb_features * feat_mult**level)) for level in range(nb_levels)]
            enc_nf = [f for f in feats[:-1] for _ in range(nb_conv_per_level)]
            dec_nf = [f for f in feats[::-1] for _ in range(nb_conv_per_level)]
        else:
            if nb_levels is not None:
                raise ValueError("nb_levels can only be given with an integer nb_features")
            enc_nf, dec_nf = self._parse_features(nb_features)
            self._config["nb_features"] = [list(enc_nf), list(dec_nf)]
        if len(enc_nf) == 0 or len(enc_nf) % nb_conv_per_level:
            raise ValueError(
                f"the encoder features ({len(enc_nf)} entries) must be a positive multiple of "
                f"nb_conv_per_level ({nb_conv_per_level})"
            )
        if len(dec_nf) < len(enc_nf):
            raise ValueError(
                f"nb_features: the decoder list ({len(dec_nf)} entries) must be at least as long "
                f"as the encoder list ({len(enc_nf)} entries)"
            )

        nb_pools = len(enc_nf) // nb_conv_per_level
        self.nb_levels = nb_pools + 1
        self.half_res = bool(half_res)
        self.enc_nf, self.dec_nf = list(enc_nf), list(dec_nf)
        pool = nn.MaxPool2d if ndim == 2 else nn.MaxPool3d
        self.pooling = pool(2)

        prev = infeats
        skip_nf = [prev]
        self.encoder = nn.ModuleList()
        for level in range(nb_pools):
            convs = nn.ModuleList()
            for nf in enc_nf[level * nb_conv_per_level : (level + 1) * nb_conv_per_level]:
                convs.append(ConvBlock(ndim, prev, nf))
                prev = nf
            self.encoder.append(convs)
            skip_nf.append(prev)
        skip_nf = skip_nf[::-1]

        self.decoder = nn.ModuleList()
        for level in range(nb_pools):
            convs = nn.ModuleList()
            for nf in dec_nf[level * nb_conv_per_level : (level + 1) * nb_conv_per_level]:
                convs.append(ConvBlock(ndim, prev, nf))
                prev = nf
            self.decoder.append(convs)
            if self._upsamples(level):
                prev += skip_nf[level]

        self.remaining = nn.ModuleList()
        for nf in dec_nf[nb_pools * nb_conv_per_level :]:
            self.remaining.append(ConvBlock(ndim, prev, nf))
            prev = nf
        self.final_nf = prev

        self.inshape = inshape
        self.infeats = infeats
        out_spatial = tuple(s // 2 for s in inshape) if self.half_res else inshape
        self.input_shape = (None, infeats, *inshape)
        self.output_shape = (None, self.final_nf, *out_spatial)

    @staticmethod
    def _parse_features(nb_features: Any) -> tuple[list[int], list[int]]:
        error = ValueError(
            "nb_features must be an integer or [encoder_features, decoder_features] (two lists of "
            f"positive integers), got {nb_features!r}"
        )
        try:
            enc, dec = nb_features
            enc = [int(f) for f in enc]
            dec = [int(f) for f in dec]
        except (TypeError, ValueError):
            raise error from None
        if any(f < 1 for f in enc + dec):
            raise error
        return enc, dec

    def _upsamples(self, level: int) -> bool:
        return not self.half_res or level < self.nb_levels - 2

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable ``{"class": "Unet", **constructor_args}``."""
        return {"class": type(self).__name__, **self._config}

    def forward(self, x: Tensor) -> Tensor:
        ndim = len(self.inshape)
        if x.dim() != ndim + 2 or x.shape[1] != self.infeats:
            raise ValueError(
                f"x must have shape (B, {self.infeats}, *spatial) with {ndim} spatial axes, "
                f"got {tuple(x.shape)}"
            )
        layout = _layout(x)
        x = _to_layout(x, layout)
        history = []
        for convs in self.encoder:
            for conv in convs:
                x = conv(x)
            history.append(x)
            x = self.pooling(x)
        # (coarse, skip): the next conv block reads their concatenation, upsampled, directly
        pending: tuple[Tensor, Tensor] | None = None
        for level, convs in enumerate(self.decoder):
            for conv in convs:
                if pending is not None:
                    x = fused.upsample_concat_conv(conv, *pending)
                    pending = None
                else:
                    x = conv(x)
            if self._upsamples(level):
                skip = history.pop()
                # a conv block follows unless the concatenation is the UNet's output
                block_follows = level + 1 < len(self.decoder) or len(self.remaining) > 0
                if block_follows and fused.fusable(x, skip):
                    pending = (_to_layout(x, layout), skip)
                else:
                    # nearest x2 upsampling; sizing to the skip also handles odd sizes. A 1x1
                    # bottleneck reads as either layout: set the layout again.
                    x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
                    x = torch.cat([_to_layout(x, layout), skip], dim=1)
        for conv in self.remaining:
            if pending is not None:
                x = fused.upsample_concat_conv(conv, *pending)
                pending = None
            else:
                x = conv(x)
        return x


class VxmDense(nn.Module):
    """VoxelMorph's dense registration network (``vxm.networks.VxmDense``).

    A :class:`Unet` reads ``concat(moving, fixed)``; a 3x3(x3) conv head (weights
    ``Normal(0, 1e-5)``, zero bias) turns its features into a field with one channel per axis.
    With ``int_steps > 0`` that field is a stationary velocity: it is resized down by
    ``int_downsize`` (:class:`~voxreg.nn.layers.ResizeTransform`), integrated by scaling and squaring
    (:class:`~voxreg.nn.layers.VecInt`) and resized back up to the exact input grid. With
    ``int_steps=0`` it is the displacement itself. The moving image is then warped by the
    displacement (:class:`~voxreg.nn.layers.SpatialTransformer`).

    Any spatial size of the model's rank is accepted: inside ``forward`` the images are zero-padded
    at the end of each axis to a multiple of ``2**(nb_levels - 1)``, the field is cropped back to
    the input size before integration, and the images are warped at their own size (``inshape``
    is the size for which the grids are pre-built; other sizes use the functional core).

    Args:
        inshape: spatial shape, 2 or 3 integers.
        nb_features: UNet features (see :class:`Unet`), default VoxelMorph's.
        int_steps: scaling-and-squaring steps; 0 for a plain displacement model.
        int_downsize: integrate at ``1 / int_downsize`` resolution (ignored when ``int_steps=0``).
        bidir: also warp the fixed image by the inverse transform (integrated from the negated
            velocity; the negated displacement when ``int_steps=0``).
        src_feats, trg_feats: channels of the moving and fixed images.
        unet_half_res: the UNet stops at half resolution; the field is then defined on a grid of
            ``ceil(size / 2)`` and requires ``int_downsize=2``.
        nb_unet_levels, unet_feat_mult, nb_unet_conv_per_level: passed to :class:`Unet` as
            ``nb_levels``, ``feat_mult``, ``nb_conv_per_level``.

    Forward ``(moving, fixed, registration=False, return_velocity=False)``:
        * ``moving (B, src_feats, *spatial)``, ``fixed (B, trg_feats, *spatial)``;
        * returns ``(moved, disp)``, or ``(moved, moved_fixed, disp)`` when ``bidir`` (and not
          ``registration``): ``moved (B, src_feats, *spatial)`` is the moving image warped by
          ``disp (B, ndim, *spatial)``; ``moved_fixed (B, trg_feats, *spatial)`` is the fixed
          image warped by the inverse field.
        * ``registration=True`` skips ``moved_fixed`` (as VoxelMorph's registration mode):
          always ``(moved, disp)``.
        * ``return_velocity=True`` appends the pre-integration field ``velocity``: the field at
          the integration resolution, ``(B, ndim, *round(spatial / int_downsize))`` (the
          displacement itself when ``int_steps=0``). VoxelMorph regularises this field; since it
          lives on a coarser grid, use ``Grad(..., loss_mult=int_downsize)`` like its training
          script. ``disp == resize(integrate_velocity(velocity, int_steps), spatial)``.
    """

    def __init__(
        self,
        inshape: Sequence[int],
        nb_features: Sequence[Sequence[int]] | int | None = None,
        int_steps: int = 7,
        int_downsize: int = 2,
        bidir: bool = False,
        src_feats: int = 1,
        trg_feats: int = 1,
        unet_half_res: bool = False,
        nb_unet_levels: int | None = None,
        unet_feat_mult: float = 1,
        nb_unet_conv_per_level: int = 1,
    ):
        super().__init__()
        inshape = _checks.check_shape(inshape, "inshape")
        ndim = len(inshape)
        self.int_steps = _checks.positive_int(int_steps, "int_steps", 0)
        self.int_downsize = _checks.positive_int(int_downsize, "int_downsize")
        self.src_feats = _checks.positive_int(src_feats, "src_feats")
        self.trg_feats = _checks.positive_int(trg_feats, "trg_feats")
        self.bidir = bool(bidir)
        self.unet_half_res = bool(unet_half_res)
        if self.unet_half_res and self.int_downsize != 2:
            raise ValueError(
                f"unet_half_res=True gives a half-resolution field: int_downsize must be 2, "
                f"got {int_downsize!r}"
            )
        self.inshape = inshape

        self.unet_model = Unet(
            inshape,
            infeats=self.src_feats + self.trg_feats,
            nb_features=nb_features,
            nb_levels=nb_unet_levels,
            feat_mult=unet_feat_mult,
            nb_conv_per_level=nb_unet_conv_per_level,
            half_res=self.unet_half_res,
        )
        self.multiple = 2 ** (self.unet_model.nb_levels - 1)
        self.flow = _conv(ndim)(self.unet_model.final_nf, ndim, kernel_size=3, padding=1)
        with torch.no_grad():
            nn.init.normal_(self.flow.weight, 0.0, 1e-5)
            nn.init.zeros_(self.flow.bias)

        # layers pre-built for inshape; other sizes go through the functional core
        self._downsizes = not self.unet_half_res and self.int_steps > 0 and self.int_downsize > 1
        self.resize = ResizeTransform(factor=1.0 / self.int_downsize) if self._downsizes else None
        self.velocity_shape = self._velocity_shape(inshape)
        self.integrate = VecInt(self.velocity_shape, self.int_steps) if self.int_steps else None
        self.fullsize = (
            ResizeTransform(shape=inshape) if self.velocity_shape != inshape else None
        )
        self.transformer = SpatialTransformer(inshape)

        self._config = {
            "inshape": list(inshape),
            "nb_features": self.unet_model.config["nb_features"],
            "int_steps": self.int_steps,
            "int_downsize": self.int_downsize,
            "bidir": self.bidir,
            "src_feats": self.src_feats,
            "trg_feats": self.trg_feats,
            "unet_half_res": self.unet_half_res,
            "nb_unet_levels": nb_unet_levels,
            "unet_feat_mult": unet_feat_mult,
            "nb_unet_conv_per_level": self.unet_model.config["nb_conv_per_level"],
        }

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable ``{"class": "VxmDense", **constructor_args}``."""
        return {"class": type(self).__name__, **self._config}

    def _velocity_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Grid of the pre-integration field for images of spatial ``shape``."""
        if self.unet_half_res:
            return tuple((s + 1) // 2 for s in shape)
        if self._downsizes:
            factor = 1.0 / self.int_downsize  # ResizeTransform's rule
            return tuple(max(1, int(round(s * factor))) for s in shape)
        return shape

    def _check_inputs(self, moving: Tensor, fixed: Tensor) -> tuple[int, ...]:
        ndim = len(self.inshape)
        for name, image, feats in (("moving", moving, self.src_feats), ("fixed", fixed, self.trg_feats)):
            _checks.as_tensor(image, name)
            if image.dim() != ndim + 2 or image.shape[1] != feats:
                raise ValueError(
                    f"{name} must have shape (B, {feats}, *spatial) with {ndim} spatial axes "
                    f"(this is a {ndim}D model with {name} channels = {feats}), "
                    f"got {tuple(image.shape)}"
                )
            if any(s == 0 for s in image.shape):
                raise ValueError(f"{name} must not be empty, got shape {tuple(image.shape)}")
            if not image.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {image.dtype}")
        if moving.shape[0] != fixed.shape[0] or moving.shape[2:] != fixed.shape[2:]:
            raise ValueError(
                f"moving and fixed must have the same batch size and spatial shape, got "
                f"{tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        # a single synchronising test for both images; find the culprit only on failure
        if not torch.isfinite(moving.sum() + fixed.sum()):
            _checks.check_finite(moving, "moving")
            _checks.check_finite(fixed, "fixed")
        return tuple(moving.shape[2:])

    def _to_disp(self, velocity: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Integrate (if needed) a pre-integration field and bring it to the grid ``shape``."""
        if self.int_steps:
            if tuple(velocity.shape[2:]) == self.velocity_shape:
                velocity = self.integrate(velocity)
            else:
                velocity = T.scaling_and_squaring(velocity, self.int_steps)
        if tuple(velocity.shape[2:]) != shape:
            if shape == self.inshape:
                velocity = self.fullsize(velocity)
            else:
                velocity = T.resize_field(velocity, shape)
        return velocity

    def _warp(self, image: Tensor, disp: Tensor, shape: tuple[int, ...]) -> Tensor:
        if shape == self.inshape:
            return self.transformer(image, disp)
        return T.sample_grid(image, T.disp_to_grid(disp), "linear", 0.0)

    def forward(
        self,
        moving: Tensor,
        fixed: Tensor,
        registration: bool = False,
        return_velocity: bool = False,
    ) -> tuple[Tensor, ...]:
        """Register ``moving`` to ``fixed``; see the class docstring for the outputs."""
        shape = self._check_inputs(moving, fixed)
        x = torch.cat([moving, fixed], dim=1)
        padded = tuple(math.ceil(s / self.multiple) * self.multiple for s in shape)
        if padded != shape:
            pad = []
            for s, p in zip(reversed(shape), reversed(padded)):
                pad += [0, p - s]
            x = F.pad(x, pad)
        # the UNet runs channels-last on the CPU (see _layout); the field comes back in the
        # standard layout
        field = self.flow(self.unet_model(x))
        crop = self._velocity_shape(shape) if self.unet_half_res else shape
        if tuple(field.shape[2:]) != crop:
            field = field[(slice(None), slice(None), *(slice(0, c) for c in crop))]
        field = field.contiguous()

        velocity = self.resize(field) if self._downsizes else field
        disp = self._to_disp(velocity, shape)
        moved = self._warp(moving, disp, shape)
        outputs: tuple[Tensor, ...]
        if self.bidir and not registration:
            inverse = self._to_disp(-velocity, shape)
            outputs = (moved, self._warp(fixed, inverse, shape), disp)
        else:
            outputs = (moved, disp)
        if return_velocity:
            outputs = (*outputs, velocity)
        return outputs


class Transform(nn.Module):
    """Warp an image by a given displacement (``vxm.networks.Transform``).

    Args:
        inshape: spatial shape of the fixed grid (grids are pre-built for it; other sizes of the
            same rank go through :func:`voxreg.transforms.warp`).
        interp: ``"linear"`` or ``"nearest"`` (use ``"nearest"`` for label maps; integer maps
            keep their dtype).
        fill_value: value outside the moving image.

    Forward:
        ``image (B, C, *spatial)``, ``disp (B, ndim, *spatial)`` -> ``(B, C, *spatial)``.
    """

    def __init__(self, inshape: Sequence[int], interp: T.Interp = "linear", fill_value: float = 0.0):
        super().__init__()
        self.inshape = _checks.check_shape(inshape, "inshape")
        self.interp = _checks.check_interp(interp)
        if not isinstance(fill_value, (int, float)) or not math.isfinite(fill_value):
            raise ValueError(f"fill_value must be a finite number, got {fill_value!r}")
        self.fill_value = float(fill_value)
        self.transformer = SpatialTransformer(self.inshape, self.interp, self.fill_value)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable ``{"class": "Transform", **constructor_args}``."""
        return {
            "class": type(self).__name__,
            "inshape": list(self.inshape),
            "interp": self.interp,
            "fill_value": self.fill_value,
        }

    def forward(self, image: Tensor, disp: Tensor) -> Tensor:
        _checks.as_tensor(image, "image")
        _checks.as_tensor(disp, "disp")
        ndim = len(self.inshape)
        if disp.dim() != ndim + 2 or disp.shape[1] != ndim:
            raise ValueError(
                f"disp must have shape (B, {ndim}, *spatial) for this {ndim}D transform, "
                f"got {tuple(disp.shape)}"
            )
        if tuple(disp.shape[2:]) == self.inshape:
            return self.transformer(image, disp)
        return T.warp(image, disp, self.interp, self.fill_value)
