"""Train a VoxelMorph model from image files: the pipeline of ``voxreg train``.

Three kinds of run, as in VoxelMorph: unsupervised scan-to-scan (random pairs of the images) or
scan-to-atlas; semi-supervised (``seg_weight``: a Dice term on warped label maps, one per image);
and SynthMorph (``synth``: synthetic label maps and random-contrast images only).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from voxreg import io
from voxreg._runtime import resolve_device
from voxreg.apps.files import (
    PathLike,
    gather_images,
    glob_files,
    grid_difference,
    network_features,
    read_list,
)
from voxreg.checkpoint import load_checkpoint
from voxreg.data import ScanToAtlasDataset, ScanToScanDataset
from voxreg.data.synthesis import LabelSynthesis, SynthPairDataset
from voxreg.nn.networks import VxmDense
from voxreg.training import train
from voxreg.training.engine import CHECKPOINT_NAME, MODEL_NAME

__all__ = ["TrainResult", "read_label_map", "train_from_files"]

RESAMPLE_HINT = "(e.g. 'voxreg warp' or 'voxreg register --resample')"


@dataclass
class TrainResult:
    """What :func:`train_from_files` returns.

    Attributes:
        model: the trained :class:`voxreg.nn.networks.VxmDense` (on the training device).
        history: one dict per epoch (``epoch``, ``step``, ``loss``, each term, ``seconds``).
        out: the run folder; ``model_path`` (final model) and ``checkpoint`` (resumable) in it.
        resumed: whether the run continued from ``checkpoint``.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    out: Path
    model_path: Path
    checkpoint: Path
    resumed: bool


def read_label_map(path: PathLike) -> np.ndarray:
    """A label map file as int64; a ValueError for non-integer values or types."""
    data = np.asarray(io.load_image(path).data)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise ValueError(f"label map {str(path)!r} holds non-integer values")
    elif data.dtype.kind not in "iub":
        raise ValueError(f"label map {str(path)!r} must hold integer labels, got {data.dtype}")
    return data.astype(np.int64)


def _gather_segs(seg: Iterable[PathLike], seg_list: PathLike | None, seg_glob: str | None
                 ) -> list[str]:
    found = [str(p) for p in seg]
    if seg_list is not None:
        found += read_list(seg_list, "--seg-list")
    if seg_glob is not None:
        found += glob_files(seg_glob, "--seg-glob")
    for path in found:
        if not Path(path).exists():
            raise FileNotFoundError(f"label map {path!r} does not exist")
    return found


def _check_label_grid(path: str, ref_shape, ref_affine, ref_name: str) -> None:
    detail = grid_difference(*io.read_grid(path), ref_shape, ref_affine)
    if detail is not None:
        raise ValueError(f"label map {path!r} is not on the grid of {ref_name} ({detail}); "
                         f"resample it first {RESAMPLE_HINT}")


def _check_numbers(epochs, batch_size, seg_downsize, steps_per_epoch, lr, lambda_, seg_weight):
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size),
                        ("--seg-downsize", seg_downsize)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"--steps-per-epoch must be a positive integer, got {steps_per_epoch}")
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"--lr must be positive, got {lr}")
    if lambda_ < 0 or not math.isfinite(lambda_):
        raise ValueError(f"--lambda must be >= 0, got {lambda_}")
    if seg_weight is not None and not (seg_weight > 0 and math.isfinite(seg_weight)):
        raise ValueError(f"--seg-weight must be a positive number, got {seg_weight}")


