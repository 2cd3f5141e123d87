"""2D brain registration on IXI axial slices (VoxelMorph's tutorial, "2D brain" section).

Two :class:`~voxreg.nn.networks.VxmDense` models (plain displacement, ``int_steps=0``) are trained
subject-to-subject on the 121 axial training slices of ``ixi2d.npz`` with
``MSE + lambda * Grad("l2")``: ``"smooth"`` (``lambda = 0.01``) and ``"no smooth"``
(``lambda = 0``). They ship as ``brain2d-smooth`` and ``brain2d-nosmooth``
(``voxreg.load_model("brain2d-smooth")``).

* :func:`load_ixi2d` reads the slices (the file's path: argument, ``$VOXREG_IXI2D`` or
  ``ixi2d/ixi2d.npz`` in the shared data folder, see :mod:`voxreg.data.locate`).
* :func:`train_brain2d` trains one model, optionally within a wall-clock budget.
* :func:`evaluate_brain2d` registers fixed validation pairs and reports label Dice before
  (identity) and after registration, % folding voxels and seconds per pair.
* :func:`compare_figure` draws moving / fixed / both moved images / both flows side by side.

Data credit: IXI (https://brain-development.org/ixi-dataset/, CC BY-SA 3.0) and DLMUSE labels by
CBICA / NiChart (Bashyam et al., Radiology: AI 2025), as prepared in ``ixi2d.npz``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from torch import Tensor, nn

from voxreg import plot
from voxreg import transforms as T
from voxreg._runtime import model_device
from voxreg.checkpoint import load_checkpoint
from voxreg.data import ScanToScanDataset, evaluation_pairs
from voxreg.data.locate import shared_data, shared_data_candidates
from voxreg.metrics import mean_dice_present
from voxreg.nn.networks import VxmDense
from voxreg.training import train
from voxreg.training.engine import CHECKPOINT_NAME

__all__ = [
    "DATA_CREDIT",
    "SEED_FEATURES",
    "compare_figure",
    "dice_per_label",
    "evaluate_brain2d",
    "load_ixi2d",
    "make_model",
    "pair_dice",
    "train_brain2d",
    "val_pairs",
]

RELATIVE_DATA = Path("ixi2d") / "ixi2d.npz"
INSHAPE = (96, 112)
# VoxelMorph's tutorial features for 2D (its MNIST section): encoder, decoder
SEED_FEATURES = [[32, 32, 32, 32], [32, 32, 32, 32, 32, 16]]
DATA_CREDIT = (
    "IXI dataset (https://brain-development.org/ixi-dataset/), CC BY-SA 3.0; axial slices of "
    "IXI T1s (Hammersmith, skull-stripped, affinely aligned to MNI152), derived work under CC "
    "BY-SA 3.0. Labels: DLMUSE by CBICA/NiChart (Bashyam VM et al., DLMUSE, Radiology: AI "
    "2025;7(6):e240299), shared under CC BY-SA 3.0."
)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def data_path(path: str | os.PathLike | None = None) -> Path:
    """The ``ixi2d.npz`` to use: ``path``, else ``$VOXREG_IXI2D``, else ``ixi2d/ixi2d.npz`` in
    the shared data folder (:func:`voxreg.data.locate.shared_data`; where it would first be
    looked for when it is absent)."""
    if path is None:
        path = (os.environ.get("VOXREG_IXI2D") or shared_data(RELATIVE_DATA)
                or shared_data_candidates(RELATIVE_DATA)[0])
    path = Path(path)
    if path.is_dir():
        path = path / "ixi2d.npz"
    return path


def load_ixi2d(path: str | os.PathLike | None = None, view: str = "axial") -> dict[str, np.ndarray]:
    """``train_images``, ``train_labels``, ``val_images``, ``val_labels`` of one view.

    Images are float32 in [0, 1] ``(N, H, W)``; labels uint8 DLMUSE codes of the same shape.
    ``view`` is ``"axial"`` (96x112) or ``"coronal"`` (96x96).
    """
    if view not in ("axial", "coronal"):
        raise ValueError(f"view must be 'axial' or 'coronal', got {view!r}")
    file = data_path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"no IXI 2D slices at {file}; give the path of ixi2d.npz or set $VOXREG_IXI2D"
        )
    suffix = "" if view == "axial" else "_coronal"
    with np.load(file) as npz:
        return {
            f"{split}_{kind}": np.asarray(npz[f"{split}_{kind}{suffix}"])
            for split in ("train", "val") for kind in ("images", "labels")
        }


def val_pairs(n: int, count: int = 50, seed: int = 0) -> np.ndarray:
    """``count`` distinct ordered pairs ``(moving, fixed)`` of ``n`` images, drawn reproducibly
    from ``seed`` (:func:`voxreg.data.evaluation_pairs`, stream 2024)."""
    return evaluation_pairs(n, count, seed, stream=2024)


# --------------------------------------------------------------------------------------------
# model and training
# --------------------------------------------------------------------------------------------


def make_model(nb_features: Sequence[Sequence[int]] | None = None,
               inshape: Sequence[int] = INSHAPE) -> VxmDense:
    """The 2D brain model: ``VxmDense(inshape, nb_features, int_steps=0)``
    (default features: VoxelMorph's tutorial's, :data:`SEED_FEATURES`)."""
    features = SEED_FEATURES if nb_features is None else [list(f) for f in nb_features]
    return VxmDense(inshape=tuple(inshape), nb_features=features, int_steps=0)


def train_brain2d(
    out_dir: str | os.PathLike,
    smooth_lambda: float,
    epochs: int,
    steps_per_epoch: int,
    seed: int = 0,
    time_budget: float | None = None,
    lr: float = 1e-4,
    batch_size: int = 8,
    nb_features: Sequence[Sequence[int]] | None = None,
    data: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    n_val_pairs: int = 10,
    progress: bool = False,
    verbose: bool = True,
) -> tuple[VxmDense, list[dict[str, Any]]]:
    """Train one 2D brain model scan-to-scan with ``MSE + smooth_lambda * Grad("l2")``.

    Batches are random pairs of distinct training slices (:class:`voxreg.data.ScanToScanDataset`,
    no labels: the training is unsupervised). The run is a :func:`voxreg.train` run in
    ``out_dir`` (``history.csv`` with the validation Dice of ``n_val_pairs`` pairs after each
    epoch, ``loss.png``, ``checkpoint.safetensors``, ``model.safetensors``); it resumes from
    ``out_dir`` when a checkpoint is there.

    Args:
        out_dir: folder of the run.
        smooth_lambda: weight of the ``Grad("l2")`` regulariser on the displacement.
        epochs: the most epochs to train (in total).
        steps_per_epoch: optimizer steps per epoch.
        seed: seeds the weights, the pair draw and the batch order.
        time_budget: seconds; no new epoch is started when the elapsed time plus the slowest
            epoch so far would exceed it (at least one epoch is trained). ``None``: train all
            ``epochs``.
        lr, batch_size: Adam learning rate and pairs per step.
        nb_features: UNet features (default VoxelMorph's tutorial's 2D features).
        data: a dict as from :func:`load_ixi2d`, or a path to ``ixi2d.npz``.
        n_val_pairs: validation pairs evaluated after each epoch (0: none).

    Returns:
        ``(model, history)``: the trained model (eval mode) and the per-epoch history.
    """
    if not isinstance(data, Mapping):
        data = load_ixi2d(data)
    images = np.asarray(data["train_images"], dtype=np.float32)
    torch.manual_seed(int(seed))
    model = make_model(nb_features, images.shape[1:])
    dataset = ScanToScanDataset(images, pairs_per_epoch=steps_per_epoch * batch_size, seed=seed)

    val_fn = None
    if n_val_pairs and "val_images" in data:
        vi, vl = data["val_images"], data["val_labels"]
        vp = val_pairs(len(vi), n_val_pairs, seed=1)

        def val_fn(m: nn.Module) -> dict[str, float]:
            r = evaluate_brain2d(m, vi, vl, vp, timing=False)
            return {"val_dice": r["dice_after"], "val_folding_pct": r["folding_pct"]}

    out_dir = Path(out_dir)
    meta = {"data": DATA_CREDIT, "smooth_lambda": float(smooth_lambda)}
    common = dict(
        losses=["mse", "grad"], loss_weights=[1.0, float(smooth_lambda)],
        steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr, device="cpu",
        seed=seed, out_dir=out_dir, checkpoint_every=1, progress=progress, val_fn=val_fn,
        reg_on="disp", verbose=verbose, metadata=meta,
    )
    if time_budget is None:
        history = train(model, dataset, epochs=epochs, resume=True, **common)
        return model, history

    # one epoch per call, each resuming the last checkpoint (Adam state and batch order
    # included), so that the run stops cleanly on the time budget
    tic = time.perf_counter()
    history: list[dict[str, Any]] = []
    done = 0
    if (out_dir / CHECKPOINT_NAME).is_file():
        ckpt = load_checkpoint(out_dir / CHECKPOINT_NAME, model=model)
        done, history = int(ckpt.epoch or 0), list(ckpt.history or [])
    slowest = 0.0
    for epoch in range(done + 1, epochs + 1):
        start = time.perf_counter()
        if epoch > done + 1 and start - tic + slowest > time_budget:
            break
        history = train(model, dataset, epochs=epoch, resume=True, **common)
        slowest = max(slowest, time.perf_counter() - start)
    model.eval()
    return model, history


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Dice of each label of ``labels`` between label maps ``a`` and ``b`` (NaN when a label is in
    neither)."""
    a = np.asarray(a)
    b = np.asarray(b)
    out = np.empty(len(labels))
    for k, v in enumerate(labels):
        x, y = a == v, b == v
        total = x.sum() + y.sum()
        out[k] = 2.0 * np.logical_and(x, y).sum() / total if total else np.nan
    return out


