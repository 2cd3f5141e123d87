"""Template (atlas) construction: learn an unbiased template with a registration network.

The method of Dalca, Rakic, Guttag and Sabuncu, "Learning Conditional Deformable Templates with
Convolutional Networks" (NeurIPS 2019), as VoxelMorph's ``TemplateCreation`` models:

* :class:`TemplateCreation`: the template is a learned image (an ``nn.Parameter`` initialised from
  the voxel-wise mean of the inputs), registered to each subject by a diffeomorphic bidirectional
  :class:`~voxreg.networks.VxmDense` (``moving = template``, ``fixed = subject``).
* :class:`ConditionalTemplate`: the template is ``mean image + decoder(attributes)``: a small
  network turns an attribute vector (e.g. age) into an image offset, trained jointly with the
  registration network; :func:`templates_at` draws templates at several attribute values.

Training (:class:`TemplateTrainer` or :func:`train_template`) minimises, per batch of subjects,

==========================  ==================================================================
``transformer_loss``        image loss ``(subject, template warped to the subject)``
``neg_transformer_loss``    image loss ``(template, subject warped to the template)``
``mean_loss``               ``mean(m**2)`` with ``m`` the running mean of the velocity fields
                            (VoxelMorph's ``MeanStream``: the mean over the last ``mean_cap``
                            subjects, the current batch carrying the gradient); it keeps the
                            template at the centre of the population
``flow_loss``               ``Grad("l2")`` smoothness of the velocity field
==========================  ==================================================================

with weights ``0.5, 0.5, mean_weight, lambda_``. Each epoch also logs ``mean_disp_rms`` (RMS over
voxels of the epoch's mean displacement, in voxels: near 0 when the template is centred),
``disp_rms`` (RMS displacement of single subjects, for scale) and, for an unconditional model,
``sharpness`` (:func:`sharpness` of the template).

Conventions (see ``docs/conventions.md``): images ``(B, C, *spatial)``; ``disp`` is the field on
the subject grid that warps the template onto the subject, ``moved(x) = template(x + disp(x))``;
the inverse field (:func:`register_to_template`'s ``inverse``) lives on the template grid and
warps the subject onto the template.

Models are saved with :func:`voxreg.checkpoint.save_model` (safetensors, no pickle): the
template is a tensor of the model (``template`` for :class:`TemplateCreation`, ``mean_image`` plus
the decoder for :class:`ConditionalTemplate`). :func:`load_template_model` reads them back
(``voxreg.networks.build_model`` does not know these classes).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxreg import _checks
from voxreg import transforms as T
from voxreg.checkpoint import load_checkpoint, read_checkpoint, save_model
from voxreg.networks import VxmDense

__all__ = [
    "CHECKPOINT_NAME",
    "ConditionalTemplate",
    "MODEL_NAME",
    "TemplateCreation",
    "TemplateOutput",
    "TemplateTrainer",
    "build_template_model",
    "image_id",
    "load_template_model",
    "mean_displacement",
    "propagate_labels",
    "read_attributes",
    "register_to_template",
    "sharpness",
    "template_dice",
    "templates_at",
    "train_template",
]

CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_NAME = "model.safetensors"
HISTORY_NAME = "history.csv"
PLOT_NAME = "loss.png"
SNAPSHOT_DIR = "snapshots"


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _non_negative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


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


class _TemplateModel(nn.Module):
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
        self.int_steps = _positive_int(int_steps, "int_steps (the template model is "
                                       "diffeomorphic: scaling-and-squaring steps)")
        self.int_downsize = _positive_int(int_downsize, "int_downsize")
        self.mean_cap = _positive_int(mean_cap, "mean_cap")
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


class TemplateCreation(_TemplateModel):
    """An unconditional learned template registered to subjects (Dalca et al. 2019).

    Args:
        inshape: spatial shape of the template (= of every subject), 2 or 3 integers.
        template_init: initial template, ``(*inshape)`` or ``(1, 1, *inshape)`` (e.g. the voxel-wise
            mean of the training images); zeros when not given (a checkpoint then fills it).
        nb_features: UNet features of the registration network (see :class:`~voxreg.networks.Unet`).
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


class ConditionalTemplate(_TemplateModel):
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
        self.n_attributes = _positive_int(n_attributes, "n_attributes")
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
        features = [_positive_int(f, "decoder_features") for f in decoder_features]
        if not features:
            raise ValueError("decoder_features must hold at least one level")
        self.attribute_names, self.attribute_center, self.attribute_scale = names, center, scale
        self.decoder_features = features
        self.decoder_hidden = _positive_int(decoder_hidden, "decoder_hidden")
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


_CLASSES: dict[str, type[_TemplateModel]] = {
    "TemplateCreation": TemplateCreation,
    "ConditionalTemplate": ConditionalTemplate,
}


