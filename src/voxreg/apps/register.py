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
    fit_rank,
    model_normalize,
    prepare_pair,
    resolve_model,
    source_path,
)

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
        registration: what the network (or the finetuning) returned: a
            :class:`voxreg.registration.RegistrationResult` or, with ``finetune``, a
            :class:`voxreg.registration.FinetuneResult` (steps taken, losses...).
        seconds: seconds per pair: the network's forward pass (or the whole finetuning), plus
            the affine step's time with ``affine=True``.
        device: where the model ran.
        written: the files written, by command-line option (``"--moved"``, ``"--warp"``,
            ``"--inverse-warp"``, ``"--moved-fixed"``, ``"--transform"``), in writing order.
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
    written: dict[str, Path] = field(default_factory=dict)


def _field(value, ndim: int) -> Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    tensor = tensor.detach().to("cpu", torch.float32)
    return tensor.reshape(1, ndim, *tensor.shape[-ndim:])


def _check_outputs(named: list[tuple[str, PathLike]], inputs: tuple, warp_units: str,
                   warp_format: str) -> None:
    checked = {option: (io.check_output_file if option == "--transform" else
                        io.check_output_path)(value, inputs) for option, value in named}
    for k, (option, _) in enumerate(named):
        for other, _ in named[:k]:
            if checked[option].resolve() == checked[other].resolve():
                raise ValueError(f"{other} and {option} must be different files")
    if warp_format == "ants" or warp_units == "mm":
        for option, value in named:
            if option in ("--warp", "--inverse-warp") and io.format_of(value) not in (".nii.gz", ".nii"):
                raise ValueError(f"{option}: a warp in mm or for ANTs must be a .nii.gz or .nii file")


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
    warp_units: Literal["voxel", "mm"] = "voxel",
    warp_format: Literal["voxreg", "ants"] = "voxreg",
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
        warp: output file of the displacement (NIfTI vector image, or ``.npz``/``.npy`` in
            voxels), on the fixed grid.
        inverse_warp: output file of the inverse displacement (moving -> fixed), written like
            ``warp``; exact for a diffeomorphic model, a fixed-point approximation (with an
            :class:`voxreg.registration.InverseApproximationWarning`) for a plain one.
        moved_fixed: output file of the fixed image warped onto the moving grid by the inverse.
        transform: with ``affine``: output ITK/ANTs text transform (``.txt``/``.tfm``).
        warp_units: ``"voxel"`` (of the fixed grid) or ``"mm"`` (RAS) for the saved fields.
        warp_format: ``"voxreg"`` or ``"ants"`` (LPS mm for antsApplyTransforms; ignores
            ``warp_units``).
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

    Returns:
        A :class:`RegisterResult`: the moved image, the displacement ``(1, ndim, *spatial)``
        (voxels, fixed grid), the inverse if asked for, the affine result, the seconds per pair
        and the paths written. Every output is written atomically; nothing is written when a
        check fails, and an input is never overwritten.

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
    if transform is not None and not affine:
        raise ValueError("--transform needs --affine (it is the affine step's transform)")
    if affine and (inverse_warp is not None or moved_fixed is not None):
        raise ValueError("--inverse-warp and --moved-fixed are not available with --affine yet")
    if transform is not None and not str(transform).lower().endswith((".txt", ".tfm")):
        raise ValueError(f"--transform must be a .txt or .tfm file (ITK text), got {str(transform)!r}")
    _check_outputs(named, inputs, warp_units, warp_format)

    dev = resolve_device(device)
    net = resolve_model(model, dev)
    ndim = registration.model_ndim(net)
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
        written["--warp"] = io.save_warp(warp, disp, fix.affine, convention=warp_format,
                                         units=warp_units)
    if inverse_warp is not None:
        written["--inverse-warp"] = io.save_warp(inverse_warp, inverse, fix.affine,
                                                 convention=warp_format, units=warp_units)
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
        affine=affine_result, written=written,
    )
