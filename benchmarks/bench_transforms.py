"""Benchmark voxreg's warp and velocity integration against the official voxelmorph (PyTorch).

    .venv/bin/python benchmarks/bench_transforms.py [--repeats 5] [--shape 160,192,224]
                                                    [--json OUT] [--vxm-python PATH]

voxreg is measured in this process. voxelmorph 0.3.4 lives in its own environment
(``.venv-vxm``, made by ``benchmarks/setup_vxm_env.sh``) and is measured in the same run by a
subprocess of that environment's Python, on the very same inputs (handed over as a ``torch.save``
file); its outputs come back the same way, so the table also gives the largest difference between
the two implementations. Without ``.venv-vxm`` (or with ``--no-vxm``) the voxelmorph rows are
skipped and only voxreg is timed.

Timing: 1 untimed warm-up call, then ``--repeats`` timed calls, all under ``torch.no_grad()``,
with torch using every core (``torch.set_num_threads(os.cpu_count())``, printed); median and
minimum in milliseconds. The two sides run one after the other, never at the same time.

Cases (batch 1, float32, CPU):

1. warp a one-channel image by a smooth random displacement (linear, zero fill):
   ``voxreg.warp``, ``voxreg.nn.layers.SpatialTransformer``, plain ``F.grid_sample`` (its sampling
   grid is normalised *outside* the timed call: only the sampling kernel is timed), and
   ``voxelmorph.nn.modules.SpatialTransformer`` (its normalisation is inside its call).
2. integrate a 3-channel velocity field by scaling and squaring, 7 steps:
   ``voxreg.integrate_velocity``, ``voxreg.nn.layers.VecInt``,
   ``voxelmorph.nn.modules.IntegrateVelocityField``; and at half resolution (resize the velocity
   by 0.5, integrate, resize back) with ``voxreg.resize_disp`` and with voxelmorph's
   ``ResizeDisplacementField``, as the original TF VoxelMorph integrated (``int_downsize=2``).

Convention note: voxelmorph's integration resamples the field with zero padding, voxreg's with
border padding (a field continues past its grid with its edge value). The two results therefore
differ near the faces of the volume; the table gives the difference over the whole volume and in
the interior (a margin of ``ceil(max|velocity|) + 2`` voxels, beyond the reach of any
boundary sample), and a zero-padded scaling and squaring built from ``voxreg.warp`` shows that
the padding is the only difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_info, format_table, setup_threads, time_fn, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VXM_PYTHON = ROOT / ".venv-vxm" / "bin" / "python"
STEPS = 7

# speed-up targets from the issue: voxelmorph time / voxreg time
TARGETS = {"warp": 2.0, "integrate": 4.0}


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def smooth_field(shape, channels: int, amplitude: float, generator: torch.Generator,
                 coarse_factor: int = 16) -> torch.Tensor:
    """A smooth random field ``(1, channels, *shape)``: a coarse Gaussian grid upsampled
    trilinearly, scaled so that its largest absolute value is ``amplitude``."""
    coarse = [max(2, s // coarse_factor) for s in shape]
    low = torch.randn(1, channels, *coarse, generator=generator)
    field = F.interpolate(low, size=tuple(shape), mode="trilinear", align_corners=True)
    return field * (amplitude / field.abs().max())


def make_inputs(shape, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = smooth_field(shape, 1, 1.0, gen, coarse_factor=8).abs()
    image = image + 0.1 * torch.rand(image.shape, generator=gen)
    disp = smooth_field(shape, 3, 4.0, gen)  # up to 4 voxels
    velocity = smooth_field(shape, 3, 6.0, gen)  # up to 6 voxels
    return {"image": image.contiguous(), "disp": disp.contiguous(),
            "velocity": velocity.contiguous()}


# --------------------------------------------------------------------------------------------
# voxelmorph side (runs in .venv-vxm; imports neither voxreg nor anything of this repo but _common)
# --------------------------------------------------------------------------------------------


def vxm_worker(workdir: Path, repeats: int, threads: int, cases: set[str]) -> None:
    setup_threads(threads)
    import voxelmorph as vxm
    from voxelmorph.nn.modules import (
        IntegrateVelocityField,
        ResizeDisplacementField,
        SpatialTransformer,
    )

    inputs = torch.load(workdir / "inputs.pt")
    image, disp, velocity = inputs["image"], inputs["disp"], inputs["velocity"]
    shape = tuple(image.shape[2:])
    timings, outputs = {}, {}

    if "warp" in cases:
        st = SpatialTransformer(interpolation_mode="linear", align_corners=True)
        r = time_fn(lambda: st(image, disp), repeats)
        outputs["warp"] = r.pop("result")
        timings["vxm SpatialTransformer"] = r

    integrate = IntegrateVelocityField(steps=STEPS)
    if "integrate" in cases:
        r = time_fn(lambda: integrate(velocity), repeats)
        outputs["integrate"] = r.pop("result")
        timings["vxm IntegrateVelocityField"] = r

    if "half" in cases and all(s % 2 == 0 for s in shape):  # scale_factor 0.5 then 2 returns to the same grid
        down, up = ResizeDisplacementField(0.5), ResizeDisplacementField(2.0)
        r = time_fn(lambda: up(integrate(down(velocity))), repeats)
        outputs["integrate_half"] = r.pop("result")
        timings["vxm half-res (Resize+Integrate+Resize)"] = r

    torch.save(outputs, workdir / "vxm_outputs.pt")
    info = env_info()
    info["voxelmorph"] = vxm.__version__
    (workdir / "vxm_timings.json").write_text(json.dumps({"env": info, "timings": timings}))


# glibc malloc settings equal to voxreg._runtime.tune_allocator's defaults (large blocks kept in
# the heap instead of mmap/munmap at every call), for a like-for-like voxelmorph process
MALLOC_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824:"
                   "glibc.malloc.top_pad=67108864")


def run_vxm(python: Path, workdir: Path, repeats: int, threads: int, cases: set[str],
            malloc_tuning: bool = False):
    """Run the voxelmorph worker; returns (timings, outputs, env) or raises RuntimeError."""
    cmd = [str(python), str(Path(__file__).resolve()), "--vxm-worker", str(workdir),
           "--repeats", str(repeats), "--threads", str(threads), "--cases", ",".join(cases)]
    env = dict(os.environ)
    if malloc_tuning:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"voxelmorph worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads((workdir / "vxm_timings.json").read_text())
    outputs = torch.load(workdir / "vxm_outputs.pt")
    return data["timings"], outputs, data["env"]


# --------------------------------------------------------------------------------------------
# voxreg side
# --------------------------------------------------------------------------------------------


def run_voxreg(inputs: dict[str, torch.Tensor], repeats: int, cases: set[str]):
    import voxreg
    from voxreg.nn.layers import VecInt

    image, disp, velocity = inputs["image"], inputs["disp"], inputs["velocity"]
    shape = tuple(image.shape[2:])
    timings, outputs = {}, {}
    if "warp" in cases:
        _voxreg_warp(image, disp, shape, repeats, timings, outputs)
    if "integrate" in cases:
        r = time_fn(lambda: voxreg.integrate_velocity(velocity, STEPS), repeats)
        outputs["integrate"] = r.pop("result")
        timings["voxreg.integrate_velocity"] = r

        vecint = VecInt(shape, STEPS)
        r = time_fn(lambda: vecint(velocity), repeats)
        outputs["integrate_layer"] = r.pop("result")
        timings["voxreg.nn.layers.VecInt"] = r

    def half_res():
        small = voxreg.resize_disp(velocity, factor=0.5)
        return voxreg.resize_disp(voxreg.integrate_velocity(small, STEPS), shape=shape)

    if "half" in cases:
        r = time_fn(half_res, repeats)
        outputs["integrate_half"] = r.pop("result")
        timings["voxreg half-res (resize_disp+integrate+resize_disp)"] = r
    return timings, outputs


def _voxreg_warp(image, disp, shape, repeats, timings, outputs) -> None:
    import voxreg
    from voxreg.nn.layers import SpatialTransformer

    r = time_fn(lambda: voxreg.warp(image, disp), repeats)
    outputs["warp"] = r.pop("result")
    timings["voxreg.warp"] = r

    st = SpatialTransformer(shape)
    r = time_fn(lambda: st(image, disp), repeats)
    outputs["warp_layer"] = r.pop("result")
    timings["voxreg.nn.layers.SpatialTransformer"] = r

    # plain grid_sample: the normalised grid is built here, outside the timed call
    axes = [torch.linspace(-1.0, 1.0, s) for s in shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)
    scale = torch.tensor([2.0 / (s - 1) for s in reversed(shape)])
    grid = (identity + disp.movedim(1, -1).flip(-1) * scale).contiguous()
    r = time_fn(lambda: F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=True), repeats)
    outputs["grid_sample"] = r.pop("result")
    timings["F.grid_sample (grid prebuilt)"] = r


def zero_padded_integration(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """Scaling and squaring with zero padding (voxelmorph's convention), built on voxreg.warp."""
    import voxreg

    disp = velocity / 2**steps
    for _ in range(steps):
        disp = disp + voxreg.warp(disp, disp)
    return disp


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def max_diff(a: torch.Tensor, b: torch.Tensor, margin: int = 0) -> float:
    if margin:
        inner = (slice(None), slice(None)) + tuple(slice(margin, s - margin) for s in a.shape[2:])
        a, b = a[inner], b[inner]
    return float((a - b).abs().max())


CASES = ("warp", "integrate", "half")


def parse_cases(text: str) -> set[str]:
    cases = {c.strip() for c in text.split(",") if c.strip()}
    unknown = cases - set(CASES)
    if unknown or not cases:
        raise argparse.ArgumentTypeError(f"--cases takes a subset of {','.join(CASES)}, got {text!r}")
    return cases


def parse_shape(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    shape = tuple(int(p) for p in parts if p.strip())
    if len(shape) != 3 or min(shape) < 2:
        raise argparse.ArgumentTypeError(f"--shape needs three sizes >= 2, got {text!r}")
    return shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument("--shape", type=parse_shape, default=(160, 192, 224),
                        help="spatial shape, e.g. 160,192,224 (default)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--vxm-python", type=Path, default=DEFAULT_VXM_PYTHON,
                        help="Python of the environment with voxelmorph (default .venv-vxm)")
    parser.add_argument("--no-vxm", action="store_true", help="time voxreg only")
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=parse_cases, default=set(CASES),
                        help="comma-separated subset of warp,integrate,half (default: all)")
    parser.add_argument("--vxm-malloc-tuning", action="store_true",
                        help="run voxelmorph with the glibc malloc settings that voxreg applies "
                             "to its own process at import (GLIBC_TUNABLES), for a like-for-like "
                             "allocator; default: voxelmorph as shipped")
    parser.add_argument("--vxm-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    if args.vxm_worker is not None:
        vxm_worker(args.vxm_worker, args.repeats, args.threads or os.cpu_count() or 1, args.cases)
        return 0

    threads = setup_threads(args.threads)
    started = time.perf_counter()
    inputs = make_inputs(args.shape, args.seed)
    shape = args.shape
    print(f"voxreg vs voxelmorph transforms, shape {shape}, batch 1, float32, CPU")
    print(f"torch {torch.__version__}, torch.get_num_threads() = {threads} "
          f"(os.cpu_count() = {os.cpu_count()}), {args.repeats} timed runs after 1 warm-up, "
          f"torch.no_grad()")
    print(f"inputs: |disp| <= {inputs['disp'].abs().max():.2f} voxels, "
          f"|velocity| <= {inputs['velocity'].abs().max():.2f} voxels, seed {args.seed}")

    import voxreg
    from voxreg._runtime import allocator_tuned, apply_default_tuning

    # what the voxreg command does at start-up (the library itself changes no process state)
    tuned = apply_default_tuning() or allocator_tuned()
    print(f"voxreg {voxreg.__version__}: glibc malloc tuning (as the voxreg command) "
          f"{'ON' if tuned else 'off'}; voxelmorph process: "
          f"{'same settings (--vxm-malloc-tuning)' if args.vxm_malloc_tuning else 'default malloc'}")
    voxreg_t, voxreg_out = run_voxreg(inputs, args.repeats, args.cases)

    vxm_t, vxm_out, vxm_env, vxm_note = {}, {}, None, None
    if args.no_vxm:
        vxm_note = "voxelmorph skipped (--no-vxm)"
    elif not args.vxm_python.exists():
        vxm_note = (f"voxelmorph skipped: {args.vxm_python} not found "
                    f"(create it with `bash benchmarks/setup_vxm_env.sh`, or pass --vxm-python)")
    else:
        with tempfile.TemporaryDirectory(prefix="bench_vxm_") as tmp:
            torch.save(inputs, Path(tmp) / "inputs.pt")
            try:
                vxm_t, vxm_out, vxm_env = run_vxm(args.vxm_python, Path(tmp), args.repeats,
                                                  threads, args.cases, args.vxm_malloc_tuning)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                vxm_note = f"voxelmorph skipped: {exc}"
    if vxm_env:
        print(f"voxelmorph {vxm_env.get('voxelmorph')} (torch {vxm_env['torch']}, "
              f"{vxm_env['threads']} threads) via {args.vxm_python}")

    # rows: (case, name, timing, reference vxm row for the speed-up, output key for the diff)
    vxm_warp, vxm_int = "vxm SpatialTransformer", "vxm IntegrateVelocityField"
    vxm_half = "vxm half-res (Resize+Integrate+Resize)"
    plan = [
        ("warp", "voxreg.warp", vxm_warp, "warp"),
        ("warp", "voxreg.nn.layers.SpatialTransformer", vxm_warp, "warp_layer"),
        ("warp", "F.grid_sample (grid prebuilt)", vxm_warp, "grid_sample"),
        ("warp", vxm_warp, None, None),
        ("integrate x7", "voxreg.integrate_velocity", vxm_int, "integrate"),
        ("integrate x7", "voxreg.nn.layers.VecInt", vxm_int, "integrate_layer"),
        ("integrate x7", vxm_int, None, None),
        ("integrate x7 half-res", "voxreg half-res (resize_disp+integrate+resize_disp)", vxm_half,
         "integrate_half"),
        ("integrate x7 half-res", vxm_half, None, None),
    ]
    margin = math.ceil(float(inputs["velocity"].abs().max())) + 2
    rows, records = [], []
    for case, name, ref, key in plan:
        timing = voxreg_t.get(name) or vxm_t.get(name)
        if timing is None:
            continue
        speedup = diff = None
        if ref in vxm_t:
            speedup = vxm_t[ref]["median_ms"] / timing["median_ms"]
        vxm_key = "integrate_half" if key == "integrate_half" else (
            "integrate" if key and key.startswith("integrate") else "warp")
        if key is not None and vxm_key in vxm_out:
            a, b = voxreg_out[key], vxm_out[vxm_key]
            diff = {"all": max_diff(a, b)}
            if case.startswith("integrate"):
                diff["interior"] = max_diff(a, b, margin)
        records.append({"case": case, "name": name, "median_ms": timing["median_ms"],
                        "min_ms": timing["min_ms"], "times_ms": timing["times_ms"],
                        "speedup_vs_vxm": speedup, "max_abs_diff_vs_vxm": diff})
        diff_text = "" if diff is None else (
            f"{diff['all']:.2e}" + (f" ({diff['interior']:.2e} interior)" if "interior" in diff
                                    else ""))
        rows.append([case, name, f"{timing['median_ms']:.1f}", f"{timing['min_ms']:.1f}",
                     "" if speedup is None else f"{speedup:.2f}x", diff_text])

    print()
    print(format_table(["case", "implementation", "median ms", "min ms", "vxm/voxreg",
                        "max|diff| vs vxm"], rows, left=2))
    print()
    print("vxm/voxreg = voxelmorph median / voxreg median (speed-up; > 1: voxreg faster), against "
          "the voxelmorph row of the same case. F.grid_sample's normalised grid is built outside "
          "the timing; voxreg's and voxelmorph's calls include it.")

    checks = {}
    if vxm_note:
        print(vxm_note)
    else:
        print(f"interior = {margin} voxels away from every face (ceil(max|velocity|) + 2).")
    if not vxm_note and "integrate" in vxm_out:
        zero_pad = zero_padded_integration(inputs["velocity"], STEPS)
        checks["zero_padded_voxreg_vs_vxm_integrate"] = max_diff(zero_pad, vxm_out["integrate"])
        checks["border_vs_zero_padding_voxreg"] = max_diff(zero_pad, voxreg_out["integrate"])
        print(f"padding convention: voxreg integrates with border padding, voxelmorph with zero "
              f"padding. A zero-padded scaling and squaring from voxreg.warp differs from "
              f"voxelmorph by {checks['zero_padded_voxreg_vs_vxm_integrate']:.2e} "
              f"(from voxreg's own border-padded result by "
              f"{checks['border_vs_zero_padding_voxreg']:.2e}).")
    if not vxm_note:
        if "integrate_half" in vxm_out:
            print("half-res: voxelmorph's ResizeDisplacementField scales values by the size factor "
                  "(0.5, 2), voxreg.resize_disp by (new-1)/(old-1) (corner-aligned grids), so the "
                  "half-res rows differ by that too.")
        summary = []
        for name, kind in [("voxreg.warp", "warp"), ("voxreg.nn.layers.SpatialTransformer", "warp"),
                           ("voxreg.integrate_velocity", "integrate"),
                           ("voxreg.nn.layers.VecInt", "integrate")]:
            rec = next((r for r in records if r["name"] == name), None)
            if rec and rec["speedup_vs_vxm"] is not None:
                ok = rec["speedup_vs_vxm"] >= TARGETS[kind]
                summary.append(f"  {name}: {rec['speedup_vs_vxm']:.2f}x "
                               f"(target >= {TARGETS[kind]:g}x: {'met' if ok else 'NOT met'})")
        print("targets (vxm/voxreg, median):")
        print("\n".join(summary))
        if vxm_int in vxm_t and "half" in args.cases:
            half = voxreg_t["voxreg half-res (resize_disp+integrate+resize_disp)"]["median_ms"]
            print(f"  voxreg half-res vs voxelmorph full-res integration: "
                  f"{vxm_t[vxm_int]['median_ms'] / half:.1f}x")
    if "integrate_half" in voxreg_out and "integrate" in voxreg_out:
        half_err = max_diff(voxreg_out["integrate_half"], voxreg_out["integrate"], margin)
        checks["voxreg_half_vs_full_res_interior"] = half_err
        print(f"voxreg half-res vs full-res integration (interior): max|diff| = {half_err:.3f} "
              "voxels")
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s")

    if args.json:
        result = {
            "shape": list(shape), "repeats": args.repeats, "warmup": 1, "steps": STEPS,
            "seed": args.seed, "interior_margin": margin, "cases": sorted(args.cases),
            "voxreg_malloc_tuning": tuned, "vxm_malloc_tuning": args.vxm_malloc_tuning,
            "env": env_info(), "vxm_env": vxm_env, "vxm_note": vxm_note,
            "rows": records, "checks": checks, "elapsed_s": elapsed,
        }
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
