"""Learn a template (atlas) of image files: the pipeline of ``voxreg template``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from voxreg import io
from voxreg._runtime import resolve_device
from voxreg.apps.files import PathLike, gather_images, grid_difference, network_features
from voxreg.data import read_attributes
from voxreg.evaluation import sharpness, templates_at
from voxreg.nn.template import TemplateModel
from voxreg.training import train_template
from voxreg.training.engine import CHECKPOINT_NAME

__all__ = ["TemplateResult", "template_from_files"]



@dataclass
class TemplateResult:
    """What :func:`template_from_files` returns.

    Attributes:
        model: the trained template model (:class:`voxreg.nn.template.TemplateModel`).
        history: one dict per epoch (``epoch``, ``loss``, ``mean_disp_rms``...).
        out: the template file written (conditional: the template at the mean attribute).
        at: ``(value, path)`` of each template written at an attribute value (``at``).
        run: the run folder (checkpoints, history, snapshots).
        template_sharpness: RMS gradient of the template (unconditional runs; else ``None``).
        mean_sharpness: RMS gradient of the voxel-wise mean of the images (the starting point).
        resumed: whether the run continued from a checkpoint.
    """

    model: TemplateModel
    history: list[dict[str, Any]]
    out: Path
    at: list[tuple[float, Path]]
    run: Path
    template_sharpness: float | None
    mean_sharpness: float
    resumed: bool


def _check_numbers(epochs, batch_size, int_steps, int_downsize, steps_per_epoch, snapshot_every,
                   lr, lambda_, mean_weight) -> None:
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size),
                        ("--int-steps", int_steps), ("--int-downsize", int_downsize)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"--steps-per-epoch must be a positive integer, got {steps_per_epoch}")
    if snapshot_every < 0:
        raise ValueError(f"--snapshot-every must be >= 0, got {snapshot_every}")
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"--lr must be positive, got {lr}")
    for name, value in (("--lambda", lambda_), ("--mean-weight", mean_weight)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be >= 0, got {value}")


def _columns(attributes, attribute, at) -> list[str]:
    if (attributes is None) != (attribute is None):
        raise ValueError("a conditional template needs both --attributes CSV and --attribute NAME")
    names = attribute.split(",") if isinstance(attribute, str) else list(attribute or [])
    columns = [c.strip() for c in names if c.strip()]
    if attribute is not None and not columns:
        raise ValueError("--attribute must name at least one column")
    if at and not columns:
        raise ValueError("--at needs a conditional template (--attributes and --attribute)")
    if at and len(columns) != 1:
        raise ValueError("--at works with one attribute; give a single --attribute column")
    return columns


def template_from_files(
    images: Sequence[PathLike] = (),
    *,
    out: PathLike,
    list_file: PathLike | None = None,
    glob: str | None = None,
    run: PathLike | None = None,
    epochs: int = 10,
    steps_per_epoch: int | None = None,
    batch_size: int = 1,
    lr: float = 1e-3,
    lambda_: float = 0.01,
    mean_weight: float = 1.0,
    image_loss: Literal["mse", "ncc"] = "mse",
    int_steps: int = 7,
    int_downsize: int = 2,
    enc: Sequence[int] | None = (16, 32, 32, 32),
    dec: Sequence[int] | None = (32, 32, 32, 32, 32, 16, 16),
    attributes: PathLike | None = None,
    attribute: str | Sequence[str] | None = None,
    at: Sequence[float] = (),
    resume: bool = False,
    snapshot_every: int = 0,
    device: str | torch.device = "auto",
    normalize: Literal["percentile", "minmax", "none"] = "percentile",
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], Any] | None = None,
) -> TemplateResult:
    """Learn a template of image files, as ``voxreg template`` does
    (:func:`voxreg.training.train_template`).

    The template starts as the voxel-wise mean of the images and is learned jointly with a
    diffeomorphic bidirectional VxmDense registering it to each subject, with a penalty on the
    mean deformation that keeps it centred (Dalca et al., NeurIPS 2019). With ``attributes``
    and ``attribute``, a conditional template: the mean image plus a decoder of the attributes.

    Args:
        images: image files (one channel, 2D or 3D, all on one grid; a 3D file with a last axis
            of size 1 is a 2D slice); more come from ``list_file`` and ``glob``. At least 2.
        out: the template file, written atomically on the images' grid with their affine.
        run: run folder (default: ``out``'s name without extension + ``-run``, next to it).
        epochs, steps_per_epoch, batch_size, lr, seed: the schedule.
        lambda_, mean_weight, image_loss: velocity smoothness weight, weight of the mean
            velocity penalty, image similarity (both directions).
        int_steps, int_downsize, enc, dec: the registration network.
        attributes: CSV of subject attributes, rows matched to images by an ``id`` column (file
            name without extension) or a ``path`` column (:func:`voxreg.data.read_attributes`).
        attribute: the column(s) to condition on (a list, or one comma-separated string).
        at: conditional, one attribute: also write the template at these values, as ``out`` with
            ``_<attribute><value>`` before the extension.
        resume: continue from ``run/checkpoint.safetensors``.
        snapshot_every: every N epochs (and at the end) save a picture and an image of the
            template in ``run/snapshots`` (0: never).
        device, normalize, progress: as :func:`voxreg.apps.train.train_from_files`.
        log: called with a line of news before training (whether it resumes).

    Returns:
        A :class:`TemplateResult`.

    Raises:
        FileNotFoundError: a missing image, list or table; a glob matching nothing.
        ValueError: fewer than 2 images, images off one grid, bad numbers or attribute options
            (named by their command-line spelling), an output that is an input.

    >>> result = template_from_files(paths, out="template.nii.gz", epochs=20)  # doctest: +SKIP
    >>> result.out.name  # doctest: +SKIP
    'template.nii.gz'
    """
    paths = gather_images(images, list_file, glob)
    if len(paths) < 2:
        raise ValueError("a template needs at least 2 images")
    _check_numbers(epochs, batch_size, int_steps, int_downsize, steps_per_epoch, snapshot_every,
                   lr, lambda_, mean_weight)
    at = [float(v) for v in at]
    columns = _columns(attributes, attribute, at)
    features = network_features(enc, dec)

    out_path = io.check_output_path(out, tuple(paths) + ((attributes,) if attributes else ()))
    ext = io.format_of(out_path)
    stem = out_path.name[: -len(ext)]
    extra_outputs = [out_path.with_name(f"{stem}_{columns[0]}{v:g}{ext}") for v in at]
    for path in extra_outputs:
        io.check_output_path(path, tuple(paths))
    run_dir = Path(run) if run is not None else out_path.with_name(f"{stem}-run")
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--run {str(run_dir)!r} is a file, not a folder")

    first = io.load_image(paths[0])
    shape = first.shape
    for path in paths[1:]:
        detail = grid_difference(*io.read_grid(path), shape, first.affine)
        if detail is not None:
            raise ValueError(
                f"all template images must share one grid: {path!r} differs from {paths[0]!r} "
                f"({detail}); resample them first (e.g. 'voxreg register --resample')")
    flat = len(shape) == 3 and shape[-1] == 1  # a 2D slice stored as a 3D file
    if len(shape) not in (2, 3):
        raise ValueError(f"template images must be 2D or 3D, got shape {shape}")

    def loader(path: str) -> np.ndarray:
        image = first if path == paths[0] else io.load_image(path)
        if image.channels:
            raise ValueError(f"{path!r} has several channels; voxreg template reads one-channel "
                             "images")
        data = io.normalize(image.data, normalize)
        return data[..., 0] if flat else data

    stack = np.stack([loader(p) for p in paths])
    attrs = read_attributes(attributes, columns, paths) if columns else None
    dev = resolve_device(device)
    checkpoint = run_dir / CHECKPOINT_NAME
    resumed = bool(resume) and checkpoint.exists()
    if resume and log is not None:
        log(f"resuming from {checkpoint}" if resumed else f"no {checkpoint} yet: starting a new run")
    metadata = {
        "normalize": normalize, "image_loss": image_loss, "lambda": lambda_,
        "mean_weight": mean_weight, "training_images": len(paths),
        "attributes": columns or None, "grid_affine": np.asarray(first.affine).tolist(),
        "created_by": "voxreg template",
    }
    model, history = train_template(
        stack, attrs, attribute_names=columns or None, nb_features=features,
        int_steps=int_steps, int_downsize=int_downsize, out_dir=run_dir, resume=bool(resume),
        init_seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
        lr=lr, image_loss=image_loss, lambda_=lambda_, mean_weight=mean_weight, device=dev,
        seed=seed, snapshot_every=snapshot_every or None, affine=first.affine,
        snapshot_format=ext, progress=progress, metadata=metadata,
    )

    def write(path: Path, image: np.ndarray) -> Path:
        return io.save_image(path, image[..., None] if flat else image, affine=first.affine,
                             header=first.header)

    if columns:
        write(out_path, templates_at(model, [model.attribute_center])[0])
        for path, value in zip(extra_outputs, at):
            write(path, templates_at(model, [value])[0])
        template_sharpness = None
    else:
        template = model.template_image()
        write(out_path, template)
        template_sharpness = sharpness(template)
    return TemplateResult(model, history, out_path, list(zip(at, extra_outputs)), run_dir,
                          template_sharpness, sharpness(stack.mean(0)), resumed)
