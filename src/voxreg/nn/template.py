"""Template models (Dalca et al., NeurIPS 2019): a learned template and the network that
registers it to each subject.

* :class:`TemplateCreation`: the template is a learned image (an ``nn.Parameter`` initialised from
  the voxel-wise mean of the inputs), registered to each subject by a diffeomorphic bidirectional
  :class:`~voxreg.nn.networks.VxmDense` (``moving = template``, ``fixed = subject``).
* :class:`ConditionalTemplate`: the template is ``mean image + decoder(attributes)``: a small
  network turns an attribute vector (e.g. age) into an image offset, trained jointly with the
  registration network.

Conventions (``docs/conventions.md``): images ``(B, C, *spatial)``; ``disp`` is the field on the
subject grid that warps the template onto the subject, ``moved(x) = template(x + disp(x))``.
Training lives in :mod:`voxreg.training.template`; measures of a trained template (sharpness,
label propagation, Dice) in :mod:`voxreg.evaluation`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxreg import _checks
from voxreg.nn.networks import VxmDense

__all__ = [
    "ConditionalTemplate",
    "TemplateCreation",
    "TemplateModel",
    "TEMPLATE_CLASSES",
    "TemplateOutput",
    "attribute_batch",
    "build_template_model",
    "image_batch",
]

class TemplateOutput(NamedTuple):
    """What a template model returns for a batch of subjects ``(B, 1, *spatial)``.

    Attributes:
        moved_template: ``(B, 1, *spatial)`` the template warped onto each subject by ``disp``.
        moved_subject: ``(B, 1, *spatial)`` each subject warped onto the template (inverse field).
        disp: ``(B, ndim, *spatial)`` field on the subject grid, ``moved_template(x) =
            template(x + disp(x))``.
        velocity: ``(B, ndim, *velocity_grid)`` the stationary velocity before integration
            (on a grid ``int_downsize`` times coarser), ``disp = exp(velocity)``.
        template: ``(B, 1, *spatial)`` the template used for each subject.
    """

    moved_template: Tensor
    moved_subject: Tensor
    disp: Tensor
    velocity: Tensor
    template: Tensor


class TemplateModel(nn.Module):
    """Shared part: the bidirectional diffeomorphic registration network and the mean stream."""

    def __init__(
        self,
        inshape: Sequence[int],
        nb_features: Sequence[Sequence[int]] | int | None = None,
        int_steps: int = 7,
        int_downsize: int = 2,
        mean_cap: int = 100,
        nb_unet_levels: int | None = None,
    ):
        super().__init__()
        self.inshape = _checks.check_shape(inshape, "inshape")
        self.int_steps = _checks.positive_int(int_steps, "int_steps (the template model is "
                                       "diffeomorphic: scaling-and-squaring steps)")
        self.int_downsize = _checks.positive_int(int_downsize, "int_downsize")
        self.mean_cap = _checks.positive_int(mean_cap, "mean_cap")
        self.registration = VxmDense(self.inshape, nb_features=nb_features,
                                     int_steps=self.int_steps, int_downsize=self.int_downsize,
                                     bidir=True, nb_unet_levels=nb_unet_levels)
        ndim = len(self.inshape)
        self.register_buffer("mean_velocity",
                             torch.zeros(1, ndim, *self.registration.velocity_shape))
        self.register_buffer("mean_count", torch.zeros((), dtype=torch.int64))

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.inshape)

    def _base_config(self) -> dict[str, Any]:
        reg = self.registration.config
        return {
            "inshape": list(self.inshape),
            "nb_features": reg["nb_features"],
            "int_steps": self.int_steps,
            "int_downsize": self.int_downsize,
            "mean_cap": self.mean_cap,
            "nb_unet_levels": reg["nb_unet_levels"],
        }

    def template_for(self, batch: int, attributes: Tensor | None = None) -> Tensor:
        """The template for each of ``batch`` subjects, ``(batch, 1, *inshape)``."""
        raise NotImplementedError

    def _check_subject(self, subject: Tensor) -> None:
        _checks.as_tensor(subject, "subject")
        if subject.dim() != self.ndim + 2 or subject.shape[1] != 1 or \
                tuple(subject.shape[2:]) != self.inshape:
            raise ValueError(
                f"subject must have shape (B, 1, {', '.join(map(str, self.inshape))}) (the "
                f"template's grid), got {tuple(subject.shape)}"
            )

    def forward(self, subject: Tensor, attributes: Tensor | None = None) -> TemplateOutput:
        """Register the template to each subject.

        Args:
            subject: ``(B, 1, *inshape)`` images.
            attributes: ``(B, n_attributes)`` raw attribute values (conditional models only).

        Returns:
            A :class:`TemplateOutput`.
        """
        self._check_subject(subject)
        template = self.template_for(subject.shape[0], attributes)
        moved, moved_subject, disp, velocity = self.registration(
            template, subject, return_velocity=True)
        return TemplateOutput(moved, moved_subject, disp, velocity, template)

    def mean_stream(self, velocity: Tensor) -> Tensor:
        """Running mean of the velocity fields including this batch, ``(1, ndim, *grid)``.

        As VoxelMorph's ``MeanStream``: ``m = (n * old + sum(batch)) / (n + B)`` with ``n`` the
        number of subjects seen so far, capped at ``mean_cap``; the gradient flows through the
        batch part only. In training mode the stored mean and count are updated.
        """
        batch = velocity.shape[0]
        seen = float(min(int(self.mean_count), self.mean_cap))
        mean = (seen * self.mean_velocity.detach() + velocity.sum(0, keepdim=True)) / (seen + batch)
        if self.training:
            with torch.no_grad():
                self.mean_velocity.copy_(mean.detach())
                self.mean_count.add_(batch)
        return mean


class TemplateCreation(TemplateModel):
    """An unconditional learned template registered to subjects (Dalca et al. 2019).

    Args:
        inshape: spatial shape of the template (= of every subject), 2 or 3 integers.
        template_init: initial template, ``(*inshape)`` or ``(1, 1, *inshape)`` (e.g. the voxel-wise
            mean of the training images); zeros when not given (a checkpoint then fills it).
        nb_features: UNet features of the registration network (see :class:`~voxreg.nn.networks.Unet`).
        int_steps: scaling-and-squaring steps (> 0: the deformation is diffeomorphic).
        int_downsize: the velocity lives on a grid this many times coarser.
        mean_cap: the mean stream averages over at most this many past subjects.
        nb_unet_levels: with an integer ``nb_features``.

    Forward: ``subject (B, 1, *inshape)`` -> :class:`TemplateOutput`.
    """

    def __init__(
        self,
        inshape: Sequence[int],
        template_init: Any = None,
        nb_features: Sequence[Sequence[int]] | int | None = None,
        int_steps: int = 7,
        int_downsize: int = 2,
        mean_cap: int = 100,
        nb_unet_levels: int | None = None,
    ):
        super().__init__(inshape, nb_features, int_steps, int_downsize, mean_cap, nb_unet_levels)
        self.template = nn.Parameter(_init_image(template_init, self.inshape, "template_init"))

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable ``{"class": "TemplateCreation", **constructor_args}`` (the initial
        template is not in it: it is a weight)."""
        return {"class": type(self).__name__, **self._base_config()}

    def template_for(self, batch: int, attributes: Tensor | None = None) -> Tensor:
        if attributes is not None:
            raise ValueError("an unconditional TemplateCreation model takes no attributes")
        return self.template.expand(batch, *self.template.shape[1:])

    def template_image(self) -> np.ndarray:
        """The learned template, ``(*inshape)`` float32."""
        return self.template.detach()[0, 0].cpu().numpy().astype(np.float32)


