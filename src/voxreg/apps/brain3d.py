"""3D brain registration on IXI volumes (VoxelMorph's 3D brain tutorial): a first model trained on CPU.

A :class:`~voxreg.nn.networks.VxmDense` model (plain displacement, ``int_steps=0``) with the
VoxelMorph features ``[[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]]`` is trained
subject-to-subject on the 121 training volumes of ``ixi/`` (96x112x96 at 2 mm, affinely aligned
to MNI152) with ``MSE + lambda * Grad("l2")``, Adam, batch 1. The run lives in one folder
(``history.csv``, ``loss.png``, ``checkpoint.safetensors`` after every epoch) and resumes from it,
so several short sessions can add up to one long training.

* :func:`load_ixi` reads one split (images float32 in [0, 1], labels).
* :func:`train_brain3d` trains (or resumes) the run, optionally within a wall-clock budget.
* :func:`evaluate_brain3d` registers validation pairs and reports label Dice before (affine
  only: the volumes are already affinely aligned) and after, % folding voxels and seconds per pair.
* :func:`figures` draws the mid-slices of moving / fixed / moved and the warped segmentation.

The shipped model is ``voxreg.load_model("brain3d")`` when it exists.

Data credit: IXI (https://brain-development.org/ixi-dataset/, CC BY-SA 3.0) and DLMUSE labels by
CBICA / NiChart (Bashyam et al., Radiology: AI 2025).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from voxreg import plot, registration
from voxreg import transforms as T
from voxreg._runtime import model_device
from voxreg.checkpoint import load_checkpoint, warm_start
from voxreg.data import ScanToScanDataset, evaluation_pairs
from voxreg.data.locate import shared_data, shared_data_candidates
from voxreg.io import load_image, load_labels
from voxreg.metrics import mean_dice_present
from voxreg.nn.networks import VxmDense
from voxreg.training import train
from voxreg.training.engine import CHECKPOINT_NAME

__all__ = [
    "DATA_CREDIT",
    "FEATURES",
    "INSHAPE",
    "evaluate_brain3d",
    "figures",
    "load_ixi",
    "make_model",
    "pair_dice",
    "train_brain3d",
    "val_pairs",
]

RELATIVE_DATA = Path("ixi")
INSHAPE = (96, 112, 96)
# VoxelMorph's default 3D features (vxm_dense, "vm2"): encoder, decoder
FEATURES = [[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]]
DATA_CREDIT = (
    "IXI dataset (https://brain-development.org/ixi-dataset/), CC BY-SA 3.0; IXI T1s "
    "skull-stripped and affinely aligned to MNI152 at 2 mm, derived work under CC BY-SA 3.0. "
    "Labels: DLMUSE by CBICA/NiChart (Bashyam VM et al., DLMUSE, Radiology: AI 2025;7(6):e240299), "
    "shared under CC BY-SA 3.0."
)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The ``ixi/`` folder to use: ``path``, else ``$VOXREG_IXI``, else ``ixi/`` in the shared
    data folder (:func:`voxreg.data.locate.shared_data`; where it would first be looked for when
    it is absent)."""
    if path is None:
        path = (os.environ.get("VOXREG_IXI") or shared_data(RELATIVE_DATA)
                or shared_data_candidates(RELATIVE_DATA)[0])
    return Path(path)


def subject_ids(split: str, path: str | os.PathLike | None = None) -> list[str]:
    """The subject ids of ``split`` (``"train"`` or ``"val"``) from ``splits.json``."""
    folder = data_dir(path)
    file = folder / "splits.json"
    if not file.is_file():
        raise FileNotFoundError(f"no IXI splits at {file}; give the ixi/ folder or set $VOXREG_IXI")
    splits = json.loads(file.read_text())
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; splits.json has {sorted(splits)}")
    return list(splits[split])


def image_path(sid: str, path: str | os.PathLike | None = None) -> Path:
    return data_dir(path) / "images" / f"{sid}.nii.gz"


def label_path(sid: str, path: str | os.PathLike | None = None) -> Path:
    return data_dir(path) / "labels" / f"{sid}.nii.gz"


def load_volume(sid: str, path: str | os.PathLike | None = None) -> np.ndarray:
    """One IXI image as float32 in [0, 1] (the stored uint8 / 255)."""
    data = load_image(image_path(sid, path)).data
    return (np.asarray(data, dtype=np.float32) / 255.0).astype(np.float32)