def _synth_grid(images, list_file, pattern, segs, shape, atlas, atlas_seg, synth_labels,
                synth_blob, synth_warp) -> tuple[list[str], tuple[int, ...], np.ndarray]:
    """``(paths, grid_shape, affine)`` of a SynthMorph run, checked."""
    if atlas is not None or atlas_seg is not None:
        raise ValueError("--synth trains on synthetic pairs: --atlas/--atlas-seg do not apply")
    for name, value in (("--synth-blob", synth_blob), ("--synth-warp", synth_warp)):
        if not (value >= 0 and math.isfinite(value)) or (name == "--synth-blob" and value == 0):
            raise ValueError(f"{name} must be a positive number, got {value}")
    if synth_labels < 2:
        raise ValueError(f"--synth-labels must be at least 2, got {synth_labels}")
    paths = gather_images(images, list_file, pattern) if (images or list_file or pattern) else []
    grid_from = segs[0] if segs else (paths[0] if paths else None)
    affine = np.eye(4)
    grid_shape: tuple[int, ...] = ()
    if grid_from is not None:
        grid_shape, affine = io.read_grid(grid_from)
        for path in segs[1:]:
            _check_label_grid(path, grid_shape, affine, repr(grid_from))
    if shape is not None:
        requested = tuple(int(s) for s in shape)
        if len(requested) not in (2, 3) or min(requested) < 2:
            text = ",".join(str(s) for s in requested)
            raise ValueError(f"--shape must be 2 or 3 sizes >= 2, e.g. 96,112; got {text!r}")
        if grid_from is not None and requested != tuple(grid_shape):
            raise ValueError(f"--shape {requested} differs from the grid of {grid_from!r} "
                             f"{tuple(grid_shape)}")
        grid_shape = requested
    elif grid_from is None:
        raise ValueError("--synth needs the shape of the pairs: give --shape (e.g. --shape "
                         "96,112), IMAGES, or label maps (--seg...)")
    grid_shape = tuple(int(s) for s in grid_shape)
    if len(grid_shape) not in (2, 3):
        raise ValueError(f"--synth trains 2D or 3D models, got shape {grid_shape}")
    return paths, grid_shape, affine


def _image_grid(images, list_file, pattern, segs, atlas, atlas_seg, seg_weight
                ) -> tuple[list[str], tuple[int, ...], np.ndarray]:
    """``(paths, grid_shape, affine)`` of an image-based run, checked."""
    paths = gather_images(images, list_file, pattern)
    if atlas is None and len(paths) < 2:
        raise ValueError("scan-to-scan training needs at least 2 images (or give --atlas)")
    if atlas is not None and not Path(atlas).exists():
        raise FileNotFoundError(f"atlas {str(atlas)!r} does not exist")
    if seg_weight is None and (segs or atlas_seg is not None):
        raise ValueError("label maps (--seg/--seg-list/--seg-glob/--atlas-seg) are used only "
                         "with --seg-weight W (semi-supervised) or --synth")
    if seg_weight is not None:
        if not segs:
            raise ValueError("--seg-weight needs one label map per image: give --seg, "
                             "--seg-list or --seg-glob")
        if len(segs) != len(paths):
            raise ValueError(f"--seg-weight needs one label map per image: {len(segs)} label "
                             f"maps for {len(paths)} images")
        if atlas is not None and atlas_seg is None:
            raise ValueError("--seg-weight with --atlas needs the atlas's label map: --atlas-seg")
    grid_shape, affine = io.read_grid(paths[0])
    for path in paths[1:] + ([str(atlas)] if atlas else []):
        detail = grid_difference(*io.read_grid(path), grid_shape, affine)
        if detail is not None:
            raise ValueError(f"all training images must share one grid: {path!r} differs from "
                             f"{paths[0]!r} ({detail}); resample them first {RESAMPLE_HINT}")
    for path in segs + ([str(atlas_seg)] if atlas_seg else []):
        _check_label_grid(path, grid_shape, affine, f"the images ({paths[0]!r})")
    if len(grid_shape) not in (2, 3):
        raise ValueError(f"training images must be 2D or 3D, got shape {grid_shape}")
    return paths, tuple(grid_shape), affine


def _out_folder(out: PathLike) -> Path:
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {str(out)!r} is not writable")
    return folder