class _AttributeDecoder(nn.Module):
    """Attributes ``(B, A)`` -> an image ``(B, 1, *inshape)``: two dense layers to a coarse feature
    map, then [x2 linear upsampling, 3x3 conv, LeakyReLU(0.2)] per level and a zero-initialised
    3x3 conv to one channel (so a fresh decoder adds nothing)."""

    def __init__(self, inshape: tuple[int, ...], n_attributes: int, features: Sequence[int],
                 hidden: int):
        super().__init__()
        ndim = len(inshape)
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.inshape = inshape
        self.coarse = tuple(max(1, math.ceil(s / 2 ** (len(features) - 1))) for s in inshape)
        self.features = [int(f) for f in features]
        self.dense = nn.Sequential(
            nn.Linear(n_attributes, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, self.features[0] * math.prod(self.coarse)), nn.LeakyReLU(0.2),
        )
        self.convs = nn.ModuleList(
            conv(a, b, 3, padding=1) for a, b in zip(self.features[:-1], self.features[1:]))
        self.activation = nn.LeakyReLU(0.2)
        self.head = conv(self.features[-1], 1, 3, padding=1)
        with torch.no_grad():
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self._mode = "bilinear" if ndim == 2 else "trilinear"

    def forward(self, attributes: Tensor) -> Tensor:
        x = self.dense(attributes).view(attributes.shape[0], self.features[0], *self.coarse)
        for conv in self.convs:
            size = tuple(min(2 * s, t) for s, t in zip(x.shape[2:], self.inshape))
            x = F.interpolate(x, size=size, mode=self._mode, align_corners=False)
            x = self.activation(conv(x))
        if tuple(x.shape[2:]) != self.inshape:
            x = F.interpolate(x, size=self.inshape, mode=self._mode, align_corners=False)
        return self.head(x)


