"""``voxreg register`` on scans as users have them: native grids, whole heads, scanner intensities.

What it measures (label Dice, always in the *fixed* scan's own native space, with
:func:`voxreg.metrics.mean_dice_present`: mean Dice over the non-zero labels present in both the
fixed and the moving label map; brain1mm also over its 30 evaluation labels with
:func:`voxreg.metrics.mean_dice`):

* data: the 6 ``ixi-raw`` T1 scans exactly as published (120x120x90, 2 mm, PSR, whole head,
  scanner intensities) with their DLMUSE labels on the same grids; the 30 ordered pairs
  ``itertools.permutations(ids, 2)`` (``--pairs``), and "the 10 pairs": every 3rd of them.
* ``headers only``: the moving labels carried through the headers alone (nearest).
* ``affine only``: :func:`voxreg.apps.affine.affine_files` (MI, defaults) on the raw files,
  labels carried with ``label_interp="label"`` (ANTs' genericLabel rule).
* ``voxreg register``: :func:`voxreg.apps.register.register_files` with ``"brain3d-diff"`` and
  its defaults (the native pipeline: each scan affinely aligned to the model's reference, brain
  masked, one resampling into the model's domain, the network, one composed transform back onto
  the fixed grid), labels carried by the same call (``moving_labels``, ``label_interp="label"``).
  ``--finetune 50`` on the 10 pairs. The whole command ``voxreg register A B --model
  brain3d-diff --moved out.nii.gz`` is also timed as a subprocess (start-up included) on
  ``--cli-pairs`` pairs, and its moved image compared with the in-process call's; by default
  also on 1 thread (``OMP_NUM_THREADS=1``) and with ``OMP_WAIT_POLICY=PASSIVE``, because on a
  shared machine OpenMP's busy-waiting threads slow the affine stage's many small operations
  down by an order of magnitude.
* ``ANTs SyN``: ``ants.registration(fixed, moving, type_of_transform="SyN")`` on the same raw
  files (``benchmarks/_ants_worker.py`` in ``.venv-ants``, one subprocess per pair, seed 2024),
  labels by ``genericLabel``; run on the 10 pairs (``--ants-pairs``) right after voxreg on the
  same pair, so load bursts hit both alike.
* in-domain reference: the same model on the same subjects' preprocessed ``ixi/`` images
  (skull-stripped, ANTs-affine to MNI152 2 mm, 96x112x96: its training domain),
  ``voxreg.registration.register(model, moving / 255, fixed / 255)``; scored (a) on the MNI
  grid with the ``ixi/labels`` (nearest, the VoxelMorph convention), and (b) in the fixed scan's
  native space: fixed native voxel -> world -> MNI (inverse of the fixed subject's
  ``atlas_to_native_ras`` matrix) -> MNI voxel -> + the displacement -> MNI world -> moving native
  world (the moving subject's matrix) -> the moving native labels, label interpolation. Also
  (b) with a zero displacement: the preprocessing's ANTs affines alone.
* robustness copies (``--copies``, see ``_native_data.py``) of the 10 pairs: ``lps`` (the same
  world image in LPS array order), ``1mm`` (resampled to 1 mm isotropic), ``aniso`` (1 mm
  in-plane, 3 mm along the superior axis); voxreg and affine only on all 10, ANTs SyN on
  ``--copy-ants-pairs``; Dice on each fixed copy's grid with the labels carried by each copy.
* brain1mm (``vxm_test_scan`` <-> ``l2r_subject_1``, both directions): written as NIfTI with an
  identity 1 mm affine (the data carry none) and, as a diagnostic, with FreeSurfer's conformed
  LIA matrix; no registration (they share one aligned space), affine only, voxreg register,
  ANTs SyN. Labels are written as int32 (the npz holds uint16; ``uint16_label_probe`` in the
  JSON records whether voxreg's label interpolation takes uint16 yet).

Timing: torch on ``--threads`` (2) threads, ANTs with ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``
the same; voxreg's allocator tuning applied as the command applies it. Seconds per pair:
``affine only`` the registration (``result.seconds``) and the whole call; ``voxreg register``
its stages (what the command prints: affine, resample, network, compose) and the whole call
(model loading by name, file reading, label resampling included); ANTs the
``ants.registration`` call. One untimed warm-up of each voxreg call first. Each timing is
printed with ``os.getloadavg()``; tables give the 1-minute load over the method's timings.

    .venv/bin/python benchmarks/bench_native.py --copies          # everything (~1 h, 2 cores)

While others edit ``src/`` in the same checkout, run it on a snapshot of a commit, so that the
in-process calls and the command's subprocesses run the same code (the JSON records the
imported package and its digest):

    git archive HEAD src | tar -x -C /tmp/snap && \
        PYTHONPATH=/tmp/snap/src .venv/bin/python benchmarks/bench_native.py --copies
    .venv/bin/python benchmarks/bench_native.py --pairs 6 --skip-ants --finetune-pairs 0
"""