def pair_dice(fixed_labels: np.ndarray, moved_labels: np.ndarray,
              moving_labels: np.ndarray | None = None) -> float:
    """Mean Dice over the non-zero labels present in both maps
    (:func:`voxreg.metrics.mean_dice_present`)."""
    return mean_dice_present(fixed_labels, moved_labels, moving_labels)


def register_pairs(model: nn.Module, images: np.ndarray, pairs: np.ndarray,
                   batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """``(moved, disp)`` for ``pairs`` of ``images`` (``(N, H, W)``), CPU tensors
    ``(P, 1, H, W)`` and ``(P, 2, H, W)``."""
    device = model_device(model)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))[:, None]
    moved, disps = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            p = pairs[s:s + batch_size]
            out = model(x[p[:, 0]].to(device), x[p[:, 1]].to(device), registration=True)
            moved.append(out[0].cpu())
            disps.append(out[-1].cpu())
    model.train(was_training)
    return torch.cat(moved), torch.cat(disps)


def evaluate_brain2d(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    pairs: np.ndarray | int = 50,
    seed: int = 0,
    timing: bool = True,
) -> dict[str, Any]:
    """Register validation pairs and score them with label Dice.

    Args:
        model: a 2D registration model ``(moving, fixed) -> (moved, disp)``.
        images, labels: ``(N, H, W)`` slices and their label maps.
        pairs: ``(P, 2)`` indices ``(moving, fixed)``, or a number of pairs drawn by
            :func:`val_pairs` with ``seed``.
        timing: also time each pair alone (batch of 1, no gradients) for ``seconds_per_pair``.

    Returns:
        A dict: ``pairs`` (list), ``dice_before``/``dice_after`` (means over pairs of the mean
        Dice over the non-zero labels present in both label slices; before = identity),
        ``dice_before_per_pair``/``dice_after_per_pair``, ``folding_pct`` (mean % of voxels with
        a Jacobian determinant <= 0) and ``folding_pct_per_pair``, ``seconds_per_pair`` (model
        forward pass alone, NaN without ``timing``), ``max_disp`` (largest displacement in voxels).
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels)
    if images.shape != labels.shape or images.ndim != 3:
        raise ValueError(f"images and labels must both be (N, H, W), got {images.shape} and "
                         f"{labels.shape}")
    if isinstance(pairs, (int, np.integer)):
        pairs = val_pairs(len(images), int(pairs), seed)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    _, disp = register_pairs(model, images, pairs)
    seg = torch.as_tensor(labels.astype(np.int64))[:, None]
    moved_seg = T.warp(seg[pairs[:, 0]], disp, interp="nearest").numpy()[:, 0]
    before, after = [], []
    for k, (i, j) in enumerate(pairs):
        before.append(pair_dice(labels[j], labels[i]))
        after.append(pair_dice(labels[j], moved_seg[k], moving_labels=labels[i]))
    folding = (T.folding_fraction(disp) * 100).tolist()

    seconds = float("nan")
    if timing:
        device = model_device(model)
        x = torch.as_tensor(images)[:, None]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            i, j = pairs[0]
            model(x[i:i + 1].to(device), x[j:j + 1].to(device), registration=True)  # warm-up
            tic = time.perf_counter()
            for i, j in pairs:
                model(x[i:i + 1].to(device), x[j:j + 1].to(device), registration=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - tic) / len(pairs)
        model.train(was_training)
    return {
        "pairs": pairs.tolist(),
        "dice_before": float(np.nanmean(before)),
        "dice_after": float(np.nanmean(after)),
        "dice_before_per_pair": before,
        "dice_after_per_pair": after,
        "folding_pct": float(np.mean(folding)),
        "folding_pct_per_pair": folding,
        "seconds_per_pair": seconds,
        "max_disp": float(disp.abs().max()),
    }


# --------------------------------------------------------------------------------------------
# figure
# --------------------------------------------------------------------------------------------


def _rot90_image(image: np.ndarray) -> np.ndarray:
    """Display orientation of an axial slice: anterior up, subject's left on the left."""
    return np.rot90(image)


