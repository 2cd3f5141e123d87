"""Register two image files with a trained model: the pipeline of ``voxreg register``.

:func:`register_files` loads the pair, checks or resamples the grids, normalises the
intensities, fits the images to the model's rank, optionally runs an affine step first, runs the
network (optionally refined on the pair by :func:`voxreg.registration.finetune`), computes the
inverse when asked, and writes the requested outputs atomically on the fixed grid with the fixed
image's affine. The command is a thin layer over it, so a Python user gets in one call exactly
what the command does.

Directions (``docs/conventions.md``): the displacement lives on the fixed grid, in voxels, and
pulls back, ``moved(x) = moving(x + disp(x))``; the inverse lives on the moving grid (the same
grid here) and pulls the fixed image onto the moving one.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from voxreg import io, registration, transforms
from voxreg._runtime import resolve_device
from voxreg.affine import AffineResult, affine_prealign
from voxreg.apps.files import (
    ImageLike,
    ModelLike,
    PathLike,
    as_image,
    describe,
    fit_rank,
    model_normalize,
    prepare_pair,
    resolve_model,
    source_path,
)
from voxreg.apps.native import NativeResult, register_native
from voxreg.domain import ModelDomain, model_domain
from voxreg.transform_files import save_affine

__all__ = ["RegisterResult", "register_files"]



@dataclass
class RegisterResult:
    """What :func:`register_files` returns.

    Attributes:
        moved: the moving image on the fixed grid (fixed affine and header; ``path`` is the file
            written, if any). Its intensities are normalised as the model reads them.
        disp: the displacement, ``(1, ndim, *spatial)`` float32 on the CPU, in voxels of the
            fixed grid, pulling back (with ``affine=True``: the affine and the network's field
            composed, acting on the moving image resampled onto the fixed grid through the
            headers).
        inverse_disp: with ``inverse_warp`` or ``moved_fixed``: the inverse, laid out like
            ``disp``, on the moving grid; ``None`` otherwise.
        moved_fixed: with ``moved_fixed``: the fixed image warped onto the moving grid by the
            inverse; ``None`` otherwise.
        inverse_exact: True when the inverse is exactly ``exp(-velocity)``, False for the
            fixed-point approximation of a plain model, ``None`` without an inverse.
        inverse_residual: mean norm (voxels) of ``compose(disp, inverse_disp)``, or ``None``.
        affine: the affine step's :class:`voxreg.affine.AffineResult` with ``affine=True``.
        native: with the native pipeline (the scans were brought into the model's domain): the
            :class:`voxreg.apps.native.NativeResult` (each scan's map from the reference, the
            network's field in the domain, the composed map, timings); ``None`` otherwise.
        moved_labels: with ``moving_labels``: the label map on the fixed grid.
        registration: what the network (or the finetuning) returned: a
            :class:`voxreg.registration.RegistrationResult` or, with ``finetune``, a
            :class:`voxreg.registration.FinetuneResult` (steps taken, losses...).
        seconds: seconds per pair: the network's forward pass (or the whole finetuning), plus
            the affine step's time with ``affine=True``.
        device: where the model ran.
        written: the files written, by command-line option (``"--moved"``, ``"--warp"``,
            ``"--inverse-warp"``, ``"--moved-fixed"``, ``"--transform"``), in writing order.
        warp_conventions: the convention of each field file written (``"--warp"``,
            ``"--inverse-warp"``): ``"lps-mm"``, ``"ras-mm"`` or ``"voxel"``
            (:mod:`voxreg.io.warps`).
    """

    moved: io.Image
    disp: Tensor
    seconds: float
    device: torch.device
    registration: registration.RegistrationResult
    inverse_disp: Tensor | None = None
    moved_fixed: io.Image | None = None
    inverse_exact: bool | None = None
    inverse_residual: float | None = None
    affine: AffineResult | None = None
    native: NativeResult | None = None
    moved_labels: io.Image | None = None
    written: dict[str, Path] = field(default_factory=dict)
    warp_conventions: dict[str, str] = field(default_factory=dict)


def _field(value, ndim: int) -> Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    tensor = tensor.detach().to("cpu", torch.float32)
    return tensor.reshape(1, ndim, *tensor.shape[-ndim:])


def _check_outputs(named: list[tuple[str, PathLike]], inputs: tuple) -> None:
    checked = {option: (io.check_output_file if option == "--transform" else
                        io.check_output_path)(value, inputs) for option, value in named}
    for k, (option, _) in enumerate(named):
        for other, _ in named[:k]:
            if checked[option].resolve() == checked[other].resolve():
                raise ValueError(f"{other} and {option} must be different files")


def _warp_conventions(named: list[tuple[str, PathLike]], convention: str | None,
                      units: str | None, form: str | None) -> dict[str, str]:
    """The convention of each field output (``--warp``, ``--inverse-warp``), checked against
    its file's extension before anything is written. ``units``/``form``: the deprecated
    ``--warp-units``/``--warp-format`` (a FutureWarning says what they now mean)."""
    hint = ""
    if units is not None or form is not None:
        if units not in (None, "voxel", "mm") or form not in (None, "voxreg", "ants"):
            raise ValueError(f"--warp-units must be voxel or mm and --warp-format voxreg or ants, "
                             f"got {units!r} and {form!r}; use --warp-convention lps-mm|ras-mm|voxel")
        if convention is not None:
            raise ValueError("--warp-units/--warp-format are the old spellings of "
                             "--warp-convention: give --warp-convention only")
        given = " ".join(f"--warp-{k} {v}" for k, v in (("units", units), ("format", form)) if v)
        convention = "lps-mm" if form == "ants" else "ras-mm" if units == "mm" else "voxel"
        hint = f" ({given} means --warp-convention {convention})"
        warnings.warn(f"{given} is deprecated: it now means --warp-convention {convention} (lps-mm: "
                      "ANTs/ITK NIfTI, ras-mm: FreeSurfer NIfTI/MGZ, voxel: voxreg .npz)",
                      FutureWarning, stacklevel=3)
    conventions = {}
    for option, value in named:
        if option in ("--warp", "--inverse-warp"):
            try:
                conventions[option] = io.resolve_convention(value, convention)
            except ValueError as err:
                raise ValueError(f"{option}: {err}{hint}") from None
    return conventions


def _affine_step(moving: ImageLike, fixed: ImageLike, normalize: str, model_ndim: int, loss: str
                 ) -> tuple[io.Image, io.Image, io.Image, AffineResult]:
    """``(moved_affine, fixed, base, result)``, the first three normalised on the fixed grid
    (``base``: the moving image resampled through the headers only, which the composed field
    pulls back)."""
    fix = as_image(fixed, "fixed")
    mov = as_image(moving, "moving")
    fit_rank(mov, model_ndim, "moving image")
    fit_rank(fix, model_ndim, "fixed image")
    result, moved_affine = affine_prealign(mov, fix, loss=loss)
    base = mov if io.same_grid(mov, fix) else io.resample_to(mov, fix, "linear")
    for image in (moved_affine, fix, base):
        image.data = io.normalize(image.data, normalize)
    return moved_affine, fix, base, result


def register_files(
    moving: ImageLike,
    fixed: ImageLike,
    model: ModelLike,
    *,
    moved: PathLike | None = None,
    warp: PathLike | None = None,
    inverse_warp: PathLike | None = None,
    moved_fixed: PathLike | None = None,
    transform: PathLike | None = None,
    warp_convention: Literal["lps-mm", "ras-mm", "voxel"] | None = None,
    finetune: int = 0,
    finetune_lr: float | None = None,
    finetune_lambda: float | None = None,
    image_loss: Literal["mse", "ncc", "mi"] | None = None,
    progress: bool = True,
    resample: bool = False,
    affine: bool = False,
    affine_loss: Literal["mi", "ncc", "mse"] = "mi",
    normalize: Literal["percentile", "minmax", "none"] | None = None,
    device: str | torch.device = "auto",
    pipeline: Literal["auto", "native", "direct"] = "auto",
    moving_labels: ImageLike | None = None,
    moved_labels: PathLike | None = None,
    label_interp: Literal["label", "nearest"] = "label",
    warp_units: Literal["voxel", "mm"] | None = None,
    warp_format: Literal["voxreg", "ants"] | None = None,
) -> RegisterResult:
    """Register ``moving`` to ``fixed`` with a trained model, as ``voxreg register`` does.

    Args:
        moving, fixed: file paths (any format :func:`voxreg.io.load_image` reads), nibabel
            images or :class:`voxreg.io.Image` objects (never modified), 2D or 3D, one or more
            channels; a 3D image whose last axis has size 1 is read as 2D by a 2D model. They
            must share a grid (shape and affine) unless ``resample`` or ``affine``.
        model: a checkpoint file, the name of a shipped model (``voxreg.list_models()``) or a
            registration module (e.g. :class:`voxreg.nn.networks.VxmDense`; it is moved to
            ``device``).
        moved: output file of the moved image (``None``: not written, only returned).
        warp: output file of the displacement on the fixed grid, in ``warp_convention``.
        inverse_warp: output file of the inverse displacement (moving -> fixed), written like
            ``warp``; exact for a diffeomorphic model, a fixed-point approximation (with an
            :class:`voxreg.registration.InverseApproximationWarning`) for a plain one.
        moved_fixed: output file of the fixed image warped onto the moving grid by the inverse.
        transform: with ``affine``: output ITK/ANTs text transform (``.txt``/``.tfm``).
        warp_convention: the convention of ``warp`` and ``inverse_warp``
            (:func:`voxreg.io.save_displacement`): ``"lps-mm"`` (ANTs/ITK, a 5D NIfTI that
            ``antsApplyTransforms -r fixed -t warp`` applies to the moving image), ``"ras-mm"``
            (FreeSurfer/mri_synthmorph, a 4D NIfTI or MGZ) or ``"voxel"`` (voxels of the grid,
            ``.npz`` only); default by extension: ``lps-mm`` for ``.nii.gz``/``.nii``,
            ``ras-mm`` for ``.mgz``/``.mgh``, ``voxel`` for ``.npz``.
        finetune: refine the network's field on this pair for at most this many Adam steps
            (:func:`voxreg.registration.finetune`, stopping early); 0: the network alone.
        finetune_lr, finetune_lambda, image_loss: the finetuning's step (voxels), smoothness
            weight and image loss (defaults: 0.1, then the model's training settings).
        progress: show the finetuning's progress bar (stderr).
        resample: resample the moving image onto the fixed grid (via the affines, linear) when
            the grids differ; the inverse outputs then refer to that resampled image.
        affine: an affine step first (:func:`voxreg.affine.affine_prealign`, started from the
            headers, so the grids may differ); ``moved``/``warp`` hold the composition of both.
            Not available with ``inverse_warp``/``moved_fixed``.
        affine_loss: similarity of the affine step.
        normalize: intensity normalisation to [0, 1] (:func:`voxreg.io.normalize`); default: what
            the model was trained with if its metadata says, else ``"percentile"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device`.
        pipeline: ``"auto"`` (default): scans that are not already on the model's domain grid
            go through the native pipeline when the model records a 3D domain with a reference
            (:mod:`voxreg.apps.native`: each scan affinely aligned to the reference, brain
            masked, one resampling into the domain, the network, one composed world transform
            applied to the original moving scan); ``"native"``: always that; ``"direct"``: the
            images go to the network on the fixed grid (with ``resample``/``affine`` as asked).
            In the native pipeline ``moved`` is in the moving scan's own intensity units,
            ``warp`` is the world-space displacement on the fixed grid, ``inverse_warp`` lies
            on the moving grid and ``transform`` is the affine part (``.txt``, ``.tfm`` or
            ``.mat``).
        moving_labels: a label map on the moving scan's grid to carry onto the fixed grid
            (written to ``moved_labels``, integer dtype kept).
        moved_labels: output file of the moved label map.
        label_interp: ``"label"`` (ANTs' genericLabel rule) or ``"nearest"``.
        warp_units, warp_format: deprecated (a FutureWarning): ``warp_format="ants"`` is
            ``warp_convention="lps-mm"``, ``warp_units="mm"`` is ``"ras-mm"``,
            ``warp_units="voxel"`` is ``"voxel"`` (``.npz``).

    Returns:
        A :class:`RegisterResult`: the moved image, the displacement ``(1, ndim, *spatial)``
        (voxels, fixed grid), the inverse if asked for, the affine result, the seconds per pair
        and the paths written (with each field's convention). Every output is written
        atomically; nothing is written when a check fails, and an input is never overwritten.

    Raises:
        FileNotFoundError: a missing input file or model (the message names which).
        TypeError: an argument of the wrong type (the message names it).
        ValueError: bad options or outputs (named by their command-line spelling, e.g.
            ``--inverse-warp``), different grids without ``resample``, an image of the wrong
            rank, or an output that is an input.
        voxreg.checkpoint.CheckpointError: a corrupt or foreign checkpoint.

    >>> result = register_files("moving.nii.gz", "fixed.nii.gz", "brain2d-smooth",
    ...                         moved="moved.nii.gz", warp="warp.nii.gz")  # doctest: +SKIP
    >>> result.disp.shape, result.moved.affine.shape  # doctest: +SKIP
    (torch.Size([1, 2, 160, 192]), (4, 4))
    """
    model_file = (model,) if isinstance(model, (str, os.PathLike)) and Path(model).is_file() else ()
    inputs = tuple(p for p in (source_path(moving), source_path(fixed)) if p is not None)
    inputs += model_file
    for value, what in ((moving, "moving image"), (fixed, "fixed image")):
        if isinstance(value, (str, os.PathLike)) and not Path(value).exists():
            raise FileNotFoundError(f"{what} {str(value)!r} does not exist")
    named = [("--moved", moved), ("--warp", warp), ("--inverse-warp", inverse_warp),
             ("--moved-fixed", moved_fixed), ("--transform", transform)]
    named = [(option, value) for option, value in named if value is not None]
    if moved_labels is not None and moving_labels is None:
        raise ValueError("--moved-labels needs --moving-labels (the label map to carry)")
    if moved_labels is not None:
        named.append(("--moved-labels", moved_labels))
        inputs += tuple(p for p in (source_path(moving_labels),) if p is not None)
    if pipeline not in ("auto", "native", "direct"):
        raise ValueError(f"--pipeline must be auto, native or direct, got {pipeline!r}")
    conventions = _warp_conventions(named, warp_convention, warp_units, warp_format)
    dev = resolve_device(device)
    net = resolve_model(model, dev)
    ndim = registration.model_ndim(net)
    domain = model_domain(net)
    if _use_native(pipeline, domain, ndim, affine, resample, moving, fixed):
        _check_outputs(named, inputs)
        return _register_native(moving, fixed, net, domain, dev, moved, warp, inverse_warp,
                                moved_fixed, transform, finetune, finetune_lr, finetune_lambda,
                                image_loss, progress, moving_labels, moved_labels, label_interp,
                                conventions)
    if moving_labels is not None:
        raise ValueError("--moving-labels needs the native pipeline (a 3D model with a domain); "
                         "warp labels with 'voxreg warp --interp label' instead")
    if transform is not None and not affine:
        raise ValueError("--transform needs --affine (it is the affine step's transform)")
    if affine and (inverse_warp is not None or moved_fixed is not None):
        raise ValueError("--inverse-warp and --moved-fixed are not available with --affine yet")
    if transform is not None and not str(transform).lower().endswith((".txt", ".tfm")):
        raise ValueError(f"--transform must be a .txt or .tfm file (ITK text), got {str(transform)!r}")
    _check_outputs(named, inputs)

    norm = model_normalize(net, normalize)
    affine_result = None
    if affine:
        mov, fix, base, affine_result = _affine_step(moving, fixed, norm, ndim, affine_loss)
    else:
        mov, fix = prepare_pair(moving, fixed, resample, norm, ndim)
    want_inverse = inverse_warp is not None
    want_moved_fixed = moved_fixed is not None
    if finetune > 0:
        result = registration.finetune(
            net, mov.data, fix.data, steps=finetune, lr=finetune_lr, image_loss=image_loss,
            lambda_=finetune_lambda, device=dev, progress=progress, inverse=want_inverse,
            moved_fixed=want_moved_fixed)
    else:
        result = registration.register(net, mov.data, fix.data, device=dev, return_time=True,
                                       inverse=want_inverse, moved_fixed=want_moved_fixed)
    moved_data, disp, seconds = result
    written: dict[str, Path] = {}
    if affine_result is not None:
        disp = transforms.compose(affine_result.disp(), _field(disp, ndim))
        base_t = torch.as_tensor(base.data, dtype=torch.float32)
        base_t = base_t.reshape(1, -1, *base_t.shape[-ndim:])
        moved_data = transforms.warp(base_t, disp).numpy().reshape(tuple(moved_data.shape))
        seconds += affine_result.seconds
        if transform is not None:
            written["--transform"] = affine_result.save_itk(transform)
    disp = _field(disp, ndim)
    inverse = None if result.inverse_disp is None else _field(result.inverse_disp, ndim)
    if warp is not None:
        written["--warp"] = io.save_displacement(warp, disp, fix.affine, conventions["--warp"])
    if inverse_warp is not None:  # on the moving grid, which is the fixed grid here
        written["--inverse-warp"] = io.save_displacement(inverse_warp, inverse, fix.affine,
                                                         conventions["--inverse-warp"])
    moved_fixed_image = None
    if result.moved_fixed is not None:
        moved_fixed_image = io.Image(np.asarray(result.moved_fixed), fix.affine, fix.header,
                                     None, fix.channels)
    if moved_fixed is not None:
        written["--moved-fixed"] = io.save_image(moved_fixed, result.moved_fixed, affine=fix.affine,
                                                 header=fix.header, channels=fix.channels)
        moved_fixed_image.path = written["--moved-fixed"]
    moved_image = io.Image(np.asarray(moved_data), fix.affine, fix.header, None, mov.channels)
    if moved is not None:
        written["--moved"] = io.save_image(moved, moved_data, affine=fix.affine,
                                           header=fix.header, channels=mov.channels)
        moved_image.path = written["--moved"]
    return RegisterResult(
        moved=moved_image, disp=disp, seconds=seconds, device=dev, registration=result,
        inverse_disp=inverse, moved_fixed=moved_fixed_image,
        inverse_exact=result.inverse_exact, inverse_residual=result.inverse_residual,
        affine=affine_result, written=written, warp_conventions=conventions,
    )


def _use_native(pipeline: str, domain: ModelDomain | None, ndim: int, affine: bool,
                resample: bool, moving: ImageLike, fixed: ImageLike) -> bool:
    """Whether ``register_files`` takes the native pipeline (see its ``pipeline`` argument)."""
    if pipeline == "direct":
        return False
    usable = (domain is not None and domain.reference is not None and domain.ndim == 3
              and ndim == 3 and domain.purpose == "registration")
    if pipeline == "native":
        if not usable:
            raise ValueError("--pipeline native needs a 3D registration model whose file records "
                             "its domain and reference (see 'voxreg models')")
        return True
    if not usable or affine or resample:
        return False
    mov, fix = as_image(moving, "moving"), as_image(fixed, "fixed")
    for name, image in (("moving", mov), ("fixed", fix)):
        if image.ndim != 3:
            raise ValueError(f"{name} image {describe(image)} is {image.ndim}D (shape "
                             f"{image.shape}) but the model is 3D")
    if mov.channels or fix.channels:
        return False
    return not (domain.on_grid(mov) and domain.on_grid(fix))


def _voxel_field(world_disp: np.ndarray, affine: np.ndarray) -> Tensor:
    """A world displacement ``(3, *shape)`` (RAS mm) as voxels of the grid of ``affine``."""
    inverse = np.linalg.inv(affine[:3, :3])
    disp = np.tensordot(inverse, world_disp, axes=1).astype(np.float32)
    return torch.from_numpy(disp)[None]




def _in_units_of(data: np.ndarray, like: io.Image) -> np.ndarray:
    """Resampled intensities in the dtype of the scan they come from (integers rounded and
    clipped to the dtype's range; float data as float32)."""
    dtype = like.data.dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.round(data), info.min, info.max).astype(dtype)
    return data.astype(np.float32)


def _register_native(moving, fixed, net, domain, dev, moved, warp, inverse_warp, moved_fixed,
                     transform, finetune, finetune_lr, finetune_lambda, image_loss, progress,
                     moving_labels, moved_labels, label_interp, conventions) -> RegisterResult:
    """The native pipeline of :func:`register_files` (:func:`voxreg.apps.native.register_native`)."""
    mov, fix = as_image(moving, "moving"), as_image(fixed, "fixed")
    labels = as_image(moving_labels, "moving_labels", labels=True) if moving_labels is not None \
        else None
    if labels is not None and labels.shape != mov.shape:
        raise ValueError(f"--moving-labels must lie on the moving scan's grid {mov.shape}, got "
                         f"{labels.shape}")
    options = {k: v for k, v in (("lr", finetune_lr), ("lambda_", finetune_lambda),
                                 ("image_loss", image_loss)) if v is not None}
    want_inverse = inverse_warp is not None or moved_fixed is not None
    result = register_native(mov, fix, net, domain, finetune_steps=finetune,
                             finetune_options=options, inverse=want_inverse, progress=progress)
    moved_data = _in_units_of(result.resample(mov), mov)
    disp = _voxel_field(result.world_disp, fix.affine)
    written: dict[str, Path] = {}
    moved_image = io.Image(moved_data, fix.affine, fix.header, None, False)
    if moved is not None:
        written["--moved"] = moved_image.path = io.save_image(moved, moved_data, affine=fix.affine,
                                                              header=fix.header)
    if warp is not None:
        written["--warp"] = io.save_displacement(warp, disp, fix.affine, conventions["--warp"])
    inverse = moved_fixed_image = None
    if want_inverse:
        points = np.tensordot(mov.affine[:3, :3], result.inverse_coords, axes=1) + \
            mov.affine[:3, 3].reshape(3, 1, 1, 1)
        moving_points = np.tensordot(mov.affine[:3, :3], transforms.identity_grid(
            mov.shape, dtype=torch.float64).numpy(), axes=1) + mov.affine[:3, 3].reshape(3, 1, 1, 1)
        inverse = _voxel_field((points - moving_points).astype(np.float32), mov.affine)
        if inverse_warp is not None:
            written["--inverse-warp"] = io.save_displacement(inverse_warp, inverse, mov.affine,
                                                             conventions["--inverse-warp"])
        moved_fixed_data = _in_units_of(result.resample_fixed(fix), fix)
        moved_fixed_image = io.Image(moved_fixed_data, mov.affine, mov.header, None, False)
        if moved_fixed is not None:
            written["--moved-fixed"] = moved_fixed_image.path = io.save_image(
                moved_fixed, moved_fixed_data, affine=mov.affine, header=mov.header)
    if transform is not None:
        written["--transform"] = save_affine(transform, result.fixed_to_moving)
    moved_labels_image = None
    if labels is not None:
        label_data = result.resample(labels, interp=label_interp)
        moved_labels_image = io.Image(label_data, fix.affine, fix.header, None, False)
        if moved_labels is not None:
            written["--moved-labels"] = moved_labels_image.path = io.save_image(
                moved_labels, label_data, affine=fix.affine, header=fix.header)
    reg = result.registration
    return RegisterResult(
        moved=moved_image, disp=disp, seconds=float(sum(result.seconds.values())), device=dev,
        registration=reg, inverse_disp=inverse, moved_fixed=moved_fixed_image,
        inverse_exact=getattr(reg, "inverse_exact", None),
        inverse_residual=getattr(reg, "inverse_residual", None), native=result,
        moved_labels=moved_labels_image, written=written, warp_conventions=conventions)