from __future__ import annotations

import argparse
import hashlib
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
sys.path.insert(0, str(BENCH))

import _native_data as nd  # noqa: E402
from _common import env_info, setup_threads, write_json  # noqa: E402

MODEL = "brain3d-diff"


# ------------------------------------------------------------------------------------------------
# bookkeeping
# ------------------------------------------------------------------------------------------------


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def loads() -> str:
    return "load " + "/".join(f"{v:.2f}" for v in os.getloadavg())


class Rows:
    """Per-method, per-pair results of one table."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def add(self, method: str, pair, dice: float, **values) -> None:
        row = self.rows.setdefault(method, {"pairs": [], "dice": []})
        row["pairs"].append(nd.short(pair))
        row["dice"].append(float(dice))
        for key, value in values.items():
            row.setdefault(key, []).append(None if value is None else float(value))

    def fail(self, method: str, pair, error: BaseException) -> None:
        row = self.rows.setdefault(method, {"pairs": [], "dice": []})
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        row.setdefault("errors", []).append({"pair": nd.short(pair), "error": message})
        print(f"  {method} {nd.short(pair)} FAILED: {message}", flush=True)


def _fmt(values, digits=2) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.{digits}f}" if values else "-"


def md_table(rows: dict[str, dict], reference: str | None = "affine only",
             subset: list[str] | None = None, extra: dict[str, str] | None = None) -> str:
    """Markdown table: Dice mean (sd), worst pair, worst delta vs ``reference`` (same pairs),
    pairs below it, seconds per pair (method / whole call), CPU seconds, 1-min load range."""
    ref = rows.get(reference) if reference else None
    ref_dice = dict(zip(ref["pairs"], ref["dice"])) if ref else {}
    lines = ["| method | pairs | Dice mean (sd) | worst pair | worst delta vs affine (pair) | "
             "pairs below affine | s / pair | wall s / pair (call) | load 1-min (min-max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        keep = [k for k, p in enumerate(row["pairs"]) if subset is None or p in subset]
        if not keep:
            continue
        pairs = [row["pairs"][k] for k in keep]
        dice = np.array([row["dice"][k] for k in keep])
        worst = int(np.nanargmin(dice))
        delta_text, below = "-", "-"
        if ref is not None and name != reference and not row.get("no_delta"):
            deltas = [(dice[i] - ref_dice[p], p) for i, p in enumerate(pairs) if p in ref_dice]
            if deltas:
                d, p = min(deltas)
                delta_text = f"{d:+.4f} ({p})"
                below = f"{sum(x < 0 for x, _ in deltas)}/{len(deltas)}"

        seconds, wall, load = ([row[key][k] for k in keep] if row.get(key) else []
                               for key in ("seconds", "wall_seconds", "load"))
        load = [v for v in load if v is not None]
        load_text = f"{min(load):.1f}-{max(load):.1f}" if load else "-"
        failed = len(row.get("errors", []))
        label = name + (f" ({failed} failed)" if failed else "") + (extra or {}).get(name, "")
        lines.append(f"| {label} | {len(keep)} | {np.nanmean(dice):.4f} ({np.nanstd(dice):.4f}) "
                     f"| {dice[worst]:.4f} ({pairs[worst]}) | {delta_text} | {below} | "
                     f"{_fmt(seconds)} | {_fmt(wall)} | {load_text} |")
    return "\n".join(lines)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def provenance() -> dict:
    """The voxreg code and model actually imported (it may be a snapshot put first on
    ``PYTHONPATH``), a digest of that package folder, and the checkout's git state."""
    import voxreg
    from voxreg._runtime import MODELS_DIR

    package = Path(voxreg.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".safetensors", ".json", ".nii", ".gz"):
            digest.update(str(path.relative_to(package)).encode())
            digest.update(path.read_bytes())

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"voxreg_package": str(package), "package_sha256_16": digest.hexdigest()[:16],
            "model_sha256_16": sha256(MODELS_DIR / f"{MODEL}.safetensors"),
            "checkout_git_head": git("rev-parse", "HEAD"),
            "checkout_src_uncommitted": git("status", "--porcelain", "--", "src").splitlines()}


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------