def load_ixi(split: str = "train", path: str | os.PathLike | None = None, labels: bool = True,
             ids: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"ids", "images"[, "labels"]}`` of one split: images ``(N, 96, 112, 96)`` float32 in
    [0, 1], labels uint8 DLMUSE codes of the same shape (``ids`` picks subjects)."""
    ids = list(subject_ids(split, path) if ids is None else ids)
    images = np.stack([load_volume(s, path) for s in ids])
    out: dict[str, Any] = {"ids": ids, "images": images}
    if labels:
        out["labels"] = np.stack(
            [np.asarray(load_labels(label_path(s, path)).data, dtype=np.uint8) for s in ids])
    return out


def val_pairs(n: int, count: int = 10, seed: int = 0) -> np.ndarray:
    """``count`` distinct ordered pairs ``(moving, fixed)`` of ``n`` subjects, drawn reproducibly
    from ``seed`` (:func:`voxreg.data.evaluation_pairs`, stream 3030)."""
    return evaluation_pairs(n, count, seed, stream=3030)


# --------------------------------------------------------------------------------------------
# model and training
# --------------------------------------------------------------------------------------------


def make_model(nb_features: Sequence[Sequence[int]] | None = None,
               inshape: Sequence[int] = INSHAPE, int_steps: int = 0, int_downsize: int = 2,
               bidir: bool = False) -> VxmDense:
    """The 3D brain model: ``VxmDense(inshape, nb_features, int_steps)`` (default features:
    VoxelMorph's, :data:`FEATURES`). ``int_steps=0`` is VoxelMorph's plain model;
    ``int_steps=7, int_downsize=2, bidir=True`` the diffeomorphic, bidirectional one."""
    features = FEATURES if nb_features is None else [list(f) for f in nb_features]
    return VxmDense(inshape=tuple(inshape), nb_features=features, int_steps=int(int_steps),
                    int_downsize=int(int_downsize), bidir=bool(bidir))


def train_brain3d(
    out_dir: str | os.PathLike,
    epochs: int,
    steps_per_epoch: int = 50,
    lr: float = 1e-4,
    lambda_: float = 0.01,
    seed: int = 0,
    resume: bool = True,
    time_budget: float | None = None,
    stop_at: float | None = None,
    images: np.ndarray | None = None,
    nb_features: Sequence[Sequence[int]] | None = None,
    threads: int | None = 2,
    data: str | os.PathLike | None = None,
    progress: bool = False,
    verbose: bool = True,
    int_steps: int = 0,
    int_downsize: int = 2,
    bidir: bool = False,
    init_from: str | os.PathLike | None = None,
) -> tuple[VxmDense, list[dict[str, Any]]]:
    """Train the 3D brain model scan-to-scan with ``MSE + lambda_ * Grad("l2")``, batch 1.

    Pairs are random ordered pairs of distinct training volumes
    (:class:`voxreg.data.ScanToScanDataset`, no labels: the training is unsupervised), drawn
    reproducibly from ``seed`` and the epoch. The run is a :func:`voxreg.train` run in
    ``out_dir``; ``checkpoint.safetensors`` (model, Adam state, counters, history) is written
    after every epoch, so a kill loses at most one epoch, and ``resume=True`` continues from it
    (a resumed run sees the batches an uninterrupted one would).

    Args:
        out_dir: folder of the run.
        epochs: the most epochs to train, in total (counting those of a resumed checkpoint).
        steps_per_epoch: optimizer steps per epoch (keep it short: a checkpoint per epoch).
        lr: Adam learning rate.
        lambda_: weight of ``Grad("l2")`` on the displacement.
        seed: seeds the weights, the pair draw and the batch order.
        resume: continue from ``out_dir/checkpoint.safetensors`` when it exists; ``False``
            refuses to overwrite an existing run.
        time_budget: seconds from the call; no new epoch is started when the elapsed time plus
            the slowest epoch so far would pass it (at least one epoch is trained).
        stop_at: a wall-clock time (``time.time()`` seconds) with the same rule.
        images: ``(N, *inshape)`` float32 training volumes (default: the ``train`` split of
            ``data``, all loaded in memory).
        nb_features: UNet features (default :data:`FEATURES`).
        threads: ``torch.set_num_threads`` (``None``: leave as is).
        data: the ``ixi/`` folder (default ``$VOXREG_IXI`` or the shared copy).
        int_steps, int_downsize, bidir: the model (:func:`make_model`). With ``int_steps > 0``
            the smoothness term acts on the velocity (scaled by ``int_downsize`` as in
            VoxelMorph); with ``bidir`` the image term is ``0.5 MSE(fixed, moved) +
            0.5 MSE(moving, moved_fixed)``.
        init_from: a model (path or shipped name) whose matching weights start a *new* run
            (:func:`voxreg.checkpoint.warm_start`); ignored when resuming.

    Returns:
        ``(model, history)``: the trained model (eval mode) and the per-epoch history.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    out_dir = Path(out_dir)
    if not resume and (out_dir / CHECKPOINT_NAME).is_file():
        raise FileExistsError(f"{out_dir / CHECKPOINT_NAME} exists; resume it or use another folder")
    tic = time.perf_counter()
    deadline = None
    if time_budget is not None:
        deadline = time.time() + float(time_budget)
    if stop_at is not None:
        deadline = float(stop_at) if deadline is None else min(deadline, float(stop_at))

    if images is None:
        images = load_ixi("train", data, labels=False)["images"]
        if verbose:
            print(f"loaded {len(images)} training volumes in {time.perf_counter() - tic:.1f} s",
                  flush=True)
    images = np.asarray(images, dtype=np.float32)
    torch.manual_seed(int(seed))
    model = make_model(nb_features, images.shape[1:], int_steps, int_downsize, bidir)
    dataset = ScanToScanDataset(images, pairs_per_epoch=steps_per_epoch, seed=seed)

    features = FEATURES if nb_features is None else [list(f) for f in nb_features]
    meta = {"data": DATA_CREDIT, "lambda": float(lambda_), "nb_features": features}
    if init_from is not None and not (out_dir / CHECKPOINT_NAME).is_file():
        copied = warm_start(model, init_from)
        meta["init_from"] = str(init_from)
        if verbose:
            print(f"warm start: {copied} weight tensors from {init_from}", flush=True)
    image_terms = ["mse", "mse"] if bidir else ["mse"]
    image_weights = [0.5, 0.5] if bidir else [1.0]
    common = dict(
        losses=[*image_terms, "grad"], loss_weights=[*image_weights, float(lambda_)],
        steps_per_epoch=steps_per_epoch, batch_size=1, lr=lr, device="cpu", seed=seed,
        out_dir=out_dir, checkpoint_every=1, progress=progress,
        reg_on="velocity" if int_steps > 0 else "disp", verbose=verbose, metadata=meta,
    )
    history: list[dict[str, Any]] = []
    done = 0
    if (out_dir / CHECKPOINT_NAME).is_file():
        ckpt = load_checkpoint(out_dir / CHECKPOINT_NAME, model=model)
        done, history = int(ckpt.epoch or 0), list(ckpt.history or [])
    # one epoch per call, each resuming the last checkpoint (Adam state and batch order
    # included), so that the run can stop cleanly between epochs
    slowest = 0.0
    for epoch in range(done + 1, epochs + 1):
        start = time.time()
        if deadline is not None and epoch > done + 1 and start + slowest > deadline:
            if verbose:
                print(f"stopping before epoch {epoch}: the time budget is spent", flush=True)
            break
        history = train(model, dataset, epochs=epoch, resume=True, **common)
        slowest = max(slowest, time.time() - start)
    model.eval()
    return model, history


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def pair_dice(fixed_labels: np.ndarray, moved_labels: np.ndarray,
              moving_labels: np.ndarray | None = None) -> float:
    """Mean Dice over the non-zero labels present in both maps
    (:func:`voxreg.metrics.mean_dice_present`)."""
    return mean_dice_present(fixed_labels, moved_labels, moving_labels)


def register_pair(model: nn.Module, moving: np.ndarray, fixed: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(moved, disp, seconds)`` of one pair of ``(D, H, W)`` volumes (CPU tensors
    ``(1, 1, D, H, W)`` and ``(1, 3, D, H, W)``; seconds of the forward pass)."""
    device = model_device(model)
    x = torch.as_tensor(np.asarray(moving, dtype=np.float32))[None, None].to(device)
    y = torch.as_tensor(np.asarray(fixed, dtype=np.float32))[None, None].to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        tic = time.perf_counter()
        out = model(x, y, registration=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
    model.train(was_training)
    return out[0].cpu(), out[-1].cpu(), seconds


def evaluate_brain3d(
    model: nn.Module,
    pairs: np.ndarray | int = 10,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    seed: int = 0,
    data: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Register validation pairs and score them with label Dice.

    Args:
        model: a 3D registration model ``(moving, fixed) -> (moved, disp)``.
        pairs: ``(P, 2)`` indices ``(moving, fixed)`` into ``images``, or a number of pairs drawn
            by :func:`val_pairs` with ``seed``.
        images, labels: ``(N, D, H, W)`` volumes in [0, 1] and their label maps (default: the
            ``val`` split of ``data``).

    Returns:
        A dict: ``pairs``, ``dice_before``/``dice_after`` (means over pairs of the mean Dice over
        the non-zero labels present in both label maps; before = no deformable registration,
        i.e. affine only, as the volumes come affinely aligned; the moving labels are warped
        with nearest-neighbour interpolation), their per-pair lists, ``folding_pct`` (mean % of
        voxels with Jacobian determinant <= 0) and per pair, ``seconds_per_pair`` (the forward
        pass on batch 1, mean over pairs after one warm-up), ``max_disp`` (voxels); for a
        diffeomorphic model (``int_steps > 0``) also ``inverse_residual`` (mean over pairs of
        the mean norm, in voxels, of ``compose(disp, inverse)`` with the inverse
        ``exp(-velocity)``, :func:`voxreg.register` with ``inverse=True``) and per pair.
    """
    if images is None or labels is None:
        val = load_ixi("val", data)
        images, labels = val["images"], val["labels"]
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels)
    if images.shape != labels.shape or images.ndim != 4:
        raise ValueError(f"images and labels must both be (N, D, H, W), got {images.shape} and "
                         f"{labels.shape}")
    if isinstance(pairs, (int, np.integer)):
        pairs = val_pairs(len(images), int(pairs), seed)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    register_pair(model, images[pairs[0, 0]], images[pairs[0, 1]])  # warm-up
    before, after, folding, seconds, max_disp = [], [], [], [], 0.0
    diffeomorphic = int(getattr(model, "int_steps", 0) or 0) > 0
    residuals: list[float] = []
    for i, j in pairs:
        _, disp, sec = register_pair(model, images[i], images[j])
        seg = torch.as_tensor(labels[i].astype(np.int64))[None, None]
        moved_seg = T.warp(seg, disp, interp="nearest").numpy()[0, 0]
        before.append(pair_dice(labels[j], labels[i]))
        after.append(pair_dice(labels[j], moved_seg, moving_labels=labels[i]))
        folding.append(float(T.folding_fraction(disp).reshape(-1)[0]) * 100)
        seconds.append(sec)
        max_disp = max(max_disp, float(disp.abs().max()))
        if diffeomorphic:
            residuals.append(registration.register(model, images[i], images[j],
                                                   inverse=True).inverse_residual)
    extra = {}
    if diffeomorphic:
        extra = {"inverse_residual": float(np.mean(residuals)),
                 "inverse_residual_per_pair": residuals}
    return {**extra,
        "pairs": pairs.tolist(),
        "dice_before": float(np.nanmean(before)),
        "dice_after": float(np.nanmean(after)),
        "dice_before_per_pair": before,
        "dice_after_per_pair": after,
        "folding_pct": float(np.mean(folding)),
        "folding_pct_per_pair": folding,
        "seconds_per_pair": float(np.mean(seconds)),
        "max_disp": max_disp,
    }


def summary_table(results: Mapping[str, Any]) -> str:
    """A Markdown table of one :func:`evaluate_brain3d` result, one row per pair and the mean."""
    lines = ["| pair (moving, fixed) | Dice before (affine) | Dice after | % folding |",
             "|---|---|---|---|"]
    for p, b, a, f in zip(results["pairs"], results["dice_before_per_pair"],
                          results["dice_after_per_pair"], results["folding_pct_per_pair"]):
        lines.append(f"| {tuple(p)} | {b:.3f} | {a:.3f} | {f:.3f} |")
    lines.append(f"| **mean** | **{results['dice_before']:.3f}** | **{results['dice_after']:.3f}**"
                 f" | **{results['folding_pct']:.3f}** |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def figures(model: nn.Module, moving: np.ndarray, fixed: np.ndarray, moving_labels: np.ndarray,
            out_dir: str | os.PathLike, prefix: str = "brain3d", width: float = 7.0
            ) -> list[Path]:
    """Save two small PNGs in ``out_dir``: ``{prefix}_slices.png`` (mid-slices along the three
    axes of moving, fixed and moved, :func:`voxreg.plot.volume_slices`) and
    ``{prefix}_seg.png`` (the warped moving segmentation over the fixed image along each axis,
    :func:`voxreg.plot.overlay`, label colormap). Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    moved, disp, _ = register_pair(model, moving, fixed)
    seg = torch.as_tensor(np.asarray(moving_labels).astype(np.int64))[None, None]
    moved_seg = T.warp(seg, disp, interp="nearest").numpy()[0, 0]
    slices_png = out_dir / f"{prefix}_slices.png"
    fig = plot.volume_slices([moving, fixed, moved[0, 0].numpy()],
                             titles=["moving", "fixed", "moved"], width=width)
    fig.savefig(slices_png, dpi=80)
    seg_png = out_dir / f"{prefix}_seg.png"
    fig = Figure(figsize=(width, width / 3 + 0.4))
    axes = fig.subplots(1, 3)
    for axis, ax in enumerate(axes):
        plot.overlay(fixed, moved_seg, axis=axis, ax=ax, title=f"warped labels, axis {axis}")
    fig.tight_layout()
    fig.savefig(seg_png, dpi=80)
    return [slices_png, seg_png]