class ConditionalTemplate(TemplateModel):
    """A template conditioned on attributes: ``template(a) = mean_image + decoder(a)``.

    The decoder (dense layers to a coarse feature map, upsampling convolutions, a zero-initialised
    last conv) and the registration network are trained jointly, as in Dalca et al. 2019.
    Attributes are given in their own units (e.g. years) and standardised inside with
    ``(a - attribute_center) / attribute_scale``.

    Args:
        inshape: spatial shape of the template, 2 or 3 integers.
        n_attributes: length of the attribute vector.
        mean_image: ``(*inshape)`` or ``(1, 1, *inshape)`` base image (the voxel-wise mean of the
            training images); zeros when not given (a checkpoint then fills it).
        attribute_names: one name per attribute (e.g. ``["age"]``), kept for the records.
        attribute_center, attribute_scale: per-attribute standardisation (default 0 and 1;
            :func:`train_template` uses the training mean and standard deviation).
        decoder_features: channels per decoder level, coarse to fine; the coarse grid is
            ``inshape / 2**(len - 1)``.
        decoder_hidden: width of the first dense layer.
        nb_features, int_steps, int_downsize, mean_cap, nb_unet_levels: as
            :class:`TemplateCreation`.

    Forward: ``subject (B, 1, *inshape)``, ``attributes (B, n_attributes)`` ->
    :class:`TemplateOutput`.
    """

    def __init__(
        self,
        inshape: Sequence[int],
        n_attributes: int = 1,
        mean_image: Any = None,
        attribute_names: Sequence[str] | None = None,
        attribute_center: Sequence[float] | None = None,
        attribute_scale: Sequence[float] | None = None,
        decoder_features: Sequence[int] = (16, 16, 16, 16),
        decoder_hidden: int = 32,
        nb_features: Sequence[Sequence[int]] | int | None = None,
        int_steps: int = 7,
        int_downsize: int = 2,
        mean_cap: int = 100,
        nb_unet_levels: int | None = None,
    ):
        super().__init__(inshape, nb_features, int_steps, int_downsize, mean_cap, nb_unet_levels)
        self.n_attributes = _checks.positive_int(n_attributes, "n_attributes")
        names = [f"attribute{k}" for k in range(self.n_attributes)] if attribute_names is None \
            else [str(n) for n in attribute_names]
        center = [0.0] * self.n_attributes if attribute_center is None \
            else [float(v) for v in attribute_center]
        scale = [1.0] * self.n_attributes if attribute_scale is None \
            else [float(v) for v in attribute_scale]
        for what, values in (("attribute_names", names), ("attribute_center", center),
                             ("attribute_scale", scale)):
            if len(values) != self.n_attributes:
                raise ValueError(f"{what} must hold {self.n_attributes} values, got {len(values)}")
        if not all(math.isfinite(v) for v in center) or not all(
                math.isfinite(v) and v > 0 for v in scale):
            raise ValueError(f"attribute_center must be finite and attribute_scale positive, got "
                             f"{center} and {scale}")
        features = [_checks.positive_int(f, "decoder_features") for f in decoder_features]
        if not features:
            raise ValueError("decoder_features must hold at least one level")
        self.attribute_names, self.attribute_center, self.attribute_scale = names, center, scale
        self.decoder_features = features
        self.decoder_hidden = _checks.positive_int(decoder_hidden, "decoder_hidden")
        self.register_buffer("mean_image", _init_image(mean_image, self.inshape, "mean_image"))
        self.decoder = _AttributeDecoder(self.inshape, self.n_attributes, features,
                                         self.decoder_hidden)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable ``{"class": "ConditionalTemplate", **constructor_args}``."""
        return {
            "class": type(self).__name__,
            **self._base_config(),
            "n_attributes": self.n_attributes,
            "attribute_names": list(self.attribute_names),
            "attribute_center": list(self.attribute_center),
            "attribute_scale": list(self.attribute_scale),
            "decoder_features": list(self.decoder_features),
            "decoder_hidden": self.decoder_hidden,
        }

    def _attributes(self, attributes: Any, batch: int | None = None) -> Tensor:
        device, dtype = self.mean_image.device, self.mean_image.dtype
        a = torch.as_tensor(attributes, dtype=dtype, device=device)
        if a.dim() == 1 and self.n_attributes == 1 and (batch is None or a.shape[0] == batch):
            a = a[:, None]
        if a.dim() != 2 or a.shape[1] != self.n_attributes or (batch is not None
                                                             and a.shape[0] != batch):
            want = f"({batch if batch is not None else 'B'}, {self.n_attributes})"
            raise ValueError(f"attributes must have shape {want}, got {tuple(a.shape)}")
        if not torch.isfinite(a).all():
            raise ValueError("attributes must be finite numbers")
        center = torch.tensor(self.attribute_center, device=device, dtype=dtype)
        scale = torch.tensor(self.attribute_scale, device=device, dtype=dtype)
        return (a - center) / scale

    def template_for(self, batch: int, attributes: Tensor | None = None) -> Tensor:
        if attributes is None:
            raise ValueError(
                f"a ConditionalTemplate needs attributes ({', '.join(self.attribute_names)}) for "
                "each subject")
        a = self._attributes(attributes, batch)
        return self.mean_image + self.decoder(a)


def _init_image(value: Any, shape: tuple[int, ...], name: str) -> Tensor:
    """``(1, 1, *shape)`` float tensor from ``value`` (``None``: zeros)."""
    if value is None:
        return torch.zeros(1, 1, *shape)
    image = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, Tensor)
                                       else value), dtype=torch.get_default_dtype())
    if tuple(image.shape) == shape:
        image = image[None, None]
    if tuple(image.shape) != (1, 1, *shape):
        raise ValueError(f"{name} must have shape {shape} or (1, 1, *{shape}), got "
                         f"{tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError(f"{name} must be finite")
    return image.clone()


TEMPLATE_CLASSES: dict[str, type[TemplateModel]] = {
    "TemplateCreation": TemplateCreation,
    "ConditionalTemplate": ConditionalTemplate,
}


def build_template_model(config: dict[str, Any]) -> TemplateModel:
    """Rebuild a template model (untrained) from its :attr:`config`."""
    if not isinstance(config, dict) or config.get("class") not in TEMPLATE_CLASSES:
        raise ValueError(
            f"not a template model config (class must be one of {sorted(TEMPLATE_CLASSES)}): {config!r}")
    args = dict(config)
    return TEMPLATE_CLASSES[args.pop("class")](**args)


def image_batch(images: Any, inshape: tuple[int, ...], name: str = "images") -> Tensor:
    """``(N, 1, *inshape)`` float tensor on the CPU from ``(N, *inshape)`` or ``(N, 1, *inshape)``."""
    x = images.detach().cpu() if isinstance(images, Tensor) else torch.from_numpy(
        np.ascontiguousarray(np.asarray(images)))
    x = x.to(torch.get_default_dtype())
    if x.dim() == len(inshape) + 1:
        x = x[:, None]
    if x.dim() != len(inshape) + 2 or x.shape[1] != 1 or tuple(x.shape[2:]) != tuple(inshape):
        raise ValueError(f"{name} must have shape (N, {', '.join(map(str, inshape))}) or "
                         f"(N, 1, ...), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return x


def attribute_batch(attributes: Any, n: int, n_attributes: int) -> Tensor:
    a = torch.as_tensor(np.asarray(attributes, dtype=np.float64), dtype=torch.get_default_dtype())
    if a.dim() == 1 and n_attributes == 1:
        a = a[:, None]
    if a.dim() != 2 or a.shape != (n, n_attributes):
        raise ValueError(f"attributes must have shape ({n}, {n_attributes}) (one row per image), "
                         f"got {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError("attributes must be finite numbers (one per image)")
    return a