class Voxreg:
    """voxreg's file-level calls, timed (wall, CPU) with the load average."""

    def __init__(self, work: Path) -> None:
        self.labels_out = None  # register_files(moving_labels=..., moved_labels=None) allowed?
        self.work = work
        self.note = None

    def affine(self, moving, fixed, moving_labels):
        from voxreg.apps.affine import affine_files

        cpu, tic = time.process_time(), time.perf_counter()
        out = affine_files(moving, fixed, labels=moving_labels)
        wall, cpu = time.perf_counter() - tic, time.process_time() - cpu
        return out.moved_labels.data, {"seconds": out.result.seconds, "wall_seconds": wall,
                                       "cpu_seconds": cpu, "load": load1()}

    def register(self, moving, fixed, moving_labels, finetune: int = 0):
        from voxreg.apps.register import register_files

        options = {"moving_labels": moving_labels, "moved_labels": self.labels_out}
        if finetune:
            options.update(finetune=finetune, progress=False)
        cpu, tic = time.process_time(), time.perf_counter()
        result = register_files(moving, fixed, MODEL, **options)
        wall, cpu = time.perf_counter() - tic, time.process_time() - cpu
        stages = dict(result.native.seconds) if result.native is not None else {}
        return result, {"seconds": result.seconds, "wall_seconds": wall, "cpu_seconds": cpu,
                        "load": load1(), **{f"s_{k}": v for k, v in stages.items()}}

    def warm_up(self, moving, fixed, moving_labels) -> None:
        """One untimed call of each; finds out whether ``moved_labels=None`` is accepted with
        ``moving_labels`` (else the labels are also written to a scratch file)."""
        from voxreg.apps.register import register_files

        self.affine(moving, fixed, moving_labels)
        try:
            register_files(moving, fixed, MODEL, moving_labels=moving_labels, moved_labels=None)
        except ValueError as error:
            self.note = (f"register_files(..., moving_labels=X, moved_labels=None) raised "
                         f"ValueError: {error}; the labels were also written to a scratch file")
            print(f"note: {self.note}", flush=True)
            self.labels_out = str(self.work / "scratch_moved_labels.nii.gz")
            register_files(moving, fixed, MODEL, moving_labels=moving_labels,
                           moved_labels=self.labels_out)


class Ants:
    """ANTs SyN through ``_ants_worker.py``, one subprocess per pair (timed inside)."""

    def __init__(self, python: Path, work: Path, threads: int, reuse: bool) -> None:
        self.python, self.work, self.threads, self.reuse = python, work, threads, reuse
        self.env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads),
                        OMP_NUM_THREADS=str(threads))

    def __call__(self, tag: str, name: str, moving, fixed, moving_labels):
        out_dir = self.work / "ants" / tag
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{name}.npz"
        cached = target.exists() and self.reuse
        if target.exists() and not self.reuse:
            target.unlink()
        job = {"transform": "SyN", "threads": self.threads, "seed": 2024, "out_dir": str(out_dir),
               "pairs": [{"name": name, "moving": str(moving), "fixed": str(fixed),
                          "moving_labels": str(moving_labels)}]}
        job_path = out_dir / f"job_{name}.json"
        job_path.write_text(json.dumps(job))
        subprocess.run([str(self.python), str(BENCH / "_ants_worker.py"), str(job_path)],
                       check=True, env=self.env)
        saved = np.load(target)
        return saved["moved_labels"], {"seconds": float(saved["seconds"]), "load": load1(),
                                       "folding_pct": float(saved["folding_pct"]),
                                       "cached": float(cached)}


def dice_of(fixed_labels, moved, moving_labels) -> float:
    from voxreg.metrics import mean_dice_present

    return mean_dice_present(fixed_labels, np.asarray(moved), moving_labels)


# ------------------------------------------------------------------------------------------------
# parts of the run
# ------------------------------------------------------------------------------------------------