def train_from_files(
    images: Sequence[PathLike] = (),
    *,
    out: PathLike,
    list_file: PathLike | None = None,
    glob: str | None = None,
    atlas: PathLike | None = None,
    enc: Sequence[int] | None = (16, 32, 32, 32),
    dec: Sequence[int] | None = (32, 32, 32, 32, 32, 16, 16),
    int_steps: int = 7,
    int_downsize: int = 2,
    bidir: bool = False,
    image_loss: Literal["mse", "ncc", "mi"] = "mse",
    lambda_: float = 0.01,
    seg: Sequence[PathLike] = (),
    seg_list: PathLike | None = None,
    seg_glob: str | None = None,
    atlas_seg: PathLike | None = None,
    seg_weight: float | None = None,
    seg_labels: Sequence[int] | None = None,
    seg_downsize: int = 1,
    synth: bool = False,
    shape: Sequence[int] | None = None,
    synth_labels: int = 16,
    synth_blob: float = 12.0,
    synth_warp: float = 4.0,
    epochs: int = 10,
    steps_per_epoch: int | None = None,
    batch_size: int = 1,
    lr: float = 1e-4,
    resume: bool = False,
    device: str | torch.device = "auto",
    normalize: Literal["percentile", "minmax", "none"] = "percentile",
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], Any] | None = None,
) -> TrainResult:
    """Train a :class:`voxreg.nn.networks.VxmDense` on image files, as ``voxreg train`` does
    (:func:`voxreg.training.train` on a dataset built from the files).

    Args:
        images: training image files (one channel, 2D or 3D, all on one grid); more come from
            ``list_file`` (one path per line, relative to its folder) and ``glob`` (a pattern).
        out: run folder (created): ``checkpoint.safetensors``, ``model.safetensors``,
            ``history.csv``, ``loss.png``.
        atlas: train scan-to-atlas to this fixed image (default: scan-to-scan, random pairs).
        enc, dec: encoder and decoder features of the UNet.
        int_steps, int_downsize, bidir: the model (``int_steps=0``: plain displacements).
        image_loss, lambda_: the image similarity and the weight of the smoothness loss.
        seg, seg_list, seg_glob: one label map per image, in the images' order (with
            ``seg_weight``), or label maps seeding the synthesis (with ``synth``).
        atlas_seg: the atlas's label map (with ``atlas`` and ``seg_weight``).
        seg_weight: weight of the Dice loss on warped label maps (semi-supervised; with
            ``synth``, default 1).
        seg_labels, seg_downsize: labels of the Dice loss (default: every non-zero one) and the
            factor of the coarser grid it is computed on.
        synth: SynthMorph training on synthetic pairs of grid ``shape`` (or the grid of the
            images / label maps); ``synth_labels``, ``synth_blob`` (voxels between noise nodes)
            and ``synth_warp`` (largest velocity std, voxels) shape the synthesis.
        epochs, steps_per_epoch, batch_size, lr, seed: the schedule (``steps_per_epoch``
            default: images / batch size, 100 with ``synth``).
        resume: continue from ``out/checkpoint.safetensors`` when there is one.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``... or a :class:`torch.device`.
        normalize: intensity normalisation of the images, stored with the model (register and
            eval use it by default).
        progress: show a progress bar.
        log: called with a line of news before training (whether it resumes).

    Returns:
        A :class:`TrainResult`.

    Raises:
        FileNotFoundError: a missing image, list, label map or atlas; a glob matching nothing.
        ValueError: bad numbers, images off one grid, label maps not matching the images, a
            checkpoint of another shape (messages name the option, e.g. ``--seg-weight``).
        NotADirectoryError, PermissionError: ``out`` is a file or not writable.

    >>> run = train_from_files(["a.nii.gz", "b.nii.gz", "c.nii.gz"], out="run",
    ...                        epochs=2, device="cpu")  # doctest: +SKIP
    >>> run.model_path.name  # doctest: +SKIP
    'model.safetensors'
    """
    _check_numbers(epochs, batch_size, seg_downsize, steps_per_epoch, lr, lambda_, seg_weight)
    features = network_features(enc, dec)
    dice_labels = None if seg_labels is None else [int(v) for v in seg_labels]
    segs = _gather_segs(seg, seg_list, seg_glob)
    if atlas_seg is not None and not Path(atlas_seg).exists():
        raise FileNotFoundError(f"--atlas-seg {str(atlas_seg)!r} does not exist")
    if synth:
        paths, grid_shape, affine = _synth_grid(images, list_file, glob, segs, shape, atlas,
                                                atlas_seg, synth_labels, synth_blob, synth_warp)
    else:
        paths, grid_shape, affine = _image_grid(images, list_file, glob, segs, atlas, atlas_seg,
                                                seg_weight)
    folder = _out_folder(out)
    checkpoint = folder / CHECKPOINT_NAME
    dev = resolve_device(device)

    def loader(item) -> np.ndarray:
        if isinstance(item, tuple):  # ("seg", path): a label map
            return read_label_map(item[1])
        image = io.load_image(item)
        if image.channels:
            raise ValueError(f"{item!r} has several channels; voxreg train reads one-channel images")
        return io.normalize(image.data, normalize)

    resumed = bool(resume and checkpoint.exists())
    if resumed:
        model = load_checkpoint(checkpoint, device="cpu").model
        if tuple(model.config.get("inshape", ())) != tuple(grid_shape):
            raise ValueError(
                f"{str(checkpoint)!r} was trained on shape {tuple(model.config.get('inshape', ()))}, "
                f"the {'pairs' if synth else 'images'} are {tuple(grid_shape)}"
            )
        message = f"resuming from {checkpoint}"
    else:
        message = f"no {checkpoint} yet: starting a new run" if resume else None
        model = VxmDense(grid_shape, nb_features=features, int_steps=int_steps,
                         int_downsize=int_downsize, bidir=bidir)
    if message is not None and log is not None:
        log(message)
    bidir_model = bool(getattr(model, "bidir", False))
    image_terms = 2 if bidir_model else 1
    metadata: dict[str, Any] = {
        "normalize": normalize, "lambda": lambda_, "grid_affine": np.asarray(affine).tolist(),
        "created_by": "voxreg train",
    }
    if synth:
        steps_per_epoch = steps_per_epoch or 100
        dataset = SynthPairDataset(
            grid_shape, pairs_per_epoch=steps_per_epoch * batch_size, seed=seed,
            label_options=LabelSynthesis(num_labels=synth_labels, label_spacing=synth_blob,
                                         warp_std=synth_warp),
            label_maps=[read_label_map(p) for p in segs] if segs else None,
        )
        seg_weight = 1.0 if seg_weight is None else seg_weight
        losses = [None] * image_terms + ["grad", "dice"]
        weights = [0.0] * image_terms + [lambda_, seg_weight]
        metadata.update({"synth": dataset.settings(), "seg_weight": seg_weight,
                         "training_images": 0,
                         "data": ("synthetic label maps and images only" if not segs else
                                  f"synthetic images of {len(segs)} real label maps")})
    else:
        seg_items = [("seg", p) for p in segs] if seg_weight else None
        if atlas is not None:
            dataset = ScanToAtlasDataset(
                paths, loader(str(atlas)), pairs_per_epoch=None, seed=seed, loader=loader,
                segs=seg_items, atlas_seg=read_label_map(atlas_seg) if seg_weight else None)
        else:
            dataset = ScanToScanDataset(paths, seed=seed, loader=loader, segs=seg_items)
        losses = [image_loss] * image_terms + ["grad"]
        weights = ([0.5, 0.5] if bidir_model else [1.0]) + [lambda_]
        if seg_weight is not None:
            losses.append("dice")
            weights.append(seg_weight)
        metadata.update({"image_loss": image_loss, "training_images": len(paths),
                         "atlas": str(atlas) if atlas else None})
        if seg_weight is not None:
            metadata.update({"seg_weight": seg_weight, "training_label_maps": len(segs)})
    if seg_weight is not None:
        metadata.update({"seg_labels": dice_labels, "seg_downsize": seg_downsize})
    history = train(
        model, dataset, losses=losses, loss_weights=weights, epochs=epochs,
        steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr, device=dev, seed=seed,
        out_dir=folder, resume=bool(resume), progress=progress, metadata=metadata,
        seg_labels=dice_labels, seg_downsize=seg_downsize,
    )
    return TrainResult(model, history, folder, folder / MODEL_NAME, checkpoint, resumed)
