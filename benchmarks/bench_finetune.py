"""Instance-specific optimisation: Dice and seconds per pair against the number of steps N.

For each N in ``--steps`` (default 0, 25, 50, 100, 200), every validation pair is registered by
:func:`voxreg.registration.finetune` (N = 0: the network's prediction alone) with the early stop
off, so that N is the number of steps actually taken; one more row uses the default early stop
(``tol=1e-3`` over ``window=10`` steps) with at most the default N, and reports the mean number of
steps it took. Dice is the mean over the non-zero labels present in both label maps (VoxelMorph's
rule, :func:`voxreg.metrics.mean_dice_present`) after warping the moving labels with
nearest-neighbour interpolation; seconds per pair cover the network's forward pass, the
optimisation and the final warp (one untimed warm-up call first).

* 2D: shipped ``brain2d-smooth`` on ``--pairs2d`` validation pairs of ``ixi2d.npz``
  (:func:`voxreg.apps.brain2d.val_pairs`), and, for the choice of what to optimise, the network's
  weights (VoxelMorph's instance-specific optimisation, ``optimize="weights"``, lr 1e-4) for
  ``--weights-steps`` on the first ``--weights-pairs`` of them.
* 3D: shipped ``brain3d`` on ``--pairs3d`` validation pairs of ``ixi/``
  (:func:`voxreg.apps.brain3d.val_pairs`); ``--no-3d`` skips it.

``--threads`` defaults to 1 (the machine may be busy with a training run: say so with ``--note``).
Results go to ``--json`` (default ``benchmarks/results/bench_finetune.json``).

    .venv/bin/python benchmarks/bench_finetune.py --note "brain3d training running on 2 cores"
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_info, format_table, setup_threads, write_json  # noqa: E402

import voxreg  # noqa: E402
from voxreg import transforms as T  # noqa: E402
from voxreg.apps import brain2d, brain3d  # noqa: E402
from voxreg.metrics import mean_dice_present  # noqa: E402
from voxreg.registration import DEFAULT_FINETUNE_STEPS, finetune  # noqa: E402


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _score(moving_labels: np.ndarray, fixed_labels: np.ndarray, disp: np.ndarray) -> tuple[float, float]:
    """Dice after warping the moving labels by ``disp``, and % folding voxels."""
    disp_t = torch.from_numpy(np.asarray(disp, dtype=np.float32))[None]
    seg = torch.from_numpy(moving_labels.astype(np.int64))[None, None]
    moved = T.warp(seg, disp_t, interp="nearest")[0, 0].numpy()
    dice = mean_dice_present(fixed_labels, moved, moving_labels)
    return dice, float(T.folding_fraction(disp_t).reshape(-1)[0]) * 100


def run_rows(model, images, labels, pairs, settings: list[dict[str, Any]], label: str
             ) -> list[dict[str, Any]]:
    """One row per setting: mean Dice, seconds per pair, folding, steps, losses over ``pairs``."""
    i, j = pairs[0]
    finetune(model, images[i], images[j], steps=2, tol=None, progress=False)  # warm-up
    rows = []
    for setting in settings:
        kwargs = {k: v for k, v in setting.items() if k != "name"}
        dice, seconds, folding, steps, initial, final = [], [], [], [], [], []
        for i, j in pairs:
            result = finetune(model, images[i], images[j], progress=False, **kwargs)
            d, f = _score(labels[i], labels[j], result.disp)
            dice.append(d)
            folding.append(f)
            seconds.append(result.seconds_per_pair)
            steps.append(result.steps)
            initial.append(result.initial_loss)
            final.append(result.final_loss)
        row = {
            "data": label, "setting": setting["name"], "optimize": kwargs.get("optimize", "field"),
            "max_steps": kwargs["steps"], "early_stop": kwargs.get("tol") is not None,
            "pairs": len(pairs), "dice": float(np.nanmean(dice)),
            "seconds_per_pair": float(np.mean(seconds)), "folding_pct": float(np.mean(folding)),
            "mean_steps": float(np.mean(steps)), "initial_loss": float(np.mean(initial)),
            "final_loss": float(np.mean(final)), "dice_per_pair": dice,
            "seconds_per_pair_each": seconds, "steps_each": steps,
        }
        rows.append(row)
        print(f"  {label} {setting['name']:>22}: dice {row['dice']:.4f}  "
              f"{row['seconds_per_pair']:.3f} s/pair  folding {row['folding_pct']:.2f}%  "
              f"steps {row['mean_steps']:.0f}", flush=True)
    return rows


def settings_for(steps_list: list[int], lr: float | None, optimize: str = "field",
                 early_stop: bool = True) -> list[dict[str, Any]]:
    out = [{"name": f"{optimize} N={n}", "steps": n, "tol": None, "optimize": optimize, "lr": lr}
           for n in steps_list]
    if early_stop:
        out.append({"name": f"{optimize} N<={DEFAULT_FINETUNE_STEPS} early stop",
                    "steps": DEFAULT_FINETUNE_STEPS, "optimize": optimize, "lr": lr})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="0,25,50,100,200", help="values of N")
    parser.add_argument("--pairs2d", type=int, default=20)
    parser.add_argument("--pairs3d", type=int, default=3)
    parser.add_argument("--weights-steps", default="25,50,100",
                        help="N for optimize='weights' on 2D ('' to skip)")
    parser.add_argument("--weights-pairs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=None, help="field lr (default: finetune's)")
    parser.add_argument("--no-3d", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="pair-drawing seed")
    parser.add_argument("--note", default="", help="conditions worth recording (e.g. a busy CPU)")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results"
                                              / "bench_finetune.json"))
    args = parser.parse_args(argv)

    threads = setup_threads(args.threads)
    steps_list = _int_list(args.steps)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"threads {threads}; N = {steps_list}; {started}")
    rows: list[dict[str, Any]] = []

    data = brain2d.load_ixi2d()
    images, labels = data["val_images"], data["val_labels"]
    pairs = brain2d.val_pairs(len(images), args.pairs2d, args.seed)
    model = voxreg.load_model("brain2d-smooth")
    dice_before = float(np.nanmean([mean_dice_present(labels[j], labels[i]) for i, j in pairs]))
    print(f"2D brain2d-smooth, {len(pairs)} pairs, Dice before registration {dice_before:.4f}")
    rows += run_rows(model, images, labels, pairs, settings_for(steps_list, args.lr), "2d")
    weights_steps = _int_list(args.weights_steps)
    if weights_steps:
        sub = pairs[: args.weights_pairs]
        rows += run_rows(model, images, labels, sub,
                         settings_for([0] + weights_steps, None, "field", False)
                         + settings_for(weights_steps, None, "weights", False), "2d-subset")
    result: dict[str, Any] = {
        "benchmark": "bench_finetune", "started_utc": started, "env": env_info(),
        "note": args.note, "steps": steps_list, "lr": args.lr,
        "default_steps": DEFAULT_FINETUNE_STEPS,
        "data2d": {"model": "brain2d-smooth", "pairs": pairs.tolist(), "dice_before": dice_before},
    }

    if not args.no_3d:
        ids = brain3d.subject_ids("val")
        pairs3 = brain3d.val_pairs(len(ids), args.pairs3d, args.seed)
        used = sorted(set(pairs3.ravel().tolist()))
        val = brain3d.load_ixi("val", ids=[ids[k] for k in used])
        index = {k: n for n, k in enumerate(used)}
        local = np.array([[index[i], index[j]] for i, j in pairs3])
        model3 = voxreg.load_model("brain3d")
        before3 = float(np.nanmean([mean_dice_present(val["labels"][j], val["labels"][i])
                                    for i, j in local]))
        print(f"3D brain3d, {len(local)} pairs, Dice before (affine only) {before3:.4f}")
        tic = time.perf_counter()
        rows += run_rows(model3, val["images"], val["labels"], local,
                         settings_for(steps_list, args.lr), "3d")
        result["data3d"] = {"model": "brain3d", "pairs": pairs3.tolist(),
                            "subjects": [ids[k] for k in used], "dice_before": before3,
                            "seconds": time.perf_counter() - tic}

    result["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    result["rows"] = rows
    print()
    print(format_table(
        ["data", "setting", "pairs", "Dice", "s/pair", "folding %", "steps"],
        [[r["data"], r["setting"], r["pairs"], f"{r['dice']:.4f}", f"{r['seconds_per_pair']:.3f}",
          f"{r['folding_pct']:.2f}", f"{r['mean_steps']:.0f}"] for r in rows], left=2))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