def run_raw(args, raw, ixi, pairs, ten, ants_set, vox, ants, results) -> dict:
    """The 30 (``--pairs``) raw pairs: headers, affine, voxreg, in-domain; ANTs and finetune on
    the 10. Returns the in-process moved images of the CLI pairs."""
    import nibabel as nib
    import torch

    import voxreg
    from voxreg import io
    from voxreg import transforms as T
    from voxreg.registration import register

    table = Rows()
    matrices = nd.atlas_to_native(raw)
    model = voxreg.load_model(MODEL, device="cpu")
    mni_affine = nib.load(ixi / "images" / f"{pairs[0][0]}.nii.gz").affine
    ixi_img = {s: np.asarray(nib.load(ixi / "images" / f"{s}.nii.gz").dataobj, np.float32) / 255
               for s in nd.raw_ids(raw)}
    ixi_lab = {s: np.asarray(nib.load(ixi / "labels" / f"{s}.nii.gz").dataobj)
               for s in ixi_img}
    register(model, ixi_img[pairs[0][0]], ixi_img[pairs[0][1]])  # warm-up
    cli_pairs = ten[: args.cli_pairs]
    kept = {}
    for index, pair in enumerate(pairs):
        moving, fixed = pair
        (m_img, m_lab), (f_img, f_lab) = nd.raw_paths(raw, moving), nd.raw_paths(raw, fixed)
        fixed_labels = io.load_labels(f_lab)
        moving_labels = io.load_labels(m_lab).data
        name = nd.short(pair)
        line = [f"[{index + 1}/{len(pairs)}] {name}"]

        moved = io.resample_to(io.load_labels(m_lab), fixed_labels, "nearest").data
        table.add("headers only", pair, dice_of(fixed_labels.data, moved, moving_labels))

        try:
            moved, timing = vox.affine(m_img, f_img, m_lab)
            table.add("affine only", pair, dice_of(fixed_labels.data, moved, moving_labels),
                      **timing)
            line.append(f"affine {table.rows['affine only']['dice'][-1]:.4f} "
                        f"{timing['seconds']:.1f}/{timing['wall_seconds']:.1f} s")
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            table.fail("affine only", pair, error)
        try:
            result, timing = vox.register(m_img, f_img, m_lab)
            table.add("voxreg register", pair,
                      dice_of(fixed_labels.data, result.moved_labels.data, moving_labels),
                      **timing)
            line.append(f"voxreg {table.rows['voxreg register']['dice'][-1]:.4f} "
                        f"{timing['seconds']:.1f}/{timing['wall_seconds']:.1f} s")
            if pair in cli_pairs:
                kept[pair] = result.moved.data
            del result
        except Exception as error:  # noqa: BLE001
            table.fail("voxreg register", pair, error)

        # in-domain reference
        res = register(model, ixi_img[moving], ixi_img[fixed], return_time=True)
        disp = np.asarray(res.disp, np.float32).reshape(3, *ixi_img[fixed].shape)
        warped = T.warp(torch.from_numpy(ixi_lab[moving].astype(np.int64))[None, None],
                        torch.from_numpy(disp)[None], interp="nearest")[0, 0].numpy()
        table.add("in-domain (a): MNI grid, ixi/labels, nearest", pair,
                  dice_of(ixi_lab[fixed], warped, ixi_lab[moving]), seconds=res.seconds_per_pair,
                  load=load1())
        f_aff, m_aff = fixed_labels.affine, io.load_labels(m_lab).affine
        for label, field in (("in-domain, ANTs affines only (native)", None),
                             ("in-domain (b): native space", disp)):
            coords = nd.through_mni(fixed_labels.shape, f_aff, m_aff, matrices[fixed],
                                    matrices[moving], mni_affine, field)
            table.add(label, pair, dice_of(fixed_labels.data, nd.sample_labels(moving_labels,
                                                                               coords),
                                           moving_labels))
        line.append(f"in-domain {table.rows['in-domain (b): native space']['dice'][-1]:.4f}")

        if pair in ants_set:
            try:
                moved, timing = ants("raw", f"{moving}__{fixed}", m_img, f_img, m_lab)
                table.add("ANTs SyN", pair, dice_of(fixed_labels.data, moved, moving_labels),
                          **timing)
                line.append(f"ANTs {table.rows['ANTs SyN']['dice'][-1]:.4f} "
                            f"{timing['seconds']:.1f} s")
            except Exception as error:  # noqa: BLE001
                table.fail("ANTs SyN", pair, error)
        if pair in ten[: args.finetune_pairs]:
            method = f"voxreg register --finetune {args.finetune_steps}"
            try:
                result, timing = vox.register(m_img, f_img, m_lab, finetune=args.finetune_steps)
                steps = getattr(result.registration, "steps", None)
                table.add(method, pair,
                          dice_of(fixed_labels.data, result.moved_labels.data, moving_labels),
                          steps=steps, **timing)
                line.append(f"finetune {table.rows[method]['dice'][-1]:.4f} "
                            f"{timing['seconds']:.1f} s")
                del result
            except Exception as error:  # noqa: BLE001
                table.fail(method, pair, error)
        print(", ".join(line) + f"; {loads()}", flush=True)
    results["raw"] = table.rows
    return kept


