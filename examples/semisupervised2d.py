"""Semi-supervised VoxelMorph in 2D: does a Dice loss on training label maps help?

Two ``VxmDense`` models (the brain2d setup: seed 2D features, plain displacement, MSE +
0.01 * Grad("l2"), Adam, batch 8) are trained on the 121 ixi2d axial training slices for the same
number of steps, from the same initial weights and on the same pairs:

* ``unsupervised``: MSE + lambda * Grad only;
* ``semi``: the same plus ``W * Dice`` between the warped one-hot moving labels and the fixed
  labels (``voxreg train --seg-weight W``), on a random half of the DLMUSE labels only; the other
  half is never used in training.

Both are scored on the 50 ixi2d validation pairs of the brain2d table with images alone (labels
are only used to score): mean Dice over all labels present in both slices, over the supervised
labels, and over the held-out labels.

    python examples/semisupervised2d.py --steps 600          # about 10 minutes per model
    python examples/semisupervised2d.py --eval-only           # score the two runs again

Outputs in ``--out`` (default ``outputs/semisupervised2d``): ``unsupervised/`` and ``semi/``
(training runs, resumable: ``--resume``), ``semisupervised2d.json`` and ``semisupervised2d.md``.

Data: IXI (CC BY-SA 3.0) with DLMUSE labels (CBICA/NiChart); see ``voxreg.apps.brain2d.DATA_CREDIT``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxreg import transforms as T
from voxreg.apps import brain2d
from voxreg.checkpoint import load_checkpoint
from voxreg.data import ScanToScanDataset
from voxreg.training import train
from voxreg.training.engine import CHECKPOINT_NAME

RUNS = ("unsupervised", "semi")


def split_labels(labels: np.ndarray, seed: int = 0) -> tuple[list[int], list[int]]:
    """The non-zero labels of the training maps, split at random into (supervised, held out)."""
    present = np.unique(labels)
    present = present[present != 0]
    order = np.random.default_rng(seed).permutation(len(present))
    half = len(present) // 2
    return sorted(int(v) for v in present[order[:half]]), sorted(int(v) for v in present[order[half:]])


def subset_dice(fixed: np.ndarray, moved: np.ndarray, moving: np.ndarray,
                subset: list[int]) -> float:
    """Mean Dice over the labels of ``subset`` present in both the fixed and the moving slice."""
    shared = np.intersect1d(np.intersect1d(np.unique(fixed), np.unique(moving)), subset)
    shared = shared[shared != 0]
    if shared.size == 0:
        return float("nan")
    return float(np.mean(brain2d.dice_per_label(fixed, moved, shared)))


def score(model: torch.nn.Module, data: dict[str, np.ndarray], pairs: np.ndarray,
          supervised: list[int], held_out: list[int]) -> dict[str, Any]:
    images, labels = data["val_images"], data["val_labels"]
    base = brain2d.evaluate_brain2d(model, images, labels, pairs, timing=False)
    _, disp = brain2d.register_pairs(model, images, pairs)
    seg = torch.as_tensor(labels.astype(np.int64))[:, None]
    moved = T.warp(seg[pairs[:, 0]], disp, interp="nearest").numpy()[:, 0]
    out = {"dice_before": base["dice_before"], "dice_all": base["dice_after"],
           "folding_pct": base["folding_pct"]}
    for name, subset in (("supervised", supervised), ("held_out", held_out)):
        before = [subset_dice(labels[j], labels[i], labels[i], subset) for i, j in pairs]
        after = [subset_dice(labels[j], moved[k], labels[i], subset) for k, (i, j) in enumerate(pairs)]
        out[f"dice_{name}_before"] = float(np.nanmean(before))
        out[f"dice_{name}"] = float(np.nanmean(after))
    return out


def run_training(name: str, args: argparse.Namespace, data: dict[str, np.ndarray],
                 supervised: list[int]) -> list[dict[str, Any]]:
    images = np.asarray(data["train_images"], dtype=np.float32)
    segs = np.asarray(data["train_labels"]) if name == "semi" else None
    epochs = max(1, args.steps // args.steps_per_epoch)
    dataset = ScanToScanDataset(images, pairs_per_epoch=args.steps_per_epoch * args.batch_size,
                                seed=args.seed, segs=segs)
    val_pairs = brain2d.val_pairs(len(data["val_images"]), 10, seed=1)

    def val_fn(model: torch.nn.Module) -> dict[str, float]:
        r = brain2d.evaluate_brain2d(model, data["val_images"], data["val_labels"], val_pairs,
                                     timing=False)
        return {"val_dice": r["dice_after"]}

    torch.manual_seed(args.seed)
    model = brain2d.make_model()
    losses: list[Any] = ["mse", "grad"]
    weights = [1.0, args.lambda_]
    extra: dict[str, Any] = {}
    if name == "semi":
        losses.append("dice")
        weights.append(args.seg_weight)
        extra = {"seg_labels": supervised, "seg_downsize": args.seg_downsize}
    out = Path(args.out) / name
    if (out / CHECKPOINT_NAME).is_file() and not args.resume:
        raise SystemExit(f"{out / CHECKPOINT_NAME} exists: pass --resume to continue it")
    print(f"[{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC] {name}: {epochs} epochs x "
          f"{args.steps_per_epoch} steps, batch {args.batch_size}, lr {args.lr}, losses {losses} "
          f"weights {weights}", flush=True)
    tic = time.perf_counter()
    history = train(model, dataset, losses=losses, loss_weights=weights, epochs=epochs,
                    steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr,
                    device="cpu", seed=args.seed, out_dir=out, checkpoint_every=1, resume=True,
                    progress=False, val_fn=val_fn, reg_on="disp",
                    metadata={"data": brain2d.DATA_CREDIT, "run": name,
                              "supervised_labels": supervised if name == "semi" else None},
                    **extra)
    print(f"{name}: {time.perf_counter() - tic:.0f} s this session", flush=True)
    return history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/semisupervised2d")
    p.add_argument("--data", default=None, help="ixi2d.npz (default $VOXREG_IXI2D or shared)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per model")
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.01)
    p.add_argument("--seg-weight", type=float, default=0.1, help="W of the Dice term")
    p.add_argument("--seg-downsize", type=int, default=1)
    p.add_argument("--label-seed", type=int, default=0, help="seed of the supervised/held-out split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--only", choices=RUNS, default=None, help="train one of the two runs only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = brain2d.load_ixi2d(args.data)
    supervised, held_out = split_labels(data["train_labels"], args.label_seed)
    print(f"{len(supervised)} supervised labels, {len(held_out)} held out", flush=True)
    if not args.eval_only:
        for name in RUNS if args.only is None else (args.only,):
            run_training(name, args, data, supervised)
    pairs = brain2d.val_pairs(len(data["val_images"]), args.pairs, seed=0)
    results: dict[str, Any] = {"supervised_labels": supervised, "held_out_labels": held_out,
                               "pairs": len(pairs)}
    for name in RUNS:
        path = Path(args.out) / name / CHECKPOINT_NAME
        if not path.is_file():
            print(f"no {path}: skipped", file=sys.stderr)
            continue
        ckpt = load_checkpoint(path)
        result = score(ckpt.model.eval(), data, pairs, supervised, held_out)
        result["steps"] = int(ckpt.step or 0)
        result["train_seconds"] = round(sum(r.get("seconds", 0) for r in ckpt.history or []), 1)
        result["settings"] = (ckpt.metadata or {}).get("training", {})
        results[name] = result
    lines = [f"ixi2d axial validation, {len(pairs)} pairs; Dice over labels present in both slices "
             f"({len(supervised)} supervised labels, {len(held_out)} held out of training)", "",
             "| model | steps | Dice all | Dice supervised labels | Dice held-out labels | "
             "% folding |", "|---|---:|---:|---:|---:|---:|"]
    first = next((results[n] for n in RUNS if n in results), None)
    if first is not None:
        lines.append(f"| no registration | - | {first['dice_before']:.3f} | "
                     f"{first['dice_supervised_before']:.3f} | {first['dice_held_out_before']:.3f} | 0 |")
    for name in RUNS:
        if name in results:
            r = results[name]
            label = name if name == "unsupervised" else f"semi (W = {args.seg_weight})"
            lines.append(f"| {label} | {r['steps']} | {r['dice_all']:.3f} | {r['dice_supervised']:.3f} "
                         f"| {r['dice_held_out']:.3f} | {r['folding_pct']:.3f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "semisupervised2d.json").write_text(json.dumps(results, indent=1))
    (out / "semisupervised2d.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
