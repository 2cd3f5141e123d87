"""3D brain registration on IXI volumes: train, evaluate and draw a first VxmDense model on CPU.

The seed's part 3: ``VxmDense(inshape=(96, 112, 96), nb_features=[[16, 32, 32, 32],
[32, 32, 32, 32, 32, 16, 16]], int_steps=0)`` trained subject-to-subject on the 121 IXI training
volumes with ``MSE + 0.01 * Grad("l2")``, Adam, batch 1. The run folder (default
``runs/brain3d``) holds ``checkpoint.safetensors`` (written after every epoch), ``history.csv``,
``loss.png`` and ``train.log``; ``train --resume`` continues it exactly where it stopped.

    # train (or continue) until 13:05 UTC, in the background
    nohup python examples/brain3d.py train --resume --stop-at 13:05 \\
        >> runs/brain3d/train.log 2>&1 &
    # score the last checkpoint on 10 validation pairs; --ship saves it as the shipped
    # model (src/voxreg/models/brain3d.safetensors) when it beats no registration
    python examples/brain3d.py evaluate --pairs 10 --ship --name brain3d
    # the diffeomorphic, bidirectional model, started from the plain one's weights
    python examples/brain3d.py --run runs/brain3d-diff train --int-steps 7 --bidir \
        --init-from runs/brain3d/checkpoint.safetensors --stop-at 15:40
    python examples/brain3d.py --run runs/brain3d-diff evaluate --ship --name brain3d-diff
    # mid-slice pictures of one validation pair
    python examples/brain3d.py figures

Data: IXI (CC BY-SA 3.0) with DLMUSE labels (CBICA/NiChart); see ``voxreg.apps.brain3d.DATA_CREDIT``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

from voxreg.apps import brain3d
from voxreg.checkpoint import MODELS_DIR, load_checkpoint, save_model

DEFAULT_RUN = "runs/brain3d"


def parse_stop_at(text: str | None) -> float | None:
    """``"HH:MM"`` (UTC, today; tomorrow if already past) or seconds since the epoch."""
    if text is None:
        return None
    if ":" not in text:
        return float(text)
    hour, minute = (int(v) for v in text.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    when = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if when <= now:
        when += dt.timedelta(days=1)
    return when.timestamp()


def cmd_train(args: argparse.Namespace) -> int:
    print(f"[{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC] train: run {args.run}, "
          f"lr {args.lr}, lambda {args.lambda_}, {args.steps_per_epoch} steps/epoch, "
          f"up to {args.epochs} epochs, threads {args.threads}, resume {args.resume}", flush=True)
    _, history = brain3d.train_brain3d(
        args.run, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, lr=args.lr,
        lambda_=args.lambda_, seed=args.seed, resume=args.resume, time_budget=args.time_budget,
        stop_at=parse_stop_at(args.stop_at), threads=args.threads, data=args.data,
        int_steps=args.int_steps, int_downsize=args.int_downsize, bidir=args.bidir,
        init_from=args.init_from)
    if history:
        last = history[-1]
        secs = sum(r["seconds"] for r in history)
        print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S} UTC] done: epoch {last['epoch']}, "
              f"step {last['step']}, loss {last['loss']:.5g}, {secs / max(last['step'], 1):.2f} "
              "s/step over the run", flush=True)
    return 0


def _load_run_model(run: str):
    ckpt = load_checkpoint(Path(run) / "checkpoint.safetensors")
    ckpt.model.eval()
    return ckpt


def cmd_evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    ckpt = _load_run_model(args.run) if args.model is None else None
    model = ckpt.model if ckpt is not None else __import__("voxreg").load_model(args.model)
    result = brain3d.evaluate_brain3d(model, args.pairs, seed=args.pair_seed, data=args.data)
    if ckpt is not None:
        result["step"] = int(ckpt.step or 0)
        result["epoch"] = int(ckpt.epoch or 0)
    table = brain3d.summary_table(result)
    print(table)
    print(f"seconds/pair {result['seconds_per_pair']:.2f}, max |disp| {result['max_disp']:.2f} vx")
    if "inverse_residual" in result:
        print(f"forward o inverse residual: {result['inverse_residual']:.4f} voxels (mean)")
    out = Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result, indent=1))
    (out / "evaluation.md").write_text(table + "\n")
    if args.ship:
        if ckpt is None:
            print("--ship needs the run's checkpoint (no --model)", file=sys.stderr)
            return 2
        if args.name is None:
            print("--ship needs --name (the shipped model's name)", file=sys.stderr)
            return 2
        if not result["dice_after"] > result["dice_before"]:
            print("not shipped: Dice after registration does not beat no registration")
            return 1
        settings = (ckpt.metadata or {}).get("training", {})
        config = ckpt.model.config
        steps = int(ckpt.step or 0)
        meta = {
            "data": brain3d.DATA_CREDIT,
            "task": "IXI T1 subject-to-subject, 96x112x96 at 2 mm, affinely aligned to MNI152",
            "losses": (["mse (both directions)"] if config.get("bidir") else ["mse"])
            + ["grad l2" + (" on the velocity" if config.get("int_steps") else "")],
            "lambda": (ckpt.metadata or {}).get("lambda"),
            "init_from": (ckpt.metadata or {}).get("init_from"),
            "lr": settings.get("lr"), "batch_size": settings.get("batch_size"),
            "optimizer": "Adam", "steps": steps, "epochs": int(ckpt.epoch or 0),
            "val_pairs": len(result["pairs"]), "pair_seed": args.pair_seed,
            "dice_before_affine": round(result["dice_before"], 4),
            "dice_after": round(result["dice_after"], 4),
            "folding_pct": round(result["folding_pct"], 4),
            "seconds_per_pair_cpu": round(result["seconds_per_pair"], 3),
            **({"inverse_residual_vox": round(result["inverse_residual"], 4)}
               if "inverse_residual" in result else {}),
            "input": "images in [0, 1] (uint8 / 255, or --normalize minmax)",
            "normalize": "minmax",
            "note": (f"trained {steps} steps on 2 CPU cores with examples/brain3d.py "
                     f"(run {args.run}); more steps: train --resume"),
        }
        path = save_model(ckpt.model, MODELS_DIR / f"{args.name}.safetensors", metadata=meta,
                          step=steps, epoch=int(ckpt.epoch or 0))
        print(f"shipped {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.model is None:
        model = _load_run_model(args.run).model
    else:
        model = __import__("voxreg").load_model(args.model)
    ids = brain3d.subject_ids("val", args.data)
    pair = brain3d.val_pairs(len(ids), 1, seed=args.pair_seed)[0]
    val = brain3d.load_ixi("val", args.data, ids=[ids[pair[0]], ids[pair[1]]])
    paths = brain3d.figures(model, val["images"][0], val["images"][1], val["labels"][0],
                            args.run)
    for p in paths:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=DEFAULT_RUN, help="run folder (default runs/brain3d)")
    p.add_argument("--data", default=None, help="the ixi/ folder (default $VOXREG_IXI or shared)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train or continue the run")
    t.add_argument("--epochs", type=int, default=100000, help="most epochs in total")
    t.add_argument("--steps-per-epoch", type=int, default=25,
                   help="steps between checkpoints (keep it when resuming)")
    t.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (VoxelMorph: 1e-4 over far longer training)")
    t.add_argument("--lambda", dest="lambda_", type=float, default=0.01, help="Grad l2 weight")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    t.add_argument("--time-budget", type=float, default=None, help="seconds of training")
    t.add_argument("--stop-at", default=None,
                   help="UTC 'HH:MM' (or epoch seconds): start no epoch that would end after it")
    t.add_argument("--int-steps", type=int, default=0,
                   help="scaling-and-squaring steps (0: plain displacement model, the seed's)")
    t.add_argument("--int-downsize", type=int, default=2, help="velocity resolution divisor")
    t.add_argument("--bidir", action="store_true", help="bidirectional image loss")
    t.add_argument("--init-from", default=None,
                   help="start a new run from this model's matching weights (path or name)")
    t.set_defaults(func=cmd_train)
    for name, func, helptext in (("evaluate", cmd_evaluate, "score the run on validation pairs"),
                                 ("figures", cmd_figures, "mid-slice pictures of a val pair")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--model", default=None,
                       help="a model file or shipped name instead of the run's checkpoint")
        s.add_argument("--pairs", type=int, default=10, help="validation pairs")
        s.add_argument("--pair-seed", type=int, default=0)
        if name == "evaluate":
            s.add_argument("--ship", action="store_true",
                           help="save as src/voxreg/models/NAME.safetensors if it beats "
                                "no registration")
            s.add_argument("--name", default=None,
                           help="the shipped model's name with --ship (brain3d, brain3d-diff)")
        s.set_defaults(func=func)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