def build_template_model(config: dict[str, Any]) -> _TemplateModel:
    """Rebuild a template model (untrained) from its :attr:`config`."""
    if not isinstance(config, dict) or config.get("class") not in _CLASSES:
        raise ValueError(
            f"not a template model config (class must be one of {sorted(_CLASSES)}): {config!r}")
    args = dict(config)
    return _CLASSES[args.pop("class")](**args)


def load_template_model(path_or_name: str | os.PathLike,
                        device: str | torch.device | None = "cpu") -> _TemplateModel:
    """Load a template model saved with :func:`voxreg.checkpoint.save_model` (a file, or the
    name of a shipped model such as ``"template2d"``); eval mode, ``.metadata`` attached."""
    import json

    meta, _, path = read_checkpoint(path_or_name)
    config = json.loads(meta.get("config", "{}"))
    if config.get("class") not in _CLASSES:
        raise ValueError(f"{str(path)!r} holds a {config.get('class')!r} model, not a template "
                         f"model ({', '.join(sorted(_CLASSES))})")
    checkpoint = load_checkpoint(path, device=device, model=build_template_model(config))
    model = checkpoint.model
    model.eval()
    model.metadata = checkpoint.metadata  # type: ignore[attr-defined]
    return model  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# measures and uses of a trained template
# --------------------------------------------------------------------------------------------


def sharpness(image: Any, mask: Any = None, measure: str = "rms") -> float:
    """How sharp an image is, from its gradient magnitude ``|grad I|`` (voxel units; central
    differences inside, one-sided at the border, as :func:`numpy.gradient`).

    Args:
        image: ``(*spatial)`` array or tensor, 2D or 3D (leading axes of size 1 are dropped).
        mask: boolean ``(*spatial)``: average over these voxels only.
        measure: ``"rms"`` (default): root mean square of ``|grad I|``; ``"mean"``: its mean.
            Blurring lowers both where edges of different images disagree, but it keeps the mean
            of ``|grad I|`` across a single isolated edge (the total variation of a monotone
            profile is invariant to blur), while the RMS drops: use ``"rms"`` to tell a sharp
            template from a blurred average.
    """
    if measure not in ("rms", "mean"):
        raise ValueError(f"measure must be 'rms' or 'mean', got {measure!r}")
    array = np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image,
                       dtype=np.float64)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3) or min(array.shape) < 2:
        raise ValueError(f"image must be 2D or 3D with at least 2 voxels per axis, got shape "
                         f"{array.shape}")
    magnitude = np.sqrt(sum(g**2 for g in np.gradient(array)))
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != array.shape:
            raise ValueError(f"mask must have the image's shape {array.shape}, got {mask.shape}")
        if not mask.any():
            raise ValueError("mask is empty")
        magnitude = magnitude[mask]
    if measure == "mean":
        return float(magnitude.mean())
    return float(np.sqrt((magnitude**2).mean()))


def _as_batch(images: Any, inshape: tuple[int, ...], name: str = "images") -> Tensor:
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


