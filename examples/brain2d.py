"""2D brain registration on IXI axial slices: train "smooth" and "no smooth" VxmDense models.

The seed's 2D brain section: two ``VxmDense(inshape=(96, 112), int_steps=0)`` models with the
seed's 2D features ``[[32, 32, 32, 32], [32, 32, 32, 32, 32, 16]]`` are trained subject-to-subject
on the 121 axial training slices of ``ixi2d.npz`` with ``MSE + lambda * Grad("l2")``, lambda 0.01
("smooth") and 0 ("no smooth"), Adam, batch 8. Both are then scored on fixed validation pairs
(label Dice before and after, % folding voxels, seconds per pair), and a side-by-side picture
is saved.

    # train both (about 14 minutes each on one CPU core), evaluate, draw
    python examples/brain2d.py --out outputs/brain2d --time-budget 840
    # evaluate the shipped models only
    python examples/brain2d.py --out outputs/brain2d --eval-only
    # retrain and overwrite the shipped models (src/voxreg/models/brain2d-*.safetensors)
    python examples/brain2d.py --out outputs/brain2d --time-budget 840 --ship

Outputs in ``--out``: ``smooth/`` and ``nosmooth/`` (training runs: history.csv, loss.png,
checkpoints), ``brain2d.json`` (all numbers), ``brain2d.md`` (the table) and ``brain2d.png``.

Data: IXI (CC BY-SA 3.0) with DLMUSE labels (CBICA/NiChart); see ``voxreg.apps.brain2d.DATA_CREDIT``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import voxreg
from voxreg.apps import brain2d
from voxreg.checkpoint import MODELS_DIR, load_checkpoint

MODELS = {"smooth": 0.01, "nosmooth": 0.0}
NAMES = {"smooth": "brain2d-smooth", "nosmooth": "brain2d-nosmooth"}


def parse_features(text: str | None):
    """``"32,32,32,32/32,32,32,32,32,16"`` -> ``[[32, 32, 32, 32], [32, 32, 32, 32, 32, 16]]``."""
    if text is None:
        return None
    enc, dec = text.split("/")
    return [[int(v) for v in enc.split(",")], [int(v) for v in dec.split(",")]]


def summarise(history, settings: dict, lam: float) -> dict:
    """What a training run did, for the report and the shipped model's metadata."""
    last = history[-1]
    return {
        "smooth_lambda": lam,
        **{k: settings.get(k) for k in ("lr", "batch_size", "steps_per_epoch", "seed")},
        "epochs": last["epoch"], "steps": last["step"],
        "train_seconds": round(sum(r["seconds"] for r in history), 1),
        "final_loss": last["loss"],
        "optimizer": "Adam", "losses": ["mse", "grad l2"], "loss_weights": [1.0, lam],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/brain2d", help="output folder")
    p.add_argument("--data", default=None, help="ixi2d.npz (default $VOXREG_IXI2D or the shared copy)")
    p.add_argument("--epochs", type=int, default=400, help="most epochs per model")
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (VoxelMorph: 1e-4 over far longer training)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training per model (stops between epochs)")
    p.add_argument("--features", default=None,
                   help="UNet features 'enc/dec', e.g. '32,32,32,32/32,32,32,32,32,16' (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=50, help="validation pairs to score")
    p.add_argument("--pair-seed", type=int, default=0)
    p.add_argument("--figure-pairs", type=int, default=3, help="rows of the picture")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 on a shared machine)")
    p.add_argument("--eval-only", action="store_true", help="score the shipped models, no training")
    p.add_argument("--from-runs", default=None,
                   help="use the finished runs DIR/smooth and DIR/nosmooth instead of training")
    p.add_argument("--ship", action="store_true",
                   help=f"save the trained models as the shipped ones in {MODELS_DIR}")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = brain2d.load_ixi2d(args.data)

    models, training, histories = {}, {}, {}
    for key, lam in MODELS.items():
        if args.eval_only:
            models[key] = voxreg.load_model(NAMES[key], device="cpu")
            training[key] = models[key].metadata.get("training_summary", {})
            continue
        if args.from_runs:
            ckpt = load_checkpoint(Path(args.from_runs) / key / "model.safetensors")
            models[key] = ckpt.model.eval()
            histories[key] = ckpt.history
            training[key] = summarise(ckpt.history, ckpt.metadata.get("training", {}), lam)
            continue
        tic = time.perf_counter()
        model, history = brain2d.train_brain2d(
            out / key, lam, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
            seed=args.seed, time_budget=args.time_budget, lr=args.lr,
            batch_size=args.batch_size, nb_features=parse_features(args.features), data=data,
        )
        models[key] = model
        histories[key] = history
        settings = {"lr": args.lr, "batch_size": args.batch_size,
                    "steps_per_epoch": args.steps_per_epoch, "seed": args.seed}
        training[key] = summarise(history, settings, lam)
        training[key]["wall_seconds_this_call"] = round(time.perf_counter() - tic, 1)

    pairs = brain2d.val_pairs(len(data["val_images"]), args.pairs, args.pair_seed)
    results = {key: brain2d.evaluate_brain2d(m, data["val_images"], data["val_labels"], pairs)
               for key, m in models.items()}
    table = brain2d.summary_table({"smooth (lambda 0.01)": results["smooth"],
                                   "no smooth (lambda 0)": results["nosmooth"]})
    print(table)
    figure = brain2d.compare_figure(models["smooth"], models["nosmooth"], data["val_images"],
                                    pairs[: args.figure_pairs], out / "brain2d.png")

    if args.ship and not args.eval_only:  # trained or --from-runs
        for key, model in models.items():
            r = results[key]
            meta = {
                "description": f"2D IXI axial-slice VxmDense, MSE + {MODELS[key]} * Grad('l2'), "
                               "scan-to-scan (voxreg examples/brain2d.py)",
                "data": brain2d.DATA_CREDIT,
                "smooth_lambda": MODELS[key],
                "training_summary": training[key],
                "val_pairs": len(pairs), "val_pair_seed": args.pair_seed,
                "val_dice_before": r["dice_before"], "val_dice_after": r["dice_after"],
                "val_folding_pct": r["folding_pct"],
            }
            voxreg.save_model(model, MODELS_DIR / f"{NAMES[key]}.safetensors", metadata=meta,
                              epoch=training[key]["epochs"], step=training[key]["steps"],
                              history=histories[key])

    numbers = {
        "training": training,
        "results": results,
        "table": table,
        "figure": str(figure),
    }
    (out / "brain2d.json").write_text(json.dumps(numbers, indent=1))
    (out / "brain2d.md").write_text(table + "\n")
    return numbers


if __name__ == "__main__":
    main()
