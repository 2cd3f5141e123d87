"""Affine registration next to ANTs: voxreg's affine and antspyx ``type_of_transform="Affine"``.

On ``../shared/data/ixi-raw`` (6 unaligned native T1 scans, 120x120x90 at 2 mm, with DLMUSE
labels), every method registers the same **30 ordered pairs** (each subject to each other one,
``(moving, fixed)``). Images are prepared as the data README's preprocessing does: skull-stripped
with ``label > 0``, divided by ``p99_5_in_mask`` (``subjects.csv``) and clipped to [0, 1]; with
``--whole-head`` the skull stays (same scaling, no mask). The moving labels are carried onto the
fixed grid (voxreg: :meth:`voxreg.affine.AffineResult.resample` with ``interp="label"``, the
same rule as ANTs' ``genericLabel``, and with nearest for reference; ANTs: ``genericLabel``)
and scored with one set of functions:

* brain-mask Dice: Dice of ``moved labels > 0`` against ``fixed labels > 0``;
* label Dice: :func:`voxreg.metrics.mean_dice_present` (mean over the non-zero labels present in
  both the fixed and the moving map).

"no registration" carries the labels through the headers alone (:func:`voxreg.io.resample_to`,
nearest): the scanner's physical alignment. Seconds per pair: voxreg's
:func:`voxreg.affine.register_affine` (pyramid, initialisation and optimisation; images in
memory, after one untimed warm-up; torch with ``--threads`` threads, default 1) and ANTs'
``ants.registration`` call (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=--ants-threads``, default 2,
fixed seed), each measured as wall time. Because a shared machine slows both sides by whatever
else runs, CPU seconds are given too: voxreg's process time per pair, and, on the first
``--cpu-pairs`` pairs, ANTs' (``getrusage`` of the ANTs process around ``ants.registration``,
all threads counted), measured in the same run as voxreg's row: when the ANTs registrations
come from the cache of an earlier run, that line is the like-for-like time comparison.

ANTs runs in its own environment, ``.venv-ants`` (``bash benchmarks/setup_ants_env.sh``), through
``benchmarks/_ants_worker.py`` (transform ``Affine``); its results are cached per pair under
``--work`` (default: a folder in the system's temporary directory, never the repository: the
preprocessed images written there are derived from the IXI data), so a rerun with other voxreg
settings does not repeat ANTs.

ITK export check: for the first ``--check-pairs`` pairs (default all) voxreg's transform is
written with :func:`voxreg.affine.save_itk_affine` and applied by ``ants.apply_transforms(fixed,
moving, [file])`` (linear, and ``genericLabel`` for the labels) in ``.venv-ants``; the report
gives the largest absolute difference from voxreg's own resampling (intensities in [0, 1]) and
the share of label voxels that differ (voxreg's ``interp="label"`` against genericLabel: the
same rule, so this checks voxreg's label interpolation too). When every pair is checked, the
row "voxreg affine, labels by ANTs genericLabel" scores voxreg's transforms with ANTs' own label
resampling. For one and the same transform, genericLabel-style interpolation gives about 0.01
more label Dice than nearest (the row "labels nearest" shows it).

    .venv/bin/python benchmarks/bench_affine.py                    # all 30 pairs
    .venv/bin/python benchmarks/bench_affine.py --pairs 6 --loss ncc --levels 4,2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

# the target: Dice within 0.01 of ANTs at >= 5x less time
TARGET_DICE_GAP = 0.01
TARGET_SPEEDUP = 5.0


# --------------------------------------------------------------------------------------------
# ANTs side of the ITK check (runs in .venv-ants: imports neither torch nor voxreg)
# --------------------------------------------------------------------------------------------


def ants_check(job_path: str) -> int:
    """Apply voxreg's ITK files with ``ants.apply_transforms`` (results saved as ``.npy``); then
    time ``ants.registration`` (wall and CPU seconds) on the first ``cpu_pairs`` items."""
    import resource

    job = json.loads(Path(job_path).read_text())
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(job.get("threads", 2)))
    os.environ["ANTS_RANDOM_SEED"] = "2024"
    import ants

    timings = []
    for item in job["items"][: int(job.get("cpu_pairs", 0))]:
        fixed, moving = ants.image_read(item["fixed"]), ants.image_read(item["moving"])
        usage = resource.getrusage(resource.RUSAGE_SELF)
        tic = time.perf_counter()
        ants.registration(fixed=fixed, moving=moving, type_of_transform="Affine",
                          random_seed=2024)
        wall = time.perf_counter() - tic
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        timings.append({"wall_seconds": wall, "cpu_seconds": cpu})
    Path(job["timings_out"]).write_text(json.dumps(timings))
    for item in job["items"]:
        fixed = ants.image_read(item["fixed"])
        for key, interp in (("moving", "linear"), ("moving_labels", "genericLabel")):
            moving = ants.image_read(item[key])
            moved = ants.apply_transforms(fixed=fixed, moving=moving,
                                          transformlist=[item["transform"]], interpolator=interp)
            np.save(item[f"out_{key}"], moved.numpy().astype(np.float32))
    return 0


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def load_subjects(raw: Path, whole_head: bool):
    """``{id: (image Image in [0, 1], labels Image)}`` for the ixi-raw subjects."""
    from voxreg import io

    with open(raw / "subjects.csv", newline="") as handle:
        scale = {row["id"]: float(row["p99_5_in_mask"]) for row in csv.DictReader(handle)}
    out = {}
    for subject in sorted(scale):
        image = io.load_image(raw / "images" / f"{subject}.nii.gz")
        labels = io.load_labels(raw / "labels" / f"{subject}.nii.gz")
        data = np.clip(image.data.astype(np.float32) / scale[subject], 0, 1)
        if not whole_head:
            data = data * (labels.data > 0)
        image.data = data.astype(np.float32)
        out[subject] = (image, labels)
    return out


def scores(fixed_labels: np.ndarray, moved_labels: np.ndarray, moving_labels: np.ndarray):
    from voxreg import metrics

    a, b = moved_labels > 0, fixed_labels > 0
    mask = 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    return float(mask), metrics.mean_dice_present(fixed_labels, moved_labels, moving_labels)


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


def run_none(subjects, pairs):
    from voxreg import io

    rows = []
    for moving, fixed in pairs:
        moved = io.resample_to(subjects[moving][1], subjects[fixed][1], interp="nearest")
        rows.append(scores(subjects[fixed][1].data, moved.data, subjects[moving][1].data))
    return {"mask_dice": [r[0] for r in rows], "label_dice": [r[1] for r in rows],
            "seconds_per_pair": [0.0] * len(rows)}


def run_voxreg(subjects, pairs, options: dict, threads: int, keep: int):
    """voxreg on every pair; returns the row and the first ``keep`` results (for the ITK check)."""
    import torch

    from voxreg.affine import register_affine

    torch.set_num_threads(threads)
    first_moving, first_fixed = pairs[0]
    register_affine(subjects[first_moving][0], subjects[first_fixed][0], **options)  # warm-up
    row = {"mask_dice": [], "label_dice": [], "seconds_per_pair": [], "cpu_seconds_per_pair": [],
           "evaluations": [], "final_loss": []}
    nearest_row = {"mask_dice": [], "label_dice": [], "seconds_per_pair": row["seconds_per_pair"]}
    kept = []
    for index, (moving, fixed) in enumerate(pairs):
        cpu = time.process_time()
        result = register_affine(subjects[moving][0], subjects[fixed][0], **options)
        cpu = time.process_time() - cpu
        for target, interp in ((row, "label"), (nearest_row, "nearest")):
            moved = result.resample(subjects[moving][1], interp=interp).data
            mask, labels = scores(subjects[fixed][1].data, moved, subjects[moving][1].data)
            target["mask_dice"].append(mask)
            target["label_dice"].append(labels)
        row["seconds_per_pair"].append(result.seconds)
        row["cpu_seconds_per_pair"].append(cpu)
        row["evaluations"].append(sum(h["evaluations"] for h in result.history))
        row["final_loss"].append(result.loss)
        if index < keep:
            kept.append(result)
        print(f"voxreg {moving} -> {fixed}: mask {row['mask_dice'][-1]:.4f}, labels "
              f"{row['label_dice'][-1]:.4f} (nearest {nearest_row['label_dice'][-1]:.4f}), "
              f"{result.seconds:.2f} s ({row['evaluations'][-1]} loss evaluations)", flush=True)
    return row, nearest_row, kept


def write_inputs(subjects, folder: Path) -> dict[str, tuple[Path, Path]]:
    from voxreg import io

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for subject, (image, labels) in subjects.items():
        img, seg = folder / f"{subject}_img.nii.gz", folder / f"{subject}_seg.nii.gz"
        if not img.exists():
            io.save_image(img, image.data, like=image)
        if not seg.exists():
            io.save_image(seg, labels.data, like=labels)
        paths[subject] = (img, seg)
    return paths


def run_ants(subjects, pairs, paths, work: Path, python: Path, threads: int):
    out_dir = work / "ants_Affine"
    names = [f"{m}__{f}" for m, f in pairs]
    job = {"transform": "Affine", "threads": threads, "seed": 2024, "out_dir": str(out_dir),
           "pairs": [{"name": n, "moving": str(paths[m][0]), "fixed": str(paths[f][0]),
                      "moving_labels": str(paths[m][1])} for n, (m, f) in zip(names, pairs)]}
    job_path = work / "job_ants_affine.json"
    job_path.write_text(json.dumps(job, indent=1))
    cached = sum((out_dir / f"{name}.npz").exists() for name in names)
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads))
    subprocess.run([str(python), str(BENCH / "_ants_worker.py"), str(job_path)], check=True,
                   env=env)
    row = {"mask_dice": [], "label_dice": [], "seconds_per_pair": [], "cached_pairs": cached}
    if cached:
        print(f"ANTs Affine: {cached} of {len(pairs)} pairs from the cache in {out_dir} (timed in "
              "an earlier run: compare times with the CPU-timed pairs below)")
    for name, (moving, fixed) in zip(names, pairs):
        saved = np.load(out_dir / f"{name}.npz")
        mask, labels = scores(subjects[fixed][1].data, saved["moved_labels"],
                              subjects[moving][1].data)
        row["mask_dice"].append(mask)
        row["label_dice"].append(labels)
        row["seconds_per_pair"].append(float(saved["seconds"]))
    return row


def itk_check(subjects, pairs, kept, paths, work: Path, python: Path, threads: int,
              cpu_pairs: int):
    """Largest |ANTs-applied - voxreg-resampled| over the kept pairs, voxreg's transforms scored
    with ANTs' label interpolation, and ANTs' wall and CPU seconds on ``cpu_pairs`` pairs."""
    folder = work / "itk_check"
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for (moving, fixed), result in zip(pairs, kept):
        stem = folder / f"{moving}__{fixed}"
        transform = result.save_itk(stem.with_suffix(".txt"))
        items.append({"fixed": str(paths[fixed][0]), "moving": str(paths[moving][0]),
                      "moving_labels": str(paths[moving][1]), "transform": str(transform),
                      "out_moving": str(stem) + "_img.npy", "out_moving_labels": str(stem) + "_seg.npy"})
    job_path = folder / "job.json"
    timings_path = folder / "ants_timings.json"
    job_path.write_text(json.dumps({"threads": threads, "items": items, "cpu_pairs": cpu_pairs,
                                    "timings_out": str(timings_path)}, indent=1))
    subprocess.run([str(python), str(Path(__file__).resolve()), "--ants-check", str(job_path)],
                   check=True)
    image_diff, interior_diff, label_mismatch, mask_dice, label_dice = [], [], [], [], []
    for item, (moving, fixed), result in zip(items, pairs, kept):
        ours = result.resample(subjects[moving][0]).data
        theirs = np.load(item["out_moving"])
        image_diff.append(float(np.abs(ours - theirs).max()))
        # ITK and torch treat the last half voxel at the moving grid's faces differently (ITK:
        # outside; torch: blended with the zero padding): compare away from them too
        ndim = result.ndim
        index = np.stack(np.meshgrid(*[np.arange(n) for n in result.fixed_shape],
                                     indexing="ij")).reshape(ndim, -1)
        coords = result.voxel_matrix[:, :ndim] @ index + result.voxel_matrix[:, ndim:]
        upper = np.asarray(result.moving_shape)[:, None] - 2
        interior = ((coords >= 1) & (coords <= upper)).all(0).reshape(result.fixed_shape)
        interior_diff.append(float(np.abs(ours - theirs)[interior].max()))
        ours_seg = result.resample(subjects[moving][1], interp="label").data
        theirs_seg = np.rint(np.load(item["out_moving_labels"])).astype(ours_seg.dtype)
        label_mismatch.append(float((ours_seg != theirs_seg).mean()))
        mask, labels = scores(subjects[fixed][1].data, theirs_seg, subjects[moving][1].data)
        mask_dice.append(mask)
        label_dice.append(labels)
    check = {"pairs": len(items), "max_abs_image_difference": max(image_diff),
             "max_abs_image_difference_interior": max(interior_diff),
             "per_pair_max_abs_image_difference": image_diff,
             "label_voxels_differing_fraction": label_mismatch,
             "ants_timed": json.loads(timings_path.read_text())}
    # voxreg's transforms with ANTs' label interpolation: the same label resampling as ANTs' row
    row = {"mask_dice": mask_dice, "label_dice": label_dice,
           "seconds_per_pair": [r.seconds for r in kept]}
    return check, row


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _mean_sd(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.4f} ({values.std():.4f})"


def table(rows: dict[str, dict]) -> str:
    from _common import format_table

    reference = rows.get("voxreg affine")
    body = []
    for name, row in rows.items():
        seconds = np.asarray(row["seconds_per_pair"])
        ratio = "-"
        if reference is not None and seconds.mean() > 0:
            ratio = f"{seconds.mean() / np.mean(reference['seconds_per_pair']):.1f}x"
        cpu = row.get("cpu_seconds_per_pair")
        body.append([name, len(seconds), _mean_sd(row["mask_dice"]), _mean_sd(row["label_dice"]),
                     f"{seconds.mean():.2f}" if seconds.mean() > 0 else "-",
                     f"{np.median(seconds):.2f}" if seconds.mean() > 0 else "-",
                     f"{np.mean(cpu):.2f}" if cpu else "-", ratio])
    return format_table(["method", "pairs", "brain-mask Dice (sd)", "label Dice (sd)",
                         "s/pair mean", "median", "CPU s/pair", "time vs voxreg"], body)


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=30, help="first N of the 30 ordered pairs")
    p.add_argument("--whole-head", action="store_true", help="keep the skull (no stripping)")
    p.add_argument("--loss", default=None, help="voxreg loss (default: register_affine's)")
    p.add_argument("--levels", type=parse_levels, default=None, help="e.g. 4,2,1")
    p.add_argument("--iterations", type=parse_levels, default=None, help="e.g. 200,100,50")
    p.add_argument("--max-points", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads for voxreg")
    p.add_argument("--ants-threads", type=int, default=2)
    p.add_argument("--no-ants", action="store_true")
    p.add_argument("--check-pairs", type=int, default=None,
                   help="pairs for the ITK export check (default: all; then voxreg's transforms "
                   "are also scored with ANTs' genericLabel label interpolation)")
    p.add_argument("--cpu-pairs", type=int, default=5,
                   help="time ants.registration again on this many pairs, wall and CPU seconds "
                   "(run with the ITK check, so needs --check-pairs >= this)")
    p.add_argument("--ants-python", default=str(ROOT / ".venv-ants" / "bin" / "python"))
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "voxreg-bench-affine"),
                   help="cache of the preprocessed images and ANTs results (outside the repo)")
    p.add_argument("--data", default=None, help="the ixi-raw/ folder")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/affine"
                   "[_wholehead].json)")
    p.add_argument("--note", default="", help="a remark stored with the results (e.g. machine load)")
    p.add_argument("--ants-check", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ants_check:
        return ants_check(args.ants_check)

    sys.path.insert(0, str(BENCH))
    from _common import env_info, write_json

    from voxreg.data.locate import shared_data

    raw = Path(args.data) if args.data else shared_data("ixi-raw")
    if raw is None or not (raw / "subjects.csv").is_file():
        print("no ixi-raw data (../shared/data/ixi-raw or --data): nothing to measure")
        return 0
    mode = "wholehead" if args.whole_head else "stripped"
    subjects = load_subjects(raw, args.whole_head)
    ids = sorted(subjects)
    pairs = [(m, f) for m in ids for f in ids if m != f][: args.pairs]
    options = {k: v for k, v in (("loss", args.loss), ("levels", args.levels),
                                 ("iterations", args.iterations),
                                 ("max_points", args.max_points)) if v is not None}
    work = Path(args.work) / mode
    python = Path(args.ants_python)
    have_ants = not args.no_ants and python.is_file()
    if not args.no_ants and not have_ants:
        print(f"skipping ANTs: no {python} (run benchmarks/setup_ants_env.sh)")
    tic = time.time()

    rows: dict[str, dict] = {"no registration (headers)": run_none(subjects, pairs)}
    check_pairs = len(pairs) if args.check_pairs is None else args.check_pairs
    voxreg_row, nearest_row, kept = run_voxreg(subjects, pairs, options, args.threads,
                                               check_pairs if have_ants else 0)
    rows["voxreg affine"] = voxreg_row
    rows["voxreg affine, labels nearest"] = nearest_row
    check = None
    if have_ants:
        paths = write_inputs(subjects, work / "inputs")
        rows["ANTs Affine"] = run_ants(subjects, pairs, paths, work, python, args.ants_threads)
        if kept:
            check, generic = itk_check(subjects, pairs, kept, paths, work, python,
                                       args.ants_threads, args.cpu_pairs)
            if len(kept) == len(pairs):
                rows["voxreg affine, labels by ANTs genericLabel"] = generic

    print(f"\n{len(pairs)} ordered pairs of ixi-raw ({mode}), voxreg {args.threads} thread(s), "
          f"ANTs {args.ants_threads} threads; voxreg options {options or 'defaults'}\n")
    print(table(rows))
    if rows.get("ANTs Affine", {}).get("cached_pairs"):
        print("(ANTs s/pair: from the cache, timed in an earlier run under other load)")
    summary = {}
    if "ANTs Affine" in rows:
        ants_row = rows["ANTs Affine"]
        speedup = float(np.mean(ants_row["seconds_per_pair"])
                        / np.mean(rows["voxreg affine"]["seconds_per_pair"]))
        summary["speedup"] = speedup
        print()
        for name in ("voxreg affine", "voxreg affine, labels nearest",
                     "voxreg affine, labels by ANTs genericLabel"):
            if name not in rows:
                continue
            ours = rows[name]
            gaps = {key: float(np.mean(ours[key]) - np.mean(ants_row[key]))
                    for key in ("mask_dice", "label_dice")}
            met = min(gaps.values()) >= -TARGET_DICE_GAP and speedup >= TARGET_SPEEDUP
            summary[name] = {**gaps, "target_met": bool(met)}
            print(f"{name} - ANTs: brain-mask Dice {gaps['mask_dice']:+.4f}, label Dice "
                  f"{gaps['label_dice']:+.4f}; ANTs / voxreg time {speedup:.1f}x (target: "
                  f"gap >= -{TARGET_DICE_GAP}, >= {TARGET_SPEEDUP:.0f}x): "
                  f"{'met' if met else 'not met'}")
    if check is not None and check["ants_timed"]:
        timed = check["ants_timed"]
        count = len(timed)
        ants_cpu = float(np.mean([t["cpu_seconds"] for t in timed]))
        ours_cpu = float(np.mean(rows["voxreg affine"]["cpu_seconds_per_pair"][:count]))
        ours_wall = float(np.mean(rows["voxreg affine"]["seconds_per_pair"][:count]))
        summary["cpu_time"] = {"pairs": count, "ants_cpu_seconds": ants_cpu,
                               "ants_wall_seconds": float(np.mean([t["wall_seconds"] for t in timed])),
                               "voxreg_cpu_seconds": ours_cpu, "voxreg_wall_seconds": ours_wall,
                               "cpu_ratio": ants_cpu / ours_cpu}
        print(f"first {count} pairs, CPU seconds per pair (all threads): ANTs {ants_cpu:.2f}, "
              f"voxreg {ours_cpu:.2f}: {ants_cpu / ours_cpu:.1f}x")
    if check is not None:
        print(f"ITK export applied by ants.apply_transforms on {check['pairs']} pairs: max |diff| "
              f"{check['max_abs_image_difference']:.2e} (intensities in [0, 1]), "
              f"{check['max_abs_image_difference_interior']:.2e} at least 1 voxel inside the "
              f"moving grid; label voxels differing (voxreg's label interpolation vs genericLabel) "
              f"{max(check['label_voxels_differing_fraction']):.2e}")
    import inspect

    from voxreg.affine import register_affine

    defaults = {name: param.default for name, param in inspect.signature(
        register_affine).parameters.items() if param.default is not inspect.Parameter.empty}
    result = {"pairs": pairs, "mode": mode, "threads": args.threads,
              "ants_threads": args.ants_threads, "voxreg_options": {**defaults, **options},
              "rows": rows, "summary": summary, "itk_check": check, "env": env_info(),
              "wall_seconds": time.time() - tic, "note": args.note}
    out = Path(args.out) if args.out else BENCH / "results" / (
        "affine.json" if mode == "stripped" else "affine_wholehead.json")
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