def _rot90_disp(disp: np.ndarray) -> np.ndarray:
    """A ``(2, H, W)`` field shown with :func:`numpy.rot90`: grid and components rotated."""
    # rot90: new[i, j] = old[j, W-1-i], so new components are (-old1, old0)
    return np.stack([np.rot90(-disp[1]), np.rot90(disp[0])])


def _figure_pixels(fig) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def compare_figure(
    smooth: nn.Module,
    nosmooth: nn.Module,
    images: np.ndarray,
    pairs: np.ndarray,
    path: str | os.PathLike,
    labels: Sequence[str] = ("smooth", "no smooth"),
    width: float = 12.0,
    flow_scale: float = 1.0,
) -> Path:
    """VoxelMorph's tutorial's side-by-side figure, one row per pair: moving, fixed, moved by each model
    (:func:`voxreg.plot.slices`) and the two flows (:func:`voxreg.plot.flow`), saved as one PNG.

    Slices are shown anterior up (``numpy.rot90``), the fields rotated with them and drawn at
    every 3rd voxel, arrows ``flow_scale`` times their length in voxels.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    images = np.asarray(images, dtype=np.float32)
    moved_s, disp_s = register_pairs(smooth, images, pairs)
    moved_n, disp_n = register_pairs(nosmooth, images, pairs)
    panels, titles, fields, ftitles = [], [], [], []
    for k, (i, j) in enumerate(pairs):
        panels += [_rot90_image(images[i]), _rot90_image(images[j]),
                   _rot90_image(moved_s[k, 0].numpy()), _rot90_image(moved_n[k, 0].numpy())]
        titles += [f"moving ({i})", f"fixed ({j})", f"moved ({labels[0]})",
                   f"moved ({labels[1]})"]
        fields += [_rot90_disp(disp_s[k].numpy()), _rot90_disp(disp_n[k].numpy())]
        ftitles += [f"flow ({labels[0]})", f"flow ({labels[1]})"]
    rows = len(pairs)
    left = plot.slices(panels, titles=titles, cmaps="gray", grid=(rows, 4), width=width * 2 / 3,
                       imshow_args={"vmin": 0, "vmax": 1})
    right = plot.flow(fields, titles=ftitles, grid=(rows, 2), width=width / 3, stride=3,
                      scale=flow_scale)
    a, b = _figure_pixels(left), _figure_pixels(right)
    height = max(a.shape[0], b.shape[0])
    picture = np.concatenate(
        [np.pad(x, ((0, height - x.shape[0]), (0, 0), (0, 0)), constant_values=255)
         for x in (a, b)], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, picture)
    return path


def summary_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`evaluate_brain2d` results, one row per model."""
    lines = ["| model | Dice before | Dice after | % folding | s / pair |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['dice_before']:.3f} | {r['dice_after']:.3f} | "
                     f"{r['folding_pct']:.3f} | {r['seconds_per_pair']:.4f} |")
    return "\n".join(lines)

