"""SynthMorph in 3D: train a VxmDense on synthetic volumes only, then register real IXI brains.

As ``examples/synth2d.py``, in 3D: every training pair is a random label map
(:mod:`voxreg.data.synthesis`: argmax of smooth noise, randomly deformed) warped twice, each side
given its own random contrast; the loss is Dice between the warped moving labels and the fixed
labels plus ``lambda * Grad("l2")`` on the velocity (Hoffmann et al. 2021). No real image or
label map is seen in training, and no image is ever a target. The model is
:func:`voxreg.apps.brain3d.make_model` with ``int_steps=7, int_downsize=2`` (the architecture of
``brain3d-diff``, one direction) built for the IXI grid 96x112x96; it is fully convolutional, so
it trains on synthetic volumes of ``--crop`` voxels (the same 2 mm scale: blobs and deformations
are set in voxels) and registers full volumes.

Two stages, because Dice-only training from scratch did not start in 3D on this CPU: with
VoxelMorph's flow-head initialisation (or a larger one, 1e-2), 3D runs of batch 1-3 on 48^3-64^3
crops kept the field at zero for 400-500 steps (one escape with ``--lambda 0`` diverged), where
a 2D run of batch 8 leaves that plateau after about 100 steps. So:

1. ``pretrain2d``: the same architecture in 2D on synthetic 64x64 slices, the same loss (10
   minutes on one core: held-out synthetic Dice 0.676 -> 0.77).
2. ``train --inflate-from``: the 2D weights inflated to 3D (:func:`voxreg.nn.networks.inflate_weights`,
   each 3x3 kernel repeated over 3 slices and divided by 3; the new axis's flow channel starts at
   zero), then Dice-only training on 3D synthetic crops. It improves from its first epoch.

It is scored on the 20 IXI validation pairs of ``benchmarks/bench_accuracy.py`` (seed 0): label
Dice with no registration, with this model and with ``brain3d`` (trained on the real images with
MSE), each on same-contrast pairs and with the moving volume intensity-inverted inside the brain
(:func:`voxreg.data.synthesis.invert_contrast`).

    python examples/synth3d.py --run runs/synth3d-2d pretrain2d --time-budget 600
    python examples/synth3d.py --threads 2 train \
        --inflate-from runs/synth3d-2d/checkpoint.safetensors --crop 48 --batch-size 2 \
        --time-budget 2700
    # score the run; --ship saves it as src/voxreg/models/synth3d.safetensors when it clearly
    # beats no registration
    python examples/synth3d.py evaluate --ship

The run folders (``runs/synth3d-2d``, ``runs/synth3d``) hold ``checkpoint.safetensors`` (every
epoch; ``--resume`` continues), ``history.csv`` (with Dice on held-out synthetic pairs and, for
monitoring only, on 3 real validation pairs; no checkpoint is selected on them), ``loss.png``,
``evaluation.json`` and ``evaluation.md``.

Training data: synthetic only. Evaluation data: IXI (CC BY-SA 3.0) with DLMUSE labels
(CBICA/NiChart); see ``voxreg.apps.brain3d.DATA_CREDIT``.
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

import voxreg
from voxreg.apps import brain3d
from voxreg.checkpoint import MODELS_DIR, load_checkpoint, save_model, warm_start
from voxreg.data.synthesis import (
    ImageSynthesis,
    LabelSynthesis,
    SynthPairDataset,
    invert_contrast,
)
from voxreg.evaluation import synthetic_dice
from voxreg.nn.networks import VxmDense
from voxreg.nn.weights import inflate_weights
from voxreg.training import train
from voxreg.training.engine import CHECKPOINT_NAME

DEFAULT_RUN = "runs/synth3d"
SHIPPED = "synth3d"
SYNTH_VAL_SEED = 10_000  # held-out synthetic pairs: a seed the training never uses


def _now() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def label_options(args: argparse.Namespace) -> LabelSynthesis:
    return LabelSynthesis(num_labels=args.num_labels, label_spacing=args.blob,
                          warp_std=args.warp, warp_spacing=args.warp_spacing)


def cmd_train(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    crop = tuple(int(s) for s in args.crop.split(","))
    if len(crop) == 1:
        crop = crop * 3
    print(f"[{_now()}] train: run {run}, crop {crop}, lr {args.lr}, lambda {args.lambda_}, "
          f"batch {args.batch_size}, {args.steps_per_epoch} steps/epoch, budget "
          f"{args.time_budget} s, threads {args.threads}, resume {args.resume}", flush=True)
    if (run / CHECKPOINT_NAME).is_file() and not args.resume:
        print(f"{run / CHECKPOINT_NAME} exists: pass --resume to continue it", file=sys.stderr)
        return 2
    opts = label_options(args)
    dataset = SynthPairDataset(crop, pairs_per_epoch=args.steps_per_epoch * args.batch_size,
                               seed=args.seed, label_options=opts,
                               image_options=ImageSynthesis(same_contrast=args.same_contrast))
    synth_val = SynthPairDataset(crop, pairs_per_epoch=4, seed=SYNTH_VAL_SEED, label_options=opts)
    val = brain3d.load_ixi("val", args.data)
    real_pairs = brain3d.val_pairs(len(val["images"]), 3, seed=1)

    def val_fn(model: torch.nn.Module) -> dict[str, float]:
        _, synth_after = synthetic_dice(model, synth_val, batch_size=1)
        real = brain3d.evaluate_brain3d(model, real_pairs, val["images"], val["labels"])
        return {"val_synth_dice": synth_after, "val_real_dice": real["dice_after"]}

    torch.manual_seed(args.seed)
    model = brain3d.make_model(int_steps=args.int_steps, int_downsize=2)
    if args.flow_init_std is not None:  # a fresh run only: resuming loads the checkpoint's
        with torch.no_grad():
            model.flow.weight.normal_(0.0, args.flow_init_std)
    if not (run / CHECKPOINT_NAME).is_file():
        if args.init_from is not None:
            copied = warm_start(model, args.init_from)
            print(f"warm start: {copied} tensors from {args.init_from}", flush=True)
        if args.inflate_from is not None:
            copied = inflate_weights(model, voxreg.load_model(args.inflate_from))
            print(f"inflated {copied} tensors of the 2D model {args.inflate_from}", flush=True)
    tic = time.perf_counter()
    history = train(
        model, dataset, losses=[None, "grad", "dice"], loss_weights=[0.0, args.lambda_, 1.0],
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        lr=args.lr, device="cpu", seed=args.seed, out_dir=run, checkpoint_every=1,
        resume=True, progress=False, val_fn=val_fn, verbose=True,
        seg_downsize=args.seg_downsize, time_budget=args.time_budget,
        metadata={"synth": dataset.settings(), "lambda": args.lambda_, "crop": list(crop),
                  "flow_init_std": args.flow_init_std,
                  "init_from": args.init_from, "inflate_from": args.inflate_from,
                  "data": "synthetic label maps and images only"},
    )
    last = history[-1]
    print(f"[{_now()}] stopped at epoch {last['epoch']}, step {last['step']}, "
          f"{time.perf_counter() - tic:.0f} s this session", flush=True)
    return 0


def cmd_pretrain2d(args: argparse.Namespace) -> int:
    """The 2D stage: the same architecture in 2D, trained the same way (Dice on synthetic label
    maps only) on synthetic slices, whose weights ``train --inflate-from`` inflates to 3D."""
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    shape = (args.size, args.size)
    print(f"[{_now()}] pretrain2d: run {run}, shape {shape}, lr {args.lr}, lambda "
          f"{args.lambda_}, batch {args.batch_size}, budget {args.time_budget} s", flush=True)
    opts = label_options(args)
    dataset = SynthPairDataset(shape, pairs_per_epoch=args.steps_per_epoch * args.batch_size,
                               seed=args.seed, label_options=opts)
    synth_val = SynthPairDataset(shape, pairs_per_epoch=16, seed=SYNTH_VAL_SEED,
                                 label_options=opts)
    torch.manual_seed(args.seed)
    model = VxmDense(shape, nb_features=brain3d.FEATURES, int_steps=args.int_steps,
                     int_downsize=2)
    if args.flow_init_std is not None:
        with torch.no_grad():
            model.flow.weight.normal_(0.0, args.flow_init_std)
    history = train(
        model, dataset, losses=[None, "grad", "dice"], loss_weights=[0.0, args.lambda_, 1.0],
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        lr=args.lr, device="cpu", seed=args.seed, out_dir=run, checkpoint_every=1, resume=True,
        progress=False, verbose=True, time_budget=args.time_budget,
        val_fn=lambda m: {"val_synth_dice": synthetic_dice(m, synth_val)[1]},
        metadata={"synth": dataset.settings(), "lambda": args.lambda_,
                  "data": "synthetic label maps and images only (2D stage of synth3d)"},
    )
    print(f"[{_now()}] stopped at epoch {history[-1]['epoch']}, step {history[-1]['step']}",
          flush=True)
    return 0


def evaluate(model: torch.nn.Module, val: dict[str, np.ndarray], pairs: np.ndarray
             ) -> dict[str, Any]:
    """Dice of ``model`` on same-contrast pairs and with the moving volume inverted."""
    images, labels = val["images"], val["labels"]
    same = brain3d.evaluate_brain3d(model, pairs, images, labels)
    n = len(images)
    both = np.concatenate([images, invert_contrast(images, labels)])
    inv_pairs = np.stack([pairs[:, 0] + n, pairs[:, 1]], axis=1)
    inv = brain3d.evaluate_brain3d(model, inv_pairs, both, np.concatenate([labels, labels]))
    return {"same": same, "inverted": inv}


def cmd_evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    val = brain3d.load_ixi("val", args.data)
    pairs = brain3d.val_pairs(len(val["images"]), args.pairs, seed=args.pair_seed)
    ckpt = None
    if args.model is None:
        ckpt = load_checkpoint(Path(args.run) / CHECKPOINT_NAME)
        model = ckpt.model.eval()
    else:
        model = voxreg.load_model(args.model).eval()
    results: dict[str, Any] = {"date": _now(), "synth": evaluate(model, val, pairs),
                               "brain3d": evaluate(voxreg.load_model("brain3d").eval(), val,
                                                   pairs)}
    if ckpt is not None:
        meta = ckpt.metadata or {}
        settings = meta.get("synth", {})
        synth_val = SynthPairDataset(tuple(meta.get("crop", brain3d.INSHAPE)), pairs_per_epoch=8,
                                     seed=SYNTH_VAL_SEED,
                                     label_options=settings.get("label_options"))
        results["synthetic_pairs"] = dict(zip(("dice_before", "dice_after"),
                                              synthetic_dice(model, synth_val, batch_size=1)))
        results["step"], results["epoch"] = int(ckpt.step or 0), int(ckpt.epoch or 0)
    s, b = results["synth"], results["brain3d"]
    gap = s["inverted"]["dice_after"] - s["same"]["dice_after"]
    lines = [
        f"IXI 3D validation, {len(pairs)} pairs (seed {args.pair_seed}); Dice over the labels "
        "present in both volumes; s / pair: forward pass, batch 1, "
        f"{torch.get_num_threads()} thread(s)",
        "",
        "| model | trained on | Dice same contrast | Dice moving inverted | % folding | s / pair |",
        "|---|---|---:|---:|---:|---:|",
        f"| no registration | - | {s['same']['dice_before']:.3f} | "
        f"{s['inverted']['dice_before']:.3f} | 0 | - |",
        f"| synth3d | synthetic only | {s['same']['dice_after']:.3f} | "
        f"{s['inverted']['dice_after']:.3f} | {s['same']['folding_pct']:.3f} | "
        f"{s['same']['seconds_per_pair']:.2f} |",
        f"| brain3d | real T1 (MSE) | {b['same']['dice_after']:.3f} | "
        f"{b['inverted']['dice_after']:.3f} | {b['same']['folding_pct']:.3f} | "
        f"{b['same']['seconds_per_pair']:.2f} |",
        "",
        f"synth3d: inverted minus same contrast = {gap:+.4f} Dice",
    ]
    if "synthetic_pairs" in results:
        sp = results["synthetic_pairs"]
        lines.append(f"held-out synthetic pairs: Dice {sp['dice_before']:.3f} -> "
                     f"{sp['dice_after']:.3f}")
    table = "\n".join(lines)
    print(table)
    out = Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(results, indent=1))
    (out / "evaluation.md").write_text(table + "\n")
    if args.ship:
        if ckpt is None:
            print("--ship needs the run's checkpoint (no --model)", file=sys.stderr)
            return 2
        gain = s["same"]["dice_after"] - s["same"]["dice_before"]
        if gain < args.min_gain:
            print(f"not shipped: Dice gain over no registration {gain:.3f} < {args.min_gain}")
            return 1
        meta = ckpt.metadata or {}
        training = meta.get("training", {})
        ship_meta = {
            "description": ("3D SynthMorph-style VxmDense (diffeomorphic): trained on synthetic "
                            "label maps and random-contrast volumes only, Dice + lambda * "
                            "Grad('l2'); voxreg examples/synth3d.py"),
            "data": ("trained on synthetic data only (no real image or label map); evaluated on "
                     "IXI: " + brain3d.DATA_CREDIT),
            "synth": meta.get("synth"), "lambda": meta.get("lambda"), "crop": meta.get("crop"),
            "losses": ["dice (warped one-hot labels)", "grad l2 (velocity)"],
            "lr": training.get("lr"), "batch_size": training.get("batch_size"),
            "optimizer": "Adam", "steps": int(ckpt.step or 0), "epochs": int(ckpt.epoch or 0),
            "train_seconds": round(sum(r.get("seconds", 0) for r in ckpt.history or []), 1),
            "input": "volumes in [0, 1], any contrast; 96x112x96 IXI grid at 2 mm (other sizes "
                     "divisible by 16 work)",
            "normalize": "minmax",
            "val_pairs": len(pairs), "val_pair_seed": args.pair_seed,
            "val_dice_before": round(s["same"]["dice_before"], 4),
            "val_dice_after": round(s["same"]["dice_after"], 4),
            "val_dice_after_moving_inverted": round(s["inverted"]["dice_after"], 4),
            "val_folding_pct": round(s["same"]["folding_pct"], 4),
            "brain3d_val_dice": round(b["same"]["dice_after"], 4),
        }
        path = save_model(ckpt.model, MODELS_DIR / f"{SHIPPED}.safetensors", metadata=ship_meta,
                          step=int(ckpt.step or 0), epoch=int(ckpt.epoch or 0))
        print(f"shipped {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=DEFAULT_RUN, help=f"run folder (default {DEFAULT_RUN})")
    p.add_argument("--data", default=None, help="the ixi/ folder (default $VOXREG_IXI or shared)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train or continue the run")
    p2 = sub.add_parser("pretrain2d", help="the 2D stage (same architecture, synthetic slices)")
    p2.add_argument("--size", type=int, default=64, help="slice size (voxels, square)")
    p2.add_argument("--steps-per-epoch", type=int, default=100)
    p2.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--steps-per-epoch", type=int, default=50)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--crop", default="64", help="training volume shape: N or D,H,W (voxels)")
    t.add_argument("--inflate-from", default=None,
                   help="a fresh run starts from this 2D model (pretrain2d's), inflated to 3D")
    for q in (t, p2):
        _common_train_options(q)
    e = sub.add_parser("evaluate", help="score the run (or --model) on IXI validation pairs")
    e.add_argument("--model", default=None, help="a model file or shipped name instead of the run")
    e.add_argument("--pairs", type=int, default=20, help="validation pairs")
    e.add_argument("--pair-seed", type=int, default=0)
    e.add_argument("--ship", action="store_true",
                   help=f"save the run as src/voxreg/models/{SHIPPED}.safetensors")
    e.add_argument("--min-gain", type=float, default=0.03,
                   help="least Dice gain over no registration for --ship")
    return p


def _common_train_options(t: argparse.ArgumentParser) -> None:
    t.add_argument("--epochs", type=int, default=100000, help="most epochs in total")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lambda", dest="lambda_", type=float, default=0.1,
                   help="weight of Grad('l2') on the velocity")
    t.add_argument("--num-labels", type=int, default=16, help="classes per synthetic label map")
    t.add_argument("--blob", type=float, default=12.0, help="label blob size (noise node spacing)")
    t.add_argument("--warp", type=float, default=4.0, help="max std of each side's velocity")
    t.add_argument("--warp-spacing", type=float, default=12.0, help="node spacing of the velocity")
    t.add_argument("--same-contrast", type=float, default=0.0,
                   help="probability that both sides share one contrast")
    t.add_argument("--seg-downsize", type=int, default=1, help="Dice on a coarser grid")
    t.add_argument("--int-steps", type=int, default=7)
    t.add_argument("--flow-init-std", type=float, default=1e-2,
                   help="std of the flow head's initial weights (VoxelMorph: 1e-5, which "
                        "left Dice-only training at zero flow for 200+ steps of batch 1)")
    t.add_argument("--init-from", default=None,
                   help="a fresh run starts from this model's weights (name and shape match)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    t.add_argument("--time-budget", type=float, default=None,
                   help="seconds; no new epoch once the next would pass it")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"train": cmd_train, "pretrain2d": cmd_pretrain2d,
            "evaluate": cmd_evaluate}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