def _as_attributes(attributes: Any, n: int, n_attributes: int) -> Tensor:
    a = torch.as_tensor(np.asarray(attributes, dtype=np.float64), dtype=torch.get_default_dtype())
    if a.dim() == 1 and n_attributes == 1:
        a = a[:, None]
    if a.dim() != 2 or a.shape != (n, n_attributes):
        raise ValueError(f"attributes must have shape ({n}, {n_attributes}) (one row per image), "
                         f"got {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError("attributes must be finite numbers (one per image)")
    return a


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


_OUTPUTS = ("moved_template", "moved_subject", "disp", "inverse", "template")


def _registrations(model: _TemplateModel, images: Any, attributes: Any, batch_size: int,
                   keys: Sequence[str]):
    """Yield ``(start, {key: numpy batch})`` of the template registered to ``images``, batch by
    batch (no gradients, eval mode), so that whole populations of 3D fields never sit in memory."""
    unknown = [k for k in keys if k not in _OUTPUTS]
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; known: {', '.join(_OUTPUTS)}")
    x = _as_batch(images, model.inshape)
    conditional = isinstance(model, ConditionalTemplate)
    if not conditional and attributes is not None:
        raise ValueError("an unconditional template model takes no attributes")
    a = _as_attributes(attributes, len(x), model.n_attributes) if conditional else None
    batch_size = _positive_int(batch_size, "batch_size")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                res = model(x[s:s + batch_size].to(device),
                            None if a is None else a[s:s + batch_size].to(device))
                values = {"moved_template": res.moved_template,
                          "moved_subject": res.moved_subject, "disp": res.disp,
                          "template": res.template}
                out = {k: values[k].cpu().numpy() for k in keys if k != "inverse"}
                if "inverse" in keys:
                    inverse = T.integrate_velocity(-res.velocity, model.int_steps)
                    out["inverse"] = T.resize_disp(inverse, shape=model.inshape).cpu().numpy()
                yield s, out
    finally:
        model.train(was_training)


def register_to_template(
    model: _TemplateModel,
    images: Any,
    attributes: Any = None,
    batch_size: int = 8,
    outputs: Sequence[str] = _OUTPUTS,
) -> dict[str, np.ndarray]:
    """Register every image to the template (no gradients, eval mode).

    Args:
        model: a trained template model.
        images: ``(N, *inshape)`` or ``(N, 1, *inshape)``.
        attributes: ``(N, n_attributes)`` for a conditional model.
        batch_size: subjects per forward pass.
        outputs: which of the arrays below to return (all by default).

    Returns:
        numpy arrays: ``moved_template`` and ``moved_subject`` ``(N, 1, *inshape)``, ``disp`` (on
        the subject grid: template -> subject) and ``inverse`` (on the template grid: warps the
        subject onto the template, ``exp(-velocity)``) ``(N, ndim, *inshape)``, ``template``
        ``(N, 1, *inshape)``.
    """
    parts: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
    for _, batch in _registrations(model, images, attributes, batch_size, outputs):
        for k, v in batch.items():
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def mean_displacement(model: _TemplateModel, images: Any, attributes: Any = None,
                      batch_size: int = 8) -> dict[str, float]:
    """How centred the template is: ``mean_disp_rms`` (RMS over voxels of the mean displacement
    of all ``images``, voxels), ``disp_rms`` (RMS over subjects and voxels of the displacements)
    and ``ratio`` (their ratio; 0 for a perfectly centred template, about 1 if every subject moved
    the same way)."""
    total, squares, count = None, 0.0, 0
    for _, batch in _registrations(model, images, attributes, batch_size, ["disp"]):
        disp = batch["disp"].astype(np.float64)
        total = disp.sum(0) if total is None else total + disp.sum(0)
        squares += float((disp**2).sum(1).mean(tuple(range(1, disp.ndim - 1))).sum())
        count += len(disp)
    mean = total / count
    mean_rms = float(np.sqrt((mean**2).sum(0).mean()))
    disp_rms = float(np.sqrt(squares / count))
    return {"mean_disp_rms": mean_rms, "disp_rms": disp_rms,
            "ratio": mean_rms / disp_rms if disp_rms > 0 else float("nan")}


def templates_at(model: ConditionalTemplate, values: Any) -> np.ndarray:
    """Templates of a conditional model at attribute ``values`` (``(K,)`` for one attribute, or
    ``(K, n_attributes)``), in the attributes' own units; returns ``(K, *inshape)`` float32."""
    if not isinstance(model, ConditionalTemplate):
        raise TypeError(f"templates_at needs a ConditionalTemplate, got {type(model).__name__}")
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 0:
        a = a[None]
    with torch.no_grad():
        a_t = torch.as_tensor(a, dtype=torch.get_default_dtype(), device=_device_of(model))
        if a_t.dim() == 1:
            if model.n_attributes != 1:
                raise ValueError(f"values must have shape (K, {model.n_attributes}), got {a.shape}")
            a_t = a_t[:, None]
        templates = model.template_for(a_t.shape[0], a_t)
    return templates[:, 0].cpu().numpy().astype(np.float32)


def propagate_labels(
    model: _TemplateModel,
    images: Any,
    labels: Any,
    attributes: Any = None,
) -> np.ndarray:
    """Labels for the template: each subject's label map is warped onto the template (nearest
    neighbour, by the inverse field) and every voxel takes the majority label.

    For a conditional model each subject is registered to the template at its own attributes,
    so the vote gives labels that fit the templates of the population only on average.

    Args:
        model: a trained template model.
        images: ``(N, *inshape)`` training images.
        labels: ``(N, *inshape)`` integer label maps of the same subjects.
        attributes: ``(N, n_attributes)`` for a conditional model.

    Returns:
        ``(*inshape)`` int32 label map on the template grid.
    """
    labels = np.asarray(labels)
    if labels.shape[0] != len(images) or tuple(labels.shape[1:]) != tuple(model.inshape):
        raise ValueError(f"labels must have shape ({len(images)}, "
                         f"{', '.join(map(str, model.inshape))}), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer label maps, got dtype {labels.dtype}")
    values = np.unique(labels)
    index = np.searchsorted(values, labels).astype(np.int64)  # label -> 0..L-1
    count_dtype = np.uint8 if len(labels) < 255 else (np.uint16 if len(labels) < 65535
                                                       else np.uint32)
    n_vox = math.prod(model.inshape)
    votes = np.zeros((len(values), n_vox), dtype=count_dtype)
    voxels = np.arange(n_vox)
    for start, batch in _registrations(model, images, attributes, 4, ["inverse"]):
        seg = torch.from_numpy(index[start:start + len(batch["inverse"])])[:, None]
        warped = T.warp(seg, torch.from_numpy(batch["inverse"]), interp="nearest").numpy()
        for one in warped:
            votes[one.reshape(-1), voxels] += 1
    return values[votes.argmax(0)].reshape(model.inshape).astype(np.int32)


def template_dice(
    model: _TemplateModel,
    template_labels: Any,
    images: Any,
    labels: Any,
    attributes: Any = None,
) -> dict[str, Any]:
    """Dice of subjects against the template's labels warped onto them (nearest neighbour).

    The score of a subject is the mean Dice over the non-zero labels present in both its map and
    the template's (:func:`voxreg.metrics.mean_dice_present`); ``before`` compares the template's
    labels unwarped (identity).

    Returns:
        ``dice_before``, ``dice_after`` (means over subjects), ``dice_before_per_subject``,
        ``dice_after_per_subject``, ``folding_pct`` (mean % of voxels with a Jacobian determinant
        <= 0 in the template -> subject fields).
    """
    from voxreg.metrics import mean_dice_present

    template_labels = np.asarray(template_labels)
    labels = np.asarray(labels)
    if tuple(template_labels.shape) != tuple(model.inshape):
        raise ValueError(f"template_labels must have shape {model.inshape}, got "
                         f"{template_labels.shape}")
    if labels.shape[0] != len(images) or tuple(labels.shape[1:]) != tuple(model.inshape):
        raise ValueError(f"labels must have shape ({len(images)}, *{model.inshape}), got "
                         f"{labels.shape}")
    seg = torch.from_numpy(template_labels.astype(np.int64))[None, None]
    before, after, folding = [], [], []
    for start, batch in _registrations(model, images, attributes, 4, ["disp"]):
        disp = torch.from_numpy(batch["disp"])
        folding += (T.folding_fraction(disp) * 100).tolist()
        for k in range(len(disp)):
            moved = T.warp(seg, disp[k:k + 1], interp="nearest")[0, 0].numpy()
            before.append(mean_dice_present(labels[start + k], template_labels))
            after.append(mean_dice_present(labels[start + k], moved, template_labels))
    return {
        "dice_before": float(np.nanmean(before)),
        "dice_after": float(np.nanmean(after)),
        "dice_before_per_subject": before,
        "dice_after_per_subject": after,
        "folding_pct": float(np.mean(folding)),
    }


# --------------------------------------------------------------------------------------------
# attributes from a table
# --------------------------------------------------------------------------------------------


def image_id(path: str | os.PathLike) -> str:
    """A file's name without its image extension: ``sub/IXI012-HH-1211.nii.gz`` ->
    ``IXI012-HH-1211``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mgz", ".mgh", ".npz", ".npy"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def read_attributes(table: str | os.PathLike, columns: Sequence[str] | str,
                    images: Sequence[str | os.PathLike]) -> np.ndarray:
    """The attribute values of each image from a CSV table.

    Rows are matched to images by an ``id`` (or ``subject``) column holding the file names
    without extension (see :func:`image_id`), or by a ``path`` (or ``image``) column holding the
    files (relative paths are taken from the table's folder).

    Args:
        table: the CSV file (with a header row).
        columns: the attribute column(s), e.g. ``"age"``.
        images: the image files, in training order.

    Returns:
        ``(N, len(columns))`` float64.

    Raises:
        FileNotFoundError, ValueError: a missing table, column, image row or number (the message
        names the file, the column and the image).
    """
    import csv

    table = Path(table)
    columns = [columns] if isinstance(columns, str) else [str(c) for c in columns]
    if not columns:
        raise ValueError("give at least one attribute column")
    if not table.is_file():
        raise FileNotFoundError(f"attributes table {str(table)!r} does not exist")
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        header = [(c or "").strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"attributes table {str(table)!r} has no column {missing[0]!r} "
                         f"(columns: {', '.join(header)})")
    key = next((c for c in ("id", "subject", "path", "image") if c in header), None)
    if key is None:
        raise ValueError(f"attributes table {str(table)!r} needs an 'id' (file name without "
                         "extension) or 'path' column to match its rows to the images")
    by_key: dict[str, tuple[int, dict[str, str]]] = {}
    for number, row in enumerate(rows, start=2):
        value = row.get(key, "")
        if not value:
            continue
        if key in ("path", "image"):
            path = Path(value).expanduser()
            value = str((path if path.is_absolute() else table.parent / path).resolve())
        by_key.setdefault(value, (number, row))
    out = np.empty((len(images), len(columns)))
    for i, image in enumerate(images):
        lookup = image_id(image) if key in ("id", "subject") else str(Path(image).resolve())
        if lookup not in by_key:
            raise ValueError(f"image {str(image)!r} has no row in {str(table)!r} (looked for "
                             f"{key} = {lookup!r})")
        number, row = by_key[lookup]
        for j, column in enumerate(columns):
            text = row.get(column, "")
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not math.isfinite(value):
                raise ValueError(f"{str(table)!r} line {number}: {column} of image "
                                 f"{str(image)!r} is {text!r}, not a number")
            out[i, j] = value
    return out


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


class TemplateTrainer:
    """Train a template model with Adam on the losses of the module doc.

    Args:
        model: a :class:`TemplateCreation` or :class:`ConditionalTemplate`.
        images: ``(N, *inshape)`` or ``(N, 1, *inshape)`` training images (kept on the CPU, sent
            to the device batch by batch).
        attributes: ``(N, n_attributes)`` (or ``(N,)``) for a conditional model.
        epochs: total epochs (a resumed run continues up to it).
        steps_per_epoch: optimizer steps per epoch (default ``max(1, N // batch_size)``).
        batch_size: subjects per step, drawn at random (each epoch's draw is fixed by ``seed`` and
            the epoch, so a resumed run sees the batches an uninterrupted one would).
        lr: Adam learning rate (template, decoder and registration network alike).
        image_loss: ``"mse"`` or ``"ncc"`` (or a callable ``(y_true, y_pred) -> scalar``).
        lambda_: weight of the velocity smoothness ``Grad("l2")``.
        mean_weight: weight of the mean-stream penalty.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seeds the batch draws and torch's RNG each epoch.
        out_dir: run folder for ``history.csv``, ``loss.png``, ``checkpoint.safetensors``
            (every ``checkpoint_every`` epochs and at the end), ``model.safetensors`` (at the
            end) and ``snapshots/``; ``loss.png`` is drawn at the end and at most once a minute
            on the way.
        checkpoint_every: epochs between checkpoints.
        snapshot_every: every this many epochs (and at the end) write the template as a PNG
            (mid-slices) and an image file into ``out_dir/snapshots`` (a conditional model:
            at ``snapshot_attributes``).
        snapshot_attributes: attribute values of the snapshots of a conditional model (default:
            the 10th, 50th and 90th percentile of the training attributes).
        affine: ``(4, 4)`` voxel-to-world matrix of the snapshot files (default identity).
        snapshot_format: extension of the snapshot images (``".nii.gz"``, ``".npy"``...).
        resume: ``True`` continues from ``out_dir/checkpoint.safetensors`` if it exists; or a
            checkpoint path.
        time_budget: seconds; no new epoch is started once the elapsed time plus the slowest
            epoch so far would exceed it (at least one epoch runs).
        progress: tqdm bar per epoch.
        verbose: print one line per epoch.
        metadata: stored in the checkpoints.
    """

    def __init__(
        self,
        model: _TemplateModel,
        images: Any,
        attributes: Any = None,
        epochs: int = 1,
        steps_per_epoch: int | None = None,
        batch_size: int = 1,
        lr: float = 1e-3,
        image_loss: str | Callable[[Tensor, Tensor], Tensor] = "mse",
        lambda_: float = 0.01,
        mean_weight: float = 1.0,
        device: str | torch.device | None = "auto",
        seed: int = 0,
        out_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        snapshot_every: int | None = None,
        snapshot_attributes: Any = None,
        affine: Any = None,
        snapshot_format: str = ".nii.gz",
        resume: bool | str | os.PathLike = False,
        time_budget: float | None = None,
        progress: bool = True,
        verbose: bool = True,
        metadata: dict[str, Any] | None = None,
    ):
        from voxreg.training import _pick_device, resolve_loss

        if not isinstance(model, _TemplateModel):
            raise TypeError(f"model must be a TemplateCreation or ConditionalTemplate, got "
                            f"{type(model).__name__}")
        self.model = model
        self.images = _as_batch(images, model.inshape)
        self.conditional = isinstance(model, ConditionalTemplate)
        if self.conditional:
            if attributes is None:
                raise ValueError("a ConditionalTemplate needs attributes, one row per image")
            self.attributes = _as_attributes(attributes, len(self.images), model.n_attributes)
        else:
            if attributes is not None:
                raise ValueError("attributes were given but the model is unconditional "
                                 "(use a ConditionalTemplate)")
            self.attributes = None
        self.epochs = _positive_int(epochs, "epochs")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.steps_per_epoch = (max(1, len(self.images) // self.batch_size)
                                if steps_per_epoch is None
                                else _positive_int(steps_per_epoch, "steps_per_epoch"))
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
                math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.lr = float(lr)
        self.lambda_ = _non_negative(lambda_, "lambda_")
        self.mean_weight = _non_negative(mean_weight, "mean_weight")
        if isinstance(image_loss, str) and image_loss.lower() not in ("mse", "ncc"):
            raise ValueError(f"image_loss must be 'mse' or 'ncc' (or a callable), got {image_loss!r}")
        self.image_loss_name = image_loss if isinstance(image_loss, str) else getattr(
            image_loss, "__name__", type(image_loss).__name__)
        self.image_loss = resolve_loss(image_loss)
        self.smooth_loss = resolve_loss("grad", loss_mult=model.int_downsize)
        self.device = _pick_device(device)
        self.seed = int(seed)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.checkpoint_every = _positive_int(checkpoint_every, "checkpoint_every")
        self.snapshot_every = (None if snapshot_every in (None, 0)
                               else _positive_int(snapshot_every, "snapshot_every"))
        if self.snapshot_every and self.out_dir is None:
            raise ValueError("snapshot_every needs out_dir (where the snapshots go)")
        if resume and self.out_dir is None and not isinstance(resume, (str, os.PathLike)):
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")
        self.resume = resume
        if time_budget is not None and not (isinstance(time_budget, (int, float))
                                            and time_budget > 0):
            raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget!r}")
        self.time_budget = time_budget
        self.affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be a (4, 4) matrix, got shape {self.affine.shape}")
        self.snapshot_format = snapshot_format
        if self.conditional:
            if snapshot_attributes is None:
                snapshot_attributes = np.percentile(self.attributes.numpy(), [10, 50, 90], axis=0)
            self.snapshot_attributes = np.asarray(snapshot_attributes, dtype=np.float64).reshape(
                -1, model.n_attributes)
        else:
            self.snapshot_attributes = None
        self.progress = progress
        self.verbose = verbose
        self.metadata = dict(metadata or {})
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.epoch = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self._plotted = time.perf_counter()
        self.names = ["transformer_loss", "neg_transformer_loss", "mean_loss", "flow_loss"]
        self.weights = [0.5, 0.5, self.mean_weight, self.lambda_]

    # -----------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "image_loss": self.image_loss_name, "lambda": self.lambda_,
            "mean_weight": self.mean_weight, "loss_weights": self.weights, "lr": self.lr,
            "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed, "images": len(self.images),
        }

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        """``(steps, batch_size)`` image indices of an epoch (fixed by the seed and the epoch)."""
        n = len(self.images)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), 13])
        need = self.steps_per_epoch * self.batch_size
        order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])
        return order[:need].reshape(self.steps_per_epoch, self.batch_size)

    def _terms(self, out: TemplateOutput, subject: Tensor) -> dict[str, Tensor]:
        mean = self.model.mean_stream(out.velocity)
        return {
            "transformer_loss": self.image_loss(subject, out.moved_template),
            "neg_transformer_loss": self.image_loss(out.template, out.moved_subject),
            "mean_loss": torch.mean(mean**2),
            "flow_loss": self.smooth_loss(torch.zeros_like(out.velocity), out.velocity),
        }

    def _log(self, line: str) -> None:
        if self.verbose:
            print(line, flush=True)

    def _resume(self) -> None:
        from voxreg.training import _restore

        path = _restore(self, ("batch_size", "steps_per_epoch", "seed", "lr", "lambda",
                               "mean_weight", "images"))
        if path is not None:
            self._log(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

    def _checkpoint(self, final: bool) -> None:
        from voxreg.training import _plot_history

        if self.out_dir is None:
            return
        meta = {**self.metadata, "training": self._settings()}
        save_model(self.model, self.out_dir / CHECKPOINT_NAME, metadata=meta,
                   optimizer=self.optimizer, step=self.step, epoch=self.epoch,
                   history=self.history)
        if final:
            save_model(self.model, self.out_dir / MODEL_NAME, metadata=meta, step=self.step,
                       epoch=self.epoch, history=self.history)
        # the loss curve at the end, and at most once a minute on the way (drawing is slow)
        if self.history and (final or time.perf_counter() - self._plotted > 60):
            self._plotted = time.perf_counter()
            losses = [{"epoch": row["epoch"],
                       **{k: v for k, v in row.items() if k.endswith("loss")}}
                      for row in self.history]
            _plot_history(losses, self.out_dir / PLOT_NAME)

    def snapshot(self) -> list[Path]:
        """Write the current template(s) into ``out_dir/snapshots``: a PNG of the (mid-)slices
        and an image file per template. Returns the paths written."""
        from voxreg import io, plot

        folder = self.out_dir / SNAPSHOT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"template_epoch{self.epoch:04d}"
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            if self.conditional:
                images = templates_at(self.model, self.snapshot_attributes)
                names = self.model.attribute_names
                titles = [", ".join(f"{n} {v:.4g}" for n, v in zip(names, row))
                          for row in self.snapshot_attributes]
                suffixes = ["_" + "_".join(f"{n}{v:.4g}" for n, v in zip(names, row))
                            for row in self.snapshot_attributes]
            else:
                images = [self.model.template_image()]
                titles, suffixes = ["template"], [""]
        self.model.train(was_training)
        paths = []
        for image, suffix in zip(images, suffixes):
            paths.append(io.save_image(folder / f"{stem}{suffix}{self.snapshot_format}", image,
                                       affine=self.affine))
        png = folder / f"{stem}.png"
        titles = [f"{t} (epoch {self.epoch})" for t in titles]
        if self.model.ndim == 2:
            plot.slices(list(images), titles=titles, save=png, width=3.5 * len(images))
        else:
            plot.volume_slices(list(images), titles=titles, save=png)
        paths.append(png)
        return paths

    def fit(self) -> list[dict[str, Any]]:
        """Train up to ``epochs`` epochs; return the history (one dict per epoch)."""
        from tqdm.auto import tqdm

        from voxreg.training import _budget_spent, _epoch_seed, _write_history

        model = self.model.to(self.device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._resume()
        start = self.epoch
        tic_all = time.perf_counter()
        slowest = 0.0
        saved = snapped = False
        for epoch in range(start, self.epochs):
            if _budget_spent(self.time_budget, epoch > start, tic_all, slowest):
                self._log(f"time budget of {self.time_budget:.0f} s reached after epoch {epoch}")
                break
            torch.manual_seed(_epoch_seed(self.seed, epoch))
            model.train()
            tic = time.perf_counter()
            sums: dict[str, Tensor] = {}
            disp_sum = None
            disp_sq = torch.zeros((), device=self.device)
            count = 0
            bar = tqdm(total=self.steps_per_epoch, disable=not self.progress, leave=False,
                       desc=f"epoch {epoch + 1}/{self.epochs}", dynamic_ncols=True)
            for indices in self._epoch_batches(epoch):
                idx = torch.from_numpy(indices)
                subject = self.images[idx].to(self.device, non_blocking=True)
                attrs = None if self.attributes is None else self.attributes[idx].to(self.device)
                out = model(subject, attrs)
                terms = self._terms(out, subject)
                loss = sum(w * terms[n] for n, w in zip(self.names, self.weights))
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {self.step + 1}; "
                        "lower lr or check the data")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                with torch.no_grad():
                    values = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
                    for k, v in values.items():
                        sums[k] = sums[k] + v if k in sums else v.clone()
                    disp = out.disp.detach()
                    disp_sum = disp.sum(0) if disp_sum is None else disp_sum + disp.sum(0)
                    disp_sq = disp_sq + (disp**2).sum(1).mean((1, 2) if disp.dim() == 4
                                                              else (1, 2, 3)).sum()
                    count += disp.shape[0]
                bar.update(1)
                if self.progress and (self.step % 10 == 0 or bar.n == 1):
                    bar.set_postfix(loss=f"{values['loss'].item():.4g}")
            bar.close()
            row: dict[str, Any] = {"epoch": epoch + 1, "step": self.step}
            row.update({k: float(v) / self.steps_per_epoch for k, v in sums.items()})
            mean = disp_sum / count
            row["mean_disp_rms"] = float(torch.sqrt((mean**2).sum(0).mean()))
            row["disp_rms"] = float(torch.sqrt(disp_sq / count))
            if not self.conditional:
                row["sharpness"] = sharpness(model.template_image())
            row["seconds"] = round(time.perf_counter() - tic, 3)
            slowest = max(slowest, row["seconds"])
            self.history.append(row)
            self.epoch = epoch + 1
            self._log(self._line(row))
            saved = snapped = False
            if self.out_dir is not None:
                _write_history(self.history, self.out_dir / HISTORY_NAME)
                if self.snapshot_every and self.epoch % self.snapshot_every == 0:
                    self.snapshot()
                    snapped = True
                if self.epoch == self.epochs:
                    self._checkpoint(final=True)
                    saved = True
                elif self.epoch % self.checkpoint_every == 0:
                    self._checkpoint(final=False)
        if self.out_dir is not None:
            # the end of the run (all epochs, or the time budget): checkpoint, final model and a
            # last snapshot, unless just written
            if not saved:
                self._checkpoint(final=True)
            if self.snapshot_every and not snapped:
                self.snapshot()
        model.eval()
        return self.history

    def _line(self, row: dict[str, Any]) -> str:
        parts = [f"epoch {row['epoch']}/{self.epochs}"]
        parts += [f"{k}: {v:.4g}" for k, v in row.items()
                  if k not in ("epoch", "step", "seconds") and isinstance(v, float)]
        parts.append(f"({row['seconds']:.2f} s)")
        return "  ".join(parts)


def train_template(
    images: Any,
    attributes: Any = None,
    *,
    attribute_names: Sequence[str] | None = None,
    nb_features: Sequence[Sequence[int]] | int | None = None,
    int_steps: int = 7,
    int_downsize: int = 2,
    mean_cap: int = 100,
    decoder_features: Sequence[int] = (16, 16, 16, 16),
    out_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    init_seed: int = 0,
    init_registration: str | os.PathLike | nn.Module | None = None,
    **kwargs: Any,
) -> tuple[_TemplateModel, list[dict[str, Any]]]:
    """Build a template model for ``images`` and train it; return ``(model, history)``.

    Without ``attributes`` a :class:`TemplateCreation` initialised from the voxel-wise mean of
    ``images``; with them a :class:`ConditionalTemplate` on that mean, its attributes standardised
    by their training mean and standard deviation. When resuming from a checkpoint, the model is
    rebuilt from the checkpoint's config (the architecture arguments are then ignored).

    Args:
        images: ``(N, *spatial)`` or ``(N, 1, *spatial)``.
        attributes: ``(N,)`` or ``(N, A)``, optional.
        attribute_names: names of the attributes (default ``attribute0``...).
        nb_features, int_steps, int_downsize, mean_cap: the registration network and mean stream.
        decoder_features: decoder channels of a conditional model.
        out_dir, resume: as :class:`TemplateTrainer`.
        init_seed: seeds the initial weights.
        init_registration: a fresh run's registration network starts from the weights of this
            model (a shipped name such as ``"brain3d-diff"``, a model file or a module) wherever
            name and shape match (:func:`voxreg.brain3d.warm_start`); ignored when resuming.
        **kwargs: passed to :class:`TemplateTrainer` (``epochs``, ``steps_per_epoch``,
            ``batch_size``, ``lr``, ``lambda_``, ``mean_weight``, ``snapshot_every``, ``device``...).
    """
    array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    array = array.astype(np.float32, copy=False)
    if array.ndim not in (3, 4, 5):
        raise ValueError(f"images must be (N, *spatial) or (N, 1, *spatial) with 2 or 3 spatial "
                         f"axes, got shape {array.shape}")
    if array.ndim >= 4 and array.shape[1] == 1:
        array = array[:, 0]
    inshape = tuple(array.shape[1:])
    checkpoint = None
    if resume:
        checkpoint = (Path(resume) if isinstance(resume, (str, os.PathLike))
                      else (Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None))
    if checkpoint is not None and checkpoint.is_file():
        model = load_template_model(checkpoint)
        model.train()
        if tuple(model.inshape) != inshape:
            raise ValueError(f"{str(checkpoint)!r} was trained on shape {tuple(model.inshape)}, "
                             f"the images are {inshape}")
        if (attributes is not None) != isinstance(model, ConditionalTemplate):
            raise ValueError(f"{str(checkpoint)!r} holds a {type(model).__name__} model; "
                             + ("attributes were given" if attributes is not None
                                else "attributes are needed"))
    else:
        torch.manual_seed(int(init_seed))
        mean = array.mean(0)
        if attributes is None:
            model = TemplateCreation(inshape, template_init=mean, nb_features=nb_features,
                                     int_steps=int_steps, int_downsize=int_downsize,
                                     mean_cap=mean_cap)
        else:
            a = np.asarray(attributes, dtype=np.float64)
            a = a[:, None] if a.ndim == 1 else a
            if a.ndim != 2 or a.shape[0] != len(array):
                raise ValueError(f"attributes must have one row per image ({len(array)}), got "
                                 f"shape {np.asarray(attributes).shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError("attributes must be finite numbers")
            scale = a.std(0)
            scale = np.where(scale > 0, scale, 1.0)
            model = ConditionalTemplate(
                inshape, n_attributes=a.shape[1], mean_image=mean,
                attribute_names=attribute_names, attribute_center=a.mean(0).tolist(),
                attribute_scale=scale.tolist(), decoder_features=decoder_features,
                nb_features=nb_features, int_steps=int_steps, int_downsize=int_downsize,
                mean_cap=mean_cap)
        if init_registration is not None:
            from voxreg.brain3d import warm_start

            warm_start(model.registration, init_registration)
    trainer = TemplateTrainer(model, array, attributes, out_dir=out_dir, resume=resume, **kwargs)
    history = trainer.fit()
    return model, history