CLI_VARIANTS = {
    "2 threads": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def run_cli(args, raw, ten, kept, work: Path, results) -> None:
    """The whole command as a subprocess (start-up, model loading and file writing included),
    as it runs by default (torch's default threads: the cores) and, for comparison, on 1 thread
    and with OpenMP's passive wait policy; the variants alternate per pair."""
    import re

    from voxreg import io

    exe = ROOT / ".venv" / "bin" / "voxreg"
    out = []
    variants = list(CLI_VARIANTS) if args.cli_variants else ["2 threads"]
    for pair in ten[: args.cli_pairs]:
        (m_img, _), (f_img, _) = nd.raw_paths(raw, pair[0]), nd.raw_paths(raw, pair[1])
        for variant in variants:
            target = work / f"cli_{pair[0]}__{pair[1]}.nii.gz"
            target.unlink(missing_ok=True)
            command = [str(exe), "register", str(m_img), str(f_img), "--model", MODEL,
                       "--moved", str(target)]
            env = {k: v for k, v in os.environ.items()
                   if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
            env.update(CLI_VARIANTS[variant])
            tic = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - tic
            stages = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", proc.stdout)}
            entry = {"pair": nd.short(pair), "variant": variant, "wall_seconds": wall,
                     "load": load1(), "returncode": proc.returncode, "stages": stages,
                     "stdout": proc.stdout.strip()[-2000:], "stderr": proc.stderr.strip()[-2000:],
                     "command": " ".join(command), "env": CLI_VARIANTS[variant]}
            if proc.returncode == 0 and pair in kept:
                written = io.load_image(target).data
                ours = kept[pair].astype(np.float64)
                entry["max_abs_diff_vs_in_process"] = float(np.abs(written - ours).max())
            out.append(entry)
            print(f"CLI {entry['pair']} ({variant}): {wall:.1f} s (rc {proc.returncode}), "
                  f"stages {stages}; {loads()}", flush=True)
            if proc.returncode:
                print(proc.stderr[-1000:], flush=True)
    results["cli"] = out


def run_copies(args, raw, ten, vox, ants, work: Path, results) -> None:
    from voxreg import io

    ids = sorted({s for pair in ten for s in pair})
    results["copies"] = {}
    for kind in args.copies:
        tic = time.perf_counter()
        paths = nd.write_copies(raw, ids, kind, work / "copies" / kind)
        info = {"seconds_to_write": time.perf_counter() - tic}
        first = ids[0]
        img = io.load_image(paths[first][0])
        info["shape"], info["spacing"] = list(img.shape), [float(v) for v in img.spacing]
        import nibabel as nib
        info["axcodes"] = "".join(nib.aff2axcodes(img.affine))
        if kind == "lps":
            info["label_voxels_differing_back_on_original_grid"] = max(
                nd.check_same_world(*nd.raw_paths(raw, s)[:1], paths[s][0],
                                    nd.raw_paths(raw, s)[1], paths[s][1]) for s in ids)
        print(f"\ncopy {kind}: {info}", flush=True)
        table = Rows()
        for index, pair in enumerate(ten):
            moving, fixed = pair
            (m_img, m_lab), (f_img, f_lab) = paths[moving], paths[fixed]
            fixed_labels = io.load_labels(f_lab).data
            moving_labels = io.load_labels(m_lab).data
            line = [f"[{kind} {index + 1}/{len(ten)}] {nd.short(pair)}"]
            for method in ("affine only", "voxreg register"):
                try:
                    if method == "affine only":
                        moved, timing = vox.affine(m_img, f_img, m_lab)
                    else:
                        result, timing = vox.register(m_img, f_img, m_lab)
                        moved = result.moved_labels.data
                        del result
                    table.add(method, pair, dice_of(fixed_labels, moved, moving_labels), **timing)
                    line.append(f"{method.split()[0]} {table.rows[method]['dice'][-1]:.4f} "
                                f"{timing['seconds']:.1f}/{timing['wall_seconds']:.1f} s")
                except Exception as error:  # noqa: BLE001
                    table.fail(method, pair, error)
            if ants is not None and index < args.copy_ants_pairs:
                try:
                    moved, timing = ants(kind, f"{moving}__{fixed}", m_img, f_img, m_lab)
                    table.add("ANTs SyN", pair, dice_of(fixed_labels, moved, moving_labels),
                              **timing)
                    line.append(f"ANTs {table.rows['ANTs SyN']['dice'][-1]:.4f} "
                                f"{timing['seconds']:.1f} s")
                except Exception as error:  # noqa: BLE001
                    table.fail("ANTs SyN", pair, error)
            print(", ".join(line) + f"; {loads()}", flush=True)
        results["copies"][kind] = {"info": info, "rows": table.rows}


def run_brain1mm(args, data: Path, vox, ants, work: Path, results) -> None:
    from voxreg.metrics import mean_dice

    evaluation = np.load(data / "labels.npz")["labels"].tolist()
    seg = {n: np.load(data / f"{n}.npz")["seg"].astype(np.int32) for n in nd.BRAIN1MM}
    files = {tag: nd.write_brain1mm(work / "brain1mm", data, affine, tag)
             for tag, affine in (("identity", np.eye(4)), ("lia", nd.LIA_1MM))}
    table = Rows()
    eval_dice: dict[str, list] = {}

    def add(method, pair, moved, **timing):
        fixed_l, moving_l = seg[pair[1]], seg[pair[0]]
        table.add(method, pair, dice_of(fixed_l, moved, moving_l), **timing)
        eval_dice.setdefault(method, []).append(mean_dice(fixed_l, np.asarray(moved), evaluation))

    for pair in (nd.BRAIN1MM, nd.BRAIN1MM[::-1]):
        moving, fixed = pair
        add("no registration (one aligned space)", pair, seg[moving])
        ident = files["identity"]
        line = [f"brain1mm {nd.short(pair)}"]
        for method, tag in (("affine only", "identity"), ("voxreg register", "identity"),
                            ("voxreg register, LIA header (diagnostic)", "lia")):
            (m_img, m_lab), (f_img, _) = files[tag][moving], files[tag][fixed]
            try:
                if method == "affine only":
                    moved, timing = vox.affine(m_img, f_img, m_lab)
                else:
                    result, timing = vox.register(m_img, f_img, m_lab)
                    moved = result.moved_labels.data
                    del result
                add(method, pair, moved, **timing)
                line.append(f"{method.split(',')[0]} {table.rows[method]['dice'][-1]:.4f} "
                            f"{timing['wall_seconds']:.1f} s")
            except Exception as error:  # noqa: BLE001
                table.fail(method, pair, error)
        if ants is not None and not args.skip_brain1mm_ants:
            try:
                moved, timing = ants("brain1mm", f"{moving}__{fixed}", ident[moving][0],
                                     ident[fixed][0], ident[moving][1])
                add("ANTs SyN", pair, moved, **timing)
                line.append(f"ANTs {table.rows['ANTs SyN']['dice'][-1]:.4f} "
                            f"{timing['seconds']:.1f} s")
            except Exception as error:  # noqa: BLE001
                table.fail("ANTs SyN", pair, error)
        print(", ".join(line) + f"; {loads()}", flush=True)
    for method, values in eval_dice.items():
        table.rows[method]["dice_eval30"] = values
    results["brain1mm"] = {"rows": table.rows, "evaluation_labels": evaluation,
                           "uint16_label_probe": nd.uint16_label_probe()}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def report(results: dict, ten_names: list[str]) -> str:
    out = []
    raw = results.get("raw", {})
    if raw:
        n = len(raw.get("affine only", raw["headers only"])["pairs"])
        out.append(f"\n### ixi-raw, {n} ordered pairs (native grids, whole heads, scanner "
                   "intensities; Dice in the fixed scan's native space unless said)\n")
        main = {k: v for k, v in raw.items() if k != "ANTs SyN" and "finetune" not in k}
        main.get("in-domain (a): MNI grid, ixi/labels, nearest", {})["no_delta"] = True
        out.append(md_table(main))
        subset = [k for k in raw if k in ("affine only", "voxreg register") or "finetune" in k
                  or k == "ANTs SyN" or k.startswith("in-domain")]
        out.append(f"\n### the 10 pairs (every 3rd ordered pair: {', '.join(ten_names)})\n")
        out.append(md_table({k: raw[k] for k in subset}, subset=ten_names))
    for kind, part in results.get("copies", {}).items():
        info = part["info"]
        out.append(f"\n### copy `{kind}`: {info['axcodes']} {'x'.join(map(str, info['shape']))}"
                   f" at {'x'.join(f'{v:g}' for v in info['spacing'])} mm (10 pairs; Dice on the "
                   "fixed copy's grid)\n")
        rows = dict(part["rows"])
        for method in ("affine only", "voxreg register"):
            if method in raw:
                rows[f"{method}, original scans (same pairs)"] = {
                    **raw[method], "no_delta": True}
        names = part["rows"].get("affine only", {}).get("pairs", ten_names)
        out.append(md_table(rows, subset=names))
    if "brain1mm" in results:
        rows = results["brain1mm"]["rows"]
        out.append("\n### brain1mm (vxm_test_scan <-> l2r_subject_1, 160x192x224 at 1 mm, both "
                   "directions; identity affine unless said)\n")
        extra = {k: f"; Dice over the 30 eval labels {np.nanmean(v['dice_eval30']):.4f}"
                 for k, v in rows.items() if "dice_eval30" in v}
        out.append(md_table(rows, extra=extra))
    if results.get("cli"):
        out.append("\n### the whole command as a subprocess: `voxreg register A B --model "
                   "brain3d-diff --moved out.nii.gz` (start-up included)\n")
        out.append("| pair | variant | wall s | affine stage s | network s | rc | load 1-min | "
                   "in-process register_files wall s | moved vs in-process: max abs diff |\n"
                   "|---|---|---:|---:|---:|---:|---:|---:|---:|")
        vr = raw.get("voxreg register", {})
        inproc = dict(zip(vr.get("pairs", []), vr.get("wall_seconds", [])))
        for entry in results["cli"]:
            p = entry["pair"]
            diff = entry.get("max_abs_diff_vs_in_process")
            st = entry.get("stages", {})
            out.append(f"| {p} | {entry.get('variant', '')} | {entry['wall_seconds']:.1f} | "
                       f"{st.get('affine', float('nan')):.1f} | {st.get('network', float('nan')):.1f}"
                       f" | {entry['returncode']} | {entry['load']:.1f} | "
                       f"{inproc.get(p, float('nan')):.1f} | {'-' if diff is None else f'{diff:.3g}'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=30, help="first N of the 30 ordered raw pairs")
    p.add_argument("--ants-pairs", type=int, default=10,
                   help="ANTs SyN on the first N of the every-3rd pairs")
    p.add_argument("--skip-ants", action="store_true")
    p.add_argument("--copies", nargs="?", const=",".join(nd.COPIES), default="",
                   help="robustness copies to run, comma-separated (alone: all of "
                   f"{','.join(nd.COPIES)}; default none)")
    p.add_argument("--copy-ants-pairs", type=int, default=3, help="ANTs SyN pairs per copy")
    p.add_argument("--finetune-pairs", type=int, default=10,
                   help="voxreg register --finetune on the first N of the 10 pairs (0: skip)")
    p.add_argument("--finetune-steps", type=int, default=50)
    p.add_argument("--cli-pairs", type=int, default=3, help="time the whole command on N pairs")
    p.add_argument("--no-cli-variants", dest="cli_variants", action="store_false",
                   help="time the command only as it runs by default (not also on 1 thread and "
                   "with OMP_WAIT_POLICY=PASSIVE)")
    p.add_argument("--skip-brain1mm", action="store_true")
    p.add_argument("--skip-brain1mm-ants", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ants-python", default=str(ROOT / ".venv-ants" / "bin" / "python"))
    p.add_argument("--reuse-ants", action="store_true",
                   help="reuse ANTs results cached under --work (their times are from then)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "voxreg-bench-native"),
                   help="scratch folder (copies, ANTs outputs; outside the repository)")
    p.add_argument("--data", default=None, help="the shared data folder (holding ixi-raw/)")
    p.add_argument("--json", default=str(BENCH / "results" / "native.json"))
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    args.copies = [c.strip() for c in args.copies.split(",") if c.strip()]
    unknown = set(args.copies) - set(nd.COPIES)
    if unknown:
        p.error(f"unknown copies {sorted(unknown)}; choose from {nd.COPIES}")

    from voxreg._runtime import apply_default_tuning
    from voxreg.data.locate import shared_data

    data = Path(args.data) if args.data else shared_data(".")
    raw, ixi = data / "ixi-raw", data / "ixi"
    if not (raw / "atlas_to_native_ras.json").is_file():
        print("no ixi-raw data: nothing to measure")
        return 0
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    threads = setup_threads(args.threads)
    tuned = apply_default_tuning()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    start_prov = provenance()
    print(f"bench_native: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))}, "
          f"torch threads {threads}, malloc tuning {tuned}, {loads()}", flush=True)

    ids = nd.raw_ids(raw)
    every = nd.ordered_pairs(ids)
    pairs = every[: args.pairs]
    ten = [q for q in nd.every_third(every) if q in pairs]
    have_ants = not args.skip_ants and Path(args.ants_python).is_file()
    if not args.skip_ants and not have_ants:
        print(f"skipping ANTs: no {args.ants_python} (bash benchmarks/setup_ants_env.sh)")
    ants = Ants(Path(args.ants_python), work, args.threads, args.reuse_ants) if have_ants else None
    ants_set = ten[: args.ants_pairs] if have_ants else []

    vox = Voxreg(work)
    first = nd.raw_paths(raw, pairs[0][0])
    vox.warm_up(first[0], nd.raw_paths(raw, pairs[0][1])[0], first[1])
    results: dict = {}
    kept = run_raw(args, raw, ixi, pairs, ten, ants_set, vox, ants, results)
    if args.cli_pairs:
        run_cli(args, raw, ten, kept, work, results)
    if args.copies:
        run_copies(args, raw, ten, vox, ants, work, results)
    if not args.skip_brain1mm and (data / "brain1mm" / "labels.npz").is_file():
        run_brain1mm(args, data / "brain1mm", vox, ants, work, results)

    ten_names = [nd.short(q) for q in ten]
    text = report(results, ten_names)
    all_loads = [v for part in _all_rows(results) for row in part.values()
                 for v in row.get("load", []) if v is not None]
    ended = time.time()
    summary = (f"\nrun {time.strftime('%H:%M', time.gmtime(started))}-"
               f"{time.strftime('%H:%M UTC', time.gmtime(ended))} ({(ended - started) / 60:.1f} "
               f"min), torch {threads} threads, ANTs {args.threads} ITK threads, 1-min load over "
               f"the timings {min(all_loads, default=0):.1f}-{max(all_loads, default=0):.1f} "
               f"(mean {np.mean(all_loads) if all_loads else 0:.1f}) on {os.cpu_count()} cores")
    if vox.note:
        summary += f"\nnote: {vox.note}"
    print(text + "\n" + summary, flush=True)
    end_prov = provenance()
    if (end_prov["package_sha256_16"], end_prov["model_sha256_16"]) != (
            start_prov["package_sha256_16"], start_prov["model_sha256_16"]):
        print(f"warning: the voxreg code or model changed during the run: {start_prov} -> "
              f"{end_prov}")
    write_json(Path(args.json), {
        "model": MODEL, "ids": ids, "pairs": [list(q) for q in pairs],
        "ten_pairs": [list(q) for q in ten], "ants_pairs": [list(q) for q in ants_set],
        "args": {k: v for k, v in vars(args).items()}, "results": results, "report": text,
        "summary": summary.strip(), "notes": [vox.note] if vox.note else [],
        "provenance": {"start": start_prov, "end": end_prov}, "malloc_tuned": tuned,
        "env": env_info(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                        time.gmtime(started)),
        "wall_seconds": ended - started, "note": args.note})
    return 0


def _all_rows(results: dict):
    if "raw" in results:
        yield results["raw"]
    for part in results.get("copies", {}).values():
        yield part["rows"]
    if "brain1mm" in results:
        yield results["brain1mm"]["rows"]


if __name__ == "__main__":
    sys.exit(main())
