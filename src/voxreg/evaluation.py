"""Measures and uses of trained models: template sharpness, subjects registered to a template,
the population's mean displacement, label propagation and template Dice; the Dice of a model on synthetic
pairs.

Conventions (``docs/conventions.md``): ``disp`` lies on the subject grid and warps the template
onto the subject (``moved(x) = template(x + disp(x))``, voxels); ``inverse`` lies on the template
grid and warps the subject onto the template. Arrays come back as numpy on the CPU.

The examples use an untrained template model (its template is zeros, its fields near zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from voxreg import _checks
from voxreg import transforms as T
from voxreg._runtime import model_device
from voxreg.data.synthesis import SynthPairDataset
from voxreg.metrics import mean_dice_present
from voxreg.nn.template import ConditionalTemplate, TemplateModel, attribute_batch, image_batch

__all__ = [
    "mean_displacement",
    "propagate_labels",
    "register_to_template",
    "sharpness",
    "synthetic_dice",
    "template_dice",
    "templates_at",
]


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

    >>> step = np.zeros((8, 8))
    >>> step[:, 4:] = 1.0                          # one edge across axis 1
    >>> sharpness(step), sharpness(step, measure="mean")
    (0.25, 0.125)
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


_OUTPUTS = ("moved_template", "moved_subject", "disp", "inverse", "template")


def _registrations(model: TemplateModel, images: Any, attributes: Any, batch_size: int,
                   keys: Sequence[str]):
    """Yield ``(start, {key: numpy batch})`` of the template registered to ``images``, batch by
    batch (no gradients, eval mode), so that whole populations of 3D fields never sit in memory."""
    unknown = [k for k in keys if k not in _OUTPUTS]
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; known: {', '.join(_OUTPUTS)}")
    x = image_batch(images, model.inshape)
    conditional = isinstance(model, ConditionalTemplate)
    if not conditional and attributes is not None:
        raise ValueError("an unconditional template model takes no attributes")
    a = attribute_batch(attributes, len(x), model.n_attributes) if conditional else None
    batch_size = _checks.positive_int(batch_size, "batch_size")
    device = model_device(model)
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
    model: TemplateModel,
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

    >>> from voxreg.nn.template import TemplateCreation
    >>> model = TemplateCreation((16, 16), nb_features=[[4, 4], [4, 4, 4]])   # untrained
    >>> images = np.random.default_rng(0).random((3, 16, 16))                   # (N, *inshape)
    >>> out = register_to_template(model, images)
    >>> {key: value.shape for key, value in out.items()}     # doctest: +NORMALIZE_WHITESPACE
    {'moved_template': (3, 1, 16, 16), 'moved_subject': (3, 1, 16, 16), 'disp': (3, 2, 16, 16),
     'inverse': (3, 2, 16, 16), 'template': (3, 1, 16, 16)}
    """
    parts: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
    for _, batch in _registrations(model, images, attributes, batch_size, outputs):
        for k, v in batch.items():
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def mean_displacement(model: TemplateModel, images: Any, attributes: Any = None,
                      batch_size: int = 8) -> dict[str, float]:
    """How centred the template is: ``mean_disp_rms`` (RMS over voxels of the mean displacement
    of all ``images``, voxels), ``disp_rms`` (RMS over subjects and voxels of the displacements)
    and ``ratio`` (their ratio; 0 for a perfectly centred template, about 1 if every subject moved
    the same way).

    >>> from voxreg.nn.template import TemplateCreation
    >>> model = TemplateCreation((16, 16), nb_features=[[4, 4], [4, 4, 4]])   # untrained
    >>> images = np.random.default_rng(0).random((3, 16, 16))                   # (N, *inshape)
    >>> sorted(mean_displacement(model, images))
    ['disp_rms', 'mean_disp_rms', 'ratio']
    """
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
    ``(K, n_attributes)``), in the attributes' own units; returns ``(K, *inshape)`` float32.

    >>> from voxreg.nn.template import ConditionalTemplate
    >>> conditional = ConditionalTemplate((16, 16), nb_features=[[4, 4], [4, 4, 4]])
    >>> templates_at(conditional, [20.0, 40.0, 60.0]).shape   # e.g. three ages
    (3, 16, 16)
    """
    if not isinstance(model, ConditionalTemplate):
        raise TypeError(f"templates_at needs a ConditionalTemplate, got {type(model).__name__}")
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 0:
        a = a[None]
    with torch.no_grad():
        a_t = torch.as_tensor(a, dtype=torch.get_default_dtype(), device=model_device(model))
        if a_t.dim() == 1:
            if model.n_attributes != 1:
                raise ValueError(f"values must have shape (K, {model.n_attributes}), got {a.shape}")
            a_t = a_t[:, None]
        templates = model.template_for(a_t.shape[0], a_t)
    return templates[:, 0].cpu().numpy().astype(np.float32)


def propagate_labels(
    model: TemplateModel,
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

    >>> from voxreg.nn.template import TemplateCreation
    >>> model = TemplateCreation((16, 16), nb_features=[[4, 4], [4, 4, 4]])   # untrained
    >>> images = np.random.default_rng(0).random((3, 16, 16))                   # (N, *inshape)
    >>> labels = np.zeros((3, 16, 16), np.int64)
    >>> labels[:, 4:12, 4:12] = 1
    >>> template_labels = propagate_labels(model, images, labels)
    >>> template_labels.shape, str(template_labels.dtype), int(template_labels[8, 8])
    ((16, 16), 'int32', 1)
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
    model: TemplateModel,
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

    >>> from voxreg.nn.template import TemplateCreation
    >>> model = TemplateCreation((16, 16), nb_features=[[4, 4], [4, 4, 4]])   # untrained
    >>> images = np.random.default_rng(0).random((3, 16, 16))                   # (N, *inshape)
    >>> labels = np.zeros((3, 16, 16), np.int64)
    >>> labels[:, 4:12, 4:12] = 1
    >>> scores = template_dice(model, labels[0], images, labels)
    >>> scores["dice_before"], len(scores["dice_after_per_subject"])
    (1.0, 3)
    """
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


