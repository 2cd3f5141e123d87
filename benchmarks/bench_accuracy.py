"""Accuracy next to ANTs: voxreg's 3D brain models, ANTs SyN and SyNCC, and no registration.

On validation pairs of ``../shared/data/ixi`` (96x112x96 at 2 mm, affinely aligned to MNI152),
every method registers the same ordered pairs ``(moving, fixed)``
(:func:`voxreg.apps.brain3d.val_pairs`); the moving DLMUSE labels are carried onto the fixed grid
(voxreg: nearest; ANTs: ``genericLabel``) and scored with one function,
:func:`voxreg.metrics.mean_dice_present` (mean Dice over the non-zero labels present in both
maps). Folding is the % of voxels with Jacobian determinant <= 0 (voxreg:
:func:`voxreg.transforms.folding_fraction` on the displacement; ANTs:
``ants.create_jacobian_determinant_image`` on its deformable warp). Seconds per pair: voxreg's
forward pass (batch 1, after a warm-up), ANTs' ``ants.registration`` call, both with the same
number of threads, images already in memory.

ANTs runs in its own environment, ``.venv-ants`` (``bash benchmarks/setup_ants_env.sh``), through
``benchmarks/_ants_worker.py``; its results are cached per pair under ``--work`` so an
interrupted run continues and a rerun with another voxreg model does not repeat ANTs.

    python benchmarks/bench_accuracy.py --pairs 20 --models brain3d,brain3d-diff \\
        --syn-pairs 20 --syncc-pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import env_info, setup_threads, write_json  # noqa: E402


def _voxreg_rows(models: list[str], images, labels, pairs, threads: int) -> dict[str, dict]:
    import voxreg
    from voxreg.apps import brain3d

    out = {}
    for name in models:
        model = voxreg.load_model(name, device="cpu")
        setup_threads(threads)
        result = brain3d.evaluate_brain3d(model, pairs, images=images, labels=labels)
        out[f"voxreg {name}"] = {
            "dice": result["dice_after_per_pair"],
            "folding_pct": result["folding_pct_per_pair"],
            "seconds": result["seconds_per_pair"],
            "int_steps": int(model.config.get("int_steps", 0)),
            "steps_trained": (getattr(model, "metadata", None) or {}).get("steps"),
        }
        print(f"voxreg {name}: Dice {np.mean(result['dice_after_per_pair']):.4f}, folding "
              f"{result['folding_pct']:.4f} %, {result['seconds_per_pair']:.3f} s/pair", flush=True)
    return out


def _ants(transform: str, pair_idx, ids, labels, work: Path, python: Path, threads: int
          ) -> dict | None:
    from voxreg.apps import brain3d

    if not python.is_file():
        print(f"skipping ANTs {transform}: no {python} (run benchmarks/setup_ants_env.sh)")
        return None
    out_dir = work / transform
    names = [f"{ids[i]}__{ids[j]}" for i, j in pair_idx]
    job = {
        "transform": transform, "threads": threads, "seed": 2024, "out_dir": str(out_dir),
        "pairs": [{"name": n, "moving": str(brain3d.image_path(ids[i])),
                   "fixed": str(brain3d.image_path(ids[j])),
                   "moving_labels": str(brain3d.label_path(ids[i]))}
                  for n, (i, j) in zip(names, pair_idx)],
    }
    work.mkdir(parents=True, exist_ok=True)
    job_path = work / f"job_{transform}.json"
    job_path.write_text(json.dumps(job, indent=1))
    subprocess.run([str(python), str(ROOT / "benchmarks" / "_ants_worker.py"), str(job_path)],
                   check=True)
    dice, folding, seconds = [], [], []
    for name, (i, j) in zip(names, pair_idx):
        saved = np.load(out_dir / f"{name}.npz")
        dice.append(brain3d.pair_dice(labels[j], saved["moved_labels"], labels[i]))
        folding.append(float(saved["folding_pct"]))
        seconds.append(float(saved["seconds"]))
    row = {"dice": dice, "folding_pct": folding, "seconds": float(np.mean(seconds)),
           "seconds_per_pair": seconds}
    print(f"ANTs {transform}: Dice {np.mean(dice):.4f}, folding {np.mean(folding):.4f} %, "
          f"{np.mean(seconds):.1f} s/pair", flush=True)
    return row


def _table(rows: dict[str, dict], subset: list[int] | None, reference: str | None) -> str:
    """Markdown rows: Dice mean (sd), folding %, seconds per pair, and time vs ``reference``."""
    head = ["| method | pairs | Dice mean (sd) | % folding | s / pair | time vs voxreg |",
            "|---|---|---|---|---|---|"]
    ref_seconds = rows[reference]["seconds"] if reference in rows else None
    lines = []
    for name, row in rows.items():
        dice = np.asarray(row["dice"])
        folding = np.asarray(row["folding_pct"])
        if subset is not None and len(dice) > len(subset):
            dice, folding = dice[subset], folding[subset]
        ratio = (f"{row['seconds'] / ref_seconds:.0f}x" if ref_seconds and row["seconds"]
                 else "-")
        sec = f"{row['seconds']:.2f}" if row["seconds"] else "-"
        lines.append(f"| {name} | {len(dice)} | {dice.mean():.4f} ({dice.std():.4f}) | "
                     f"{folding.mean():.4f} | {sec} | {ratio} |")
    return "\n".join(head + lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=20, help="validation pairs (voxreg, no reg, SyN)")
    p.add_argument("--pair-seed", type=int, default=0)
    p.add_argument("--models", default="brain3d", help="comma-separated voxreg models")
    p.add_argument("--syn-pairs", type=int, default=None, help="pairs for ANTs SyN (default all)")
    p.add_argument("--syncc-pairs", type=int, default=2,
                   help="the first N pairs also with ANTs SyNCC (slow: ~10+ min each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ants-python", default=str(ROOT / ".venv-ants" / "bin" / "python"))
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_accuracy"),
                   help="cache of the ANTs results per pair")
    p.add_argument("--data", default=None, help="the ixi/ folder")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy.json"))
    args = p.parse_args(argv)

    from voxreg.apps import brain3d

    if not (brain3d.data_dir(args.data) / "splits.json").is_file():
        print("no IXI data (../shared/data/ixi or --data): nothing to measure")
        return 0
    setup_threads(args.threads)
    ids = brain3d.subject_ids("val", args.data)
    val = brain3d.load_ixi("val", args.data)
    images, labels = val["images"], val["labels"]
    pairs = brain3d.val_pairs(len(ids), args.pairs, seed=args.pair_seed)
    tic = time.time()
    rows: dict[str, dict] = {"no registration (affine only)": {
        "dice": [brain3d.pair_dice(labels[j], labels[i]) for i, j in pairs],
        "folding_pct": [0.0] * len(pairs), "seconds": 0.0}}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows.update(_voxreg_rows(models, images, labels, pairs, args.threads))
    work, python = Path(args.work), Path(args.ants_python)
    syn_n = len(pairs) if args.syn_pairs is None else min(args.syn_pairs, len(pairs))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    syn = _ants("SyN", pairs[:syn_n], ids, labels, work, python, args.threads) if syn_n else None
    syncc = (_ants("SyNCC", pairs[:args.syncc_pairs], ids, labels, work, python, args.threads)
             if args.syncc_pairs else None)
    reference = f"voxreg {models[0]}" if models else None
    full = dict(rows)
    if syn is not None and syn_n == len(pairs):
        full["ANTs SyN"] = syn
    print(f"\n{len(pairs)} validation pairs (seed {args.pair_seed}), {args.threads} threads\n")
    print(_table(full, None, reference))
    if syncc is not None:
        subset = list(range(args.syncc_pairs))
        few = dict(rows)
        if syn is not None:
            few["ANTs SyN"] = syn
        few["ANTs SyNCC"] = syncc
        print(f"\nthe first {len(subset)} pairs, with SyNCC\n")
        print(_table(few, subset, reference))
    result = {"pairs": pairs.tolist(), "ids": ids, "threads": args.threads,
              "rows": {**rows, **({"ANTs SyN": syn} if syn else {}),
                       **({"ANTs SyNCC": syncc} if syncc else {})},
              "env": env_info(), "wall_seconds": time.time() - tic}
    write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