def synthetic_dice(model: torch.nn.Module, dataset: SynthPairDataset,
                   batch_size: int = 8) -> tuple[float, float]:
    """Mean Dice (over the labels present in both maps, mean over pairs) before and after
    ``model`` registers every pair of ``dataset``; the moving labels are warped with
    nearest-neighbour interpolation.

    Args:
        model: ``(moving, fixed) -> (moved, disp)`` with ``registration=True`` (a VxmDense).
        dataset: the pairs (e.g. a :class:`SynthPairDataset` with a held-out seed).
        batch_size: pairs per forward pass.

    Returns:
        ``(dice_before, dice_after)``.

    >>> from voxreg.nn.networks import VxmDense
    >>> pairs = SynthPairDataset((16, 16), pairs_per_epoch=2, label_options={"num_labels": 4})
    >>> before, after = synthetic_dice(VxmDense((16, 16), nb_features=[[4, 4], [4, 4, 4]]), pairs)
    >>> 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    True
    """
    device = model_device(model)
    before: list[float] = []
    after: list[float] = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
        with torch.no_grad():
            _, disp = model(batch["moving"].to(device), batch["fixed"].to(device),
                            registration=True)
        moved = T.warp(batch["moving_seg"].to(device), disp, interp="nearest").cpu()
        for fixed, moving, warped in zip(batch["fixed_seg"][:, 0].numpy(),
                                         batch["moving_seg"][:, 0].numpy(), moved[:, 0].numpy()):
            before.append(mean_dice_present(fixed, moving))
            after.append(mean_dice_present(fixed, warped))
    return float(np.mean(before)), float(np.mean(after))
