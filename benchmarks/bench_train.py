"""Benchmark one training step of voxreg's VxmDense against voxelmorph 0.3.4's VxmPairwise.

    .venv/bin/python benchmarks/bench_train.py [--repeats 10] [--cases mnist,brain2d]
                                               [--json OUT] [--vxm-python PATH] [--no-vxm]
                                               [--malloc both|on|off] [--profile]
                                               [--rounds R] [--threads N] [--clock wall|cpu]
                                               [--interleave]

A training step is ``zero_grad(set_to_none=True)``, forward, loss ``MSE(fixed, moved) +
lambda * Grad_l2(field)`` (lambda 0.01), ``backward()`` and ``Adam(lr=1e-4).step()``, float32,
CPU. voxreg's step is the one its ``Trainer.fit`` runs (``Trainer._forward`` and
``Trainer._total`` of a real ``Trainer`` with losses ``["mse", "l2"]``, then the loop's
``torch.isfinite(loss)`` check); voxelmorph's is the same sequence written with its own modules
(``VxmPairwise(..., return_warped_source=True, return_field_type="velocity")``,
``neurite.nn.modules.MSE`` and ``SpatialGradient(penalty="l2")``).

Cases (2D, one channel, random uniform images from a fixed seed):

* ``mnist``: batch 32 of 32x32;
* ``brain2d``: batch 8 of 192x160.

Rows per case:

* ``equal arch``: VxmPairwise's default UNet (5 levels of 16 features, one conv per level) with
  ``integration_steps=0``, and voxreg ``VxmDense(nb_features=[[16]*5, [16]*6], int_steps=0)``
  (the same convolutions at the same resolutions; see the README for what still differs);
* ``equal arch, 5 int steps``: VxmPairwise as it ships (``integration_steps=5``, full-resolution
  integration) and voxreg with ``int_steps=5, int_downsize=1``;
* ``voxreg VoxelMorph defaults``: ``VxmDense(inshape)`` as the original VoxelMorph builds it
  (features ``[[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]]``, 7 steps at half resolution).

voxreg is timed in this process (its malloc tuning as the environment sets it, on by default) and,
with ``--malloc both`` (default), again in a subprocess with ``VOXREG_MALLOC_TUNING=0``.
voxelmorph runs in a subprocess of ``.venv-vxm`` with the default allocator, as it ships.
Each row: 3 untimed warm-up steps, then ``--repeats`` timed steps; median and minimum in ms.
``--clock cpu`` (with ``--threads 1``) times each step by the CPU time of the thread that runs it
(``time.thread_time``) instead of the wall clock: on a machine shared with other jobs it counts
only this process's own work, so the two implementations can be compared under load (cache and
memory-bandwidth contention still inflate both a little). ``--interleave`` keeps one process per
implementation (and malloc mode) alive and steps them in turn, one step of every row at a time,
so that bursts of load from other jobs reach all rows alike (``--rounds`` alternates whole runs).
``--profile`` adds a torch.profiler table of voxreg's equal-architecture step and timings of
variants of that step (foreach Adam, channels_last, mkldnn off, no isfinite check, bare loop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_info, format_table, setup_threads, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VXM_PYTHON = ROOT / ".venv-vxm" / "bin" / "python"
CASES = {"mnist": (32, (32, 32)), "brain2d": (8, (192, 160))}
LAMBDA = 0.01
LR = 1e-4
WARMUP = 3
TARGET = 1.5  # voxelmorph / voxreg, equal architecture
VXM_FEATURES = (16, 16, 16, 16, 16)  # VxmPairwise's default
VOXREG_EQUAL = [[16] * 5, [16] * 6]  # the same convolutions in voxreg's Unet layout

# model keys: (label, voxreg kwargs or None) -- voxelmorph keys are handled in vxm_worker
VOXREG_MODELS = {
    "equal": dict(nb_features=VOXREG_EQUAL, int_steps=0),
    "equal_int5": dict(nb_features=VOXREG_EQUAL, int_steps=5, int_downsize=1),
    "defaults": dict(),
}
VXM_MODELS = {"equal": 0, "equal_int5": 5}  # integration_steps
LABELS = {
    "equal": "equal arch (no integration)",
    "equal_int5": "equal arch, 5 int steps full-res",
    "defaults": "voxreg VoxelMorph defaults (7 steps, 1/2 res)",
}


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = CLOCKS["wall"]


def set_clock(name: str) -> None:
    """Time steps by the wall clock (``"wall"``) or by this thread's CPU time (``"cpu"``, only
    meaningful with one intra-op thread)."""
    global _clock
    _clock = CLOCKS[name]


def time_steps(step: Callable[[], Any], repeats: int, warmup: int = WARMUP) -> dict[str, Any]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = _clock()
        step()
        times.append((_clock() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_inputs(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (batch, shape) in CASES.items():
        out[f"{name}/moving"] = torch.rand(batch, 1, *shape, generator=gen)
        out[f"{name}/fixed"] = torch.rand(batch, 1, *shape, generator=gen)
    # a common pair to check that both sides' loss terms are the same functions
    out["check/a"] = torch.rand(4, 2, 24, 20, generator=gen)
    out["check/b"] = torch.rand(4, 2, 24, 20, generator=gen)
    return out


# --------------------------------------------------------------------------------------------
# voxelmorph side (runs in .venv-vxm; imports neither voxreg nor anything of this repo but _common)
# --------------------------------------------------------------------------------------------


def vxm_setup(inputs, cases: list[str], seed: int) -> tuple[dict[str, Callable[[], Any]],
                                                            dict[str, Any]]:
    """voxelmorph's training steps per row ``case/model`` and the row-independent results
    (parameter counts, the loss check, the environment)."""
    import neurite as ne
    import voxelmorph as vxm

    mse, grad = ne.nn.modules.MSE(), ne.nn.modules.SpatialGradient(penalty="l2")
    steps: dict[str, Callable[[], Any]] = {}
    results: dict[str, Any] = {"rows": {}, "params": {}}
    for case in cases:
        moving, fixed = inputs[f"{case}/moving"], inputs[f"{case}/fixed"]
        for key, int_steps in VXM_MODELS.items():
            torch.manual_seed(seed)
            model = vxm.nn.models.VxmPairwise(2, 1, 1, nb_features=VXM_FEATURES,
                                              integration_steps=int_steps)
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=LR)

            def step(model=model, opt=opt, moving=moving, fixed=fixed):
                opt.zero_grad(set_to_none=True)
                field, moved = model(moving, fixed, return_warped_source=True,
                                     return_field_type="velocity")
                loss = mse(moved, fixed) + LAMBDA * grad(field)
                loss.backward()
                opt.step()
                return loss

            steps[f"{case}/{key}"] = step
            results["params"][key] = n_params(model)
    a, b = inputs["check/a"], inputs["check/b"]
    results["loss_check"] = {"mse": float(mse(a, b)), "grad_l2": float(grad(a))}
    info = env_info()
    info["voxelmorph"], info["neurite"] = vxm.__version__, getattr(ne, "__version__", "?")
    results["env"] = info
    return steps, results


def vxm_worker(workdir: Path, repeats: int, threads: int, cases: list[str], seed: int) -> None:
    setup_threads(threads)
    steps, results = vxm_setup(torch.load(workdir / "inputs.pt"), cases, seed)
    for row, step in steps.items():
        results["rows"][row] = time_steps(step, repeats)
    (workdir / "vxm_results.json").write_text(json.dumps(results))


# --------------------------------------------------------------------------------------------
# voxreg side
# --------------------------------------------------------------------------------------------


def voxreg_model(key: str, shape, seed: int):
    from voxreg.nn.networks import VxmDense

    torch.manual_seed(seed)
    return VxmDense(shape, **VOXREG_MODELS[key])


def voxreg_step(model, moving, fixed, *, trainer: bool = True, isfinite: bool = True,
                foreach: bool | None = None) -> Callable[[], torch.Tensor]:
    """One step as Trainer.fit does it (trainer=True), or a bare loop on voxreg.losses."""
    from voxreg import losses as L
    from voxreg.training import Trainer

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=LR, foreach=foreach)
    if trainer:
        tr = Trainer(model, [(moving, fixed)], losses=["mse", "l2"], loss_weights=[1.0, LAMBDA],
                     device="cpu", progress=False, verbose=False)

        def forward():
            return tr._total(tr._forward(moving, fixed, None, None))
    else:
        # the Trainer's rule: Grad on the pre-integration field, times int_downsize
        mult = model.int_downsize if model.int_steps and model.int_downsize > 1 else None

        def forward():
            moved, _disp, field = model(moving, fixed, return_velocity=True)
            reg = L.grad(field, "l2", loss_mult=mult)
            return L.mse(fixed, moved) + LAMBDA * reg

    def step():
        loss = forward()
        if isfinite and not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def voxreg_setup(inputs, cases: list[str], seed: int) -> tuple[dict[str, Callable[[], Any]],
                                                               dict[str, Any]]:
    """voxreg's training steps per row ``case/model`` and the row-independent results."""
    import voxreg
    from voxreg import losses as L
    from voxreg._runtime import allocator_tuned, apply_default_tuning

    steps: dict[str, Callable[[], Any]] = {}
    results: dict[str, Any] = {"rows": {}, "params": {}}
    for case in cases:
        moving, fixed = inputs[f"{case}/moving"], inputs[f"{case}/fixed"]
        shape = tuple(moving.shape[2:])
        for key in VOXREG_MODELS:
            model = voxreg_model(key, shape, seed)
            steps[f"{case}/{key}"] = voxreg_step(model, moving, fixed)
            results["params"][key] = n_params(model)
    a, b = inputs["check/a"], inputs["check/b"]
    results["loss_check"] = {"mse": float(L.mse(a, b)), "grad_l2": float(L.grad(a, "l2"))}
    # what the voxreg command does at start-up (the library itself changes no process state)
    results["malloc_tuned"] = apply_default_tuning() or allocator_tuned()
    results["env"] = env_info()
    results["env"]["voxreg"] = voxreg.__version__
    return steps, results


def voxreg_run(inputs, repeats: int, cases: list[str], seed: int) -> dict[str, Any]:
    steps, results = voxreg_setup(inputs, cases, seed)
    for row, step in steps.items():
        results["rows"][row] = time_steps(step, repeats)
    return results


def voxreg_worker(workdir: Path, repeats: int, threads: int, cases: list[str], seed: int) -> None:
    setup_threads(threads)
    inputs = torch.load(workdir / "inputs.pt")
    results = voxreg_run(inputs, repeats, cases, seed)
    (workdir / "voxreg_results.json").write_text(json.dumps(results))


def run_worker(python: Path, flag: str, workdir: Path, repeats: int, threads: int,
               cases: list[str], seed: int, env_extra: dict[str, str], out_name: str,
               clock: str = "wall"):
    cmd = [str(python), str(Path(__file__).resolve()), flag, str(workdir), "--repeats",
           str(repeats), "--threads", str(threads), "--cases", ",".join(cases), "--seed",
           str(seed), "--clock", clock]
    env = {**os.environ, **env_extra}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {flag} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((workdir / out_name).read_text())


# --------------------------------------------------------------------------------------------
# --interleave: one persistent process per implementation, stepped in turn
# --------------------------------------------------------------------------------------------


def serve(kind: str, workdir: Path, threads: int, cases: list[str], seed: int) -> None:
    """Build ``kind``'s steps ("vxm" or "voxreg"), then run one step per row named on stdin and
    answer its time (``ms <value>``); on ``done`` write the row-independent results."""
    setup_threads(threads)
    inputs = torch.load(workdir / "inputs.pt")
    steps, results = (vxm_setup if kind == "vxm" else voxreg_setup)(inputs, cases, seed)
    print("ready", flush=True)
    for line in sys.stdin:
        row = line.strip()
        if row == "done":
            break
        start = _clock()
        steps[row]()
        print(f"ms {(_clock() - start) * 1e3!r}", flush=True)
    (workdir / f"{kind}_{os.getpid()}.json").write_text(json.dumps(results))


class _Server:
    """A :func:`serve` process seen from the driver."""

    def __init__(self, python: Path, kind: str, workdir: Path, threads: int, cases: list[str],
                 seed: int, clock: str, env_extra: dict[str, str]):
        cmd = [str(python), str(Path(__file__).resolve()), f"--serve-{kind}", str(workdir),
               "--threads", str(threads), "--cases", ",".join(cases), "--seed", str(seed),
               "--clock", clock]
        self.kind, self.workdir = kind, workdir
        self.log = workdir / f"{kind}_{len(list(workdir.glob('*.log')))}.log"
        with open(self.log, "w") as log:  # a file: a full stderr pipe would block the server
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, env={**os.environ, **env_extra})
        self._expect("ready")

    def _stderr(self) -> str:
        return self.log.read_text()[-3000:]

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:  # skip anything the libraries print
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"{self.kind} server ended ({self.proc.wait()}):\n{self._stderr()}")

    def step(self, row: str) -> float:
        self.proc.stdin.write(row + "\n")
        self.proc.stdin.flush()
        return float(self._expect("ms ").split()[1])

    def finish(self) -> dict[str, Any]:
        self.proc.stdin.write("done\n")
        self.proc.stdin.close()
        if self.proc.wait(timeout=60) != 0:
            raise RuntimeError(f"{self.kind} server failed:\n{self._stderr()}")
        return json.loads((self.workdir / f"{self.kind}_{self.proc.pid}.json").read_text())


def run_interleaved(servers: dict[str, _Server], cases: list[str], repeats: int
                    ) -> dict[str, dict[str, Any]]:
    """Warm every row up, then ``repeats`` times: one step of every row on every server in
    turn, so that a change in the machine's load reaches all of them alike."""
    rows = {label: [f"{c}/{k}" for c in cases
                    for k in (VXM_MODELS if srv.kind == "vxm" else VOXREG_MODELS)]
            for label, srv in servers.items()}
    times: dict[str, dict[str, list[float]]] = {label: {r: [] for r in rows[label]}
                                                 for label in servers}
    order = [f"{c}/{k}" for c in cases for k in VOXREG_MODELS]
    for label, srv in servers.items():
        for row in rows[label]:
            for _ in range(WARMUP):
                srv.step(row)
    for _ in range(repeats):
        for row in order:
            for label, srv in servers.items():
                if row in times[label]:
                    times[label][row].append(srv.step(row))
    out = {}
    for label, srv in servers.items():
        res = srv.finish()
        res["rows"] = {r: {"median_ms": statistics.median(t), "min_ms": min(t), "times_ms": t}
                       for r, t in times[label].items()}
        out[label] = res
    return out


# --------------------------------------------------------------------------------------------
# profiling of voxreg's equal-architecture step
# --------------------------------------------------------------------------------------------


def profile_voxreg(inputs, case: str, repeats: int, seed: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    moving, fixed = inputs[f"{case}/moving"], inputs[f"{case}/fixed"]
    shape = tuple(moving.shape[2:])
    model = voxreg_model("equal", shape, seed)
    step = voxreg_step(model, moving, fixed)
    for _ in range(WARMUP):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(f"\ntorch.profiler, voxreg equal-arch step, case {case}, 3 steps, top ops by self CPU:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))

    variants: dict[str, Callable[[], Any]] = {}

    def build(**kw):
        m = voxreg_model("equal", shape, seed)
        return m, voxreg_step(m, moving, fixed, **kw)

    variants["Trainer step (as timed above)"] = build()[1]
    variants["no isfinite check"] = build(isfinite=False)[1]
    variants["bare loop (voxreg.losses, no Trainer)"] = build(trainer=False, isfinite=False)[1]
    variants["Adam foreach=True"] = build(foreach=True)[1]
    m, _ = build()
    m = m.to(memory_format=torch.channels_last)
    variants["channels_last model + inputs"] = voxreg_step(
        m, moving.contiguous(memory_format=torch.channels_last),
        fixed.contiguous(memory_format=torch.channels_last))
    out: dict[str, Any] = {}
    for name, step_fn in variants.items():
        out[name] = time_steps(step_fn, repeats)
    prev = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        out["torch.backends.mkldnn.enabled = False"] = time_steps(build()[1], repeats)
    finally:
        torch.backends.mkldnn.enabled = prev
    rows = [[n, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}"] for n, r in out.items()]
    print(f"voxreg equal-arch step variants, case {case} ({repeats} steps after {WARMUP} warm-up):")
    print(format_table(["variant", "median ms", "min ms"], rows))
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Pool the timed steps of another round into ``old`` (median and min over all of them)."""
    if old is None:
        return new
    for key, row in new["rows"].items():
        times = old["rows"][key]["times_ms"] + row["times_ms"]
        old["rows"][key] = {"median_ms": statistics.median(times), "min_ms": min(times),
                            "times_ms": times}
    return old


def parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown or not cases:
        raise argparse.ArgumentTypeError(f"--cases takes a subset of {','.join(CASES)}, got {text!r}")
    return cases


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per row (default 10)")
    parser.add_argument("--cases", type=parse_cases, default=list(CASES),
                        help="comma-separated subset of mnist,brain2d (default: both)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--vxm-python", type=Path, default=DEFAULT_VXM_PYTHON,
                        help="Python of the environment with voxelmorph (default .venv-vxm)")
    parser.add_argument("--no-vxm", action="store_true", help="time voxreg only")
    parser.add_argument("--malloc", choices=("both", "on", "off"), default="both",
                        help="voxreg's malloc tuning: 'on' times this process as imported, 'off' a "
                             "subprocess with VOXREG_MALLOC_TUNING=0, 'both' (default) both")
    parser.add_argument("--profile", action="store_true",
                        help="profile voxreg's equal-arch step (last case) and time variants")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run voxreg and voxelmorph alternately this many times and pool "
                             "the steps (default 1; use 2-3 on a shared machine)")
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="'wall' (default) or 'cpu': each step's CPU time in the thread "
                             "that runs it, robust to other jobs' load; needs --threads 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interleave", action="store_true",
                        help="keep one process per implementation (and malloc mode) and step "
                             "them in turn, one step of each row at a time, --repeats x "
                             "--rounds times: the fairest comparison on a loaded machine")
    parser.add_argument("--vxm-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-vxm", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-voxreg", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--voxreg-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        parser.error("--repeats and --rounds must be >= 1")
    threads = args.threads or os.cpu_count() or 1
    if args.clock == "cpu" and threads != 1:
        parser.error("--clock cpu counts one thread's CPU time: it needs --threads 1")
    set_clock(args.clock)
    if args.vxm_worker is not None:
        vxm_worker(args.vxm_worker, args.repeats, threads, args.cases, args.seed)
        return 0
    if args.voxreg_worker is not None:
        voxreg_worker(args.voxreg_worker, args.repeats, threads, args.cases, args.seed)
        return 0
    if args.serve_vxm is not None or args.serve_voxreg is not None:
        kind = "vxm" if args.serve_vxm is not None else "voxreg"
        serve(kind, args.serve_vxm or args.serve_voxreg, threads, args.cases, args.seed)
        return 0

    threads = setup_threads(threads)
    started = time.perf_counter()
    load_start = load_avg()
    inputs = make_inputs(args.seed)
    print("voxreg VxmDense vs voxelmorph VxmPairwise: training step (zero_grad + forward + "
          f"MSE + {LAMBDA} * Grad l2 + backward + Adam), 2D, float32, CPU")
    print(f"torch {torch.__version__}, {threads} threads (os.cpu_count() = {os.cpu_count()}), "
          f"{args.repeats} timed steps after {WARMUP} warm-up x {args.rounds} round(s)"
          f"{' interleaved step by step' if args.interleave else ''}, "
          f"seed {args.seed}, {args.clock} clock; "
          f"load average at start {load_start}")

    voxreg_res: dict[str, dict[str, Any]] = {}
    vxm_res, vxm_note = None, None
    env_on = os.environ.get("VOXREG_MALLOC_TUNING", "1").strip().lower() not in (
        "0", "false", "no", "off")
    modes = {"both": ["on", "off"], "on": ["on"], "off": ["off"]}[args.malloc]
    if args.no_vxm:
        vxm_note = "voxelmorph skipped (--no-vxm)"
    elif not args.vxm_python.exists():
        vxm_note = (f"voxelmorph skipped: {args.vxm_python} not found (create it with "
                    "`bash benchmarks/setup_vxm_env.sh`, or pass --vxm-python)")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        torch.save(inputs, workdir / "inputs.pt")
        if args.interleave:
            servers: dict[str, _Server] = {}
            try:
                for mode in modes:
                    servers[mode] = _Server(Path(sys.executable), "voxreg", workdir, threads,
                                            args.cases, args.seed, args.clock,
                                            {"VOXREG_MALLOC_TUNING": "1" if mode == "on" else "0"})
                if vxm_note is None:
                    try:
                        servers["vxm"] = _Server(args.vxm_python, "vxm", workdir, threads,
                                                 args.cases, args.seed, args.clock, {})
                    except RuntimeError as exc:
                        vxm_note = f"voxelmorph skipped: {exc}"
                interleaved = run_interleaved(servers, args.cases, args.repeats * args.rounds)
            finally:
                for srv in servers.values():
                    if srv.proc.poll() is None:
                        srv.proc.kill()
            vxm_res = interleaved.pop("vxm", None)
            voxreg_res = interleaved
        else:
            for _ in range(args.rounds):  # alternate the implementations so load hits them alike
                for mode in modes:
                    if (mode == "on") == env_on:  # this process already has that allocator
                        res = voxreg_run(inputs, args.repeats, args.cases, args.seed)
                    else:
                        res = run_worker(Path(sys.executable), "--voxreg-worker", workdir,
                                         args.repeats, threads, args.cases, args.seed,
                                         {"VOXREG_MALLOC_TUNING": "1" if mode == "on" else "0"},
                                         "voxreg_results.json", args.clock)
                    voxreg_res[mode] = merge(voxreg_res.get(mode), res)
                if vxm_note is None:
                    try:
                        res = run_worker(args.vxm_python, "--vxm-worker", workdir, args.repeats,
                                         threads, args.cases, args.seed, {}, "vxm_results.json",
                                         args.clock)
                        vxm_res = merge(vxm_res, res)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        vxm_note = f"voxelmorph skipped: {exc}"
                        vxm_res = None

    for mode, res in voxreg_res.items():
        print(f"voxreg {res['env']['voxreg']} [malloc {mode}]: tuning in effect = "
              f"{res['malloc_tuned']}")
    if vxm_res:
        e = vxm_res["env"]
        print(f"voxelmorph {e['voxelmorph']}, neurite {e['neurite']} (torch {e['torch']}, "
              f"{e['threads']} threads, default malloc) via {args.vxm_python}")

    # parameter counts
    any_res = next(iter(voxreg_res.values()))
    print("\nparameters:")
    prow = []
    for key in VOXREG_MODELS:
        vp = vxm_res["params"].get(key) if vxm_res else None
        vr = any_res["params"][key]
        prow.append([LABELS[key], vr, "" if vp is None else vp,
                     "" if vp is None else f"{vr - vp:+d}"])
    print(format_table(["model", "voxreg", "voxelmorph", "voxreg - vxm"], prow))

    rows, records = [], []
    for case in args.cases:
        batch, shape = CASES[case]
        case_label = f"{case} (b{batch}, {shape[0]}x{shape[1]})"
        for key in VOXREG_MODELS:
            vt = vxm_res["rows"].get(f"{case}/{key}") if vxm_res else None
            if vt:
                rows.append([case_label, LABELS[key], "voxelmorph", f"{vt['median_ms']:.1f}",
                             f"{vt['min_ms']:.1f}", ""])
                records.append({"case": case, "model": key, "impl": "voxelmorph", **vt})
            ref = vt or (vxm_res["rows"].get(f"{case}/equal") if vxm_res else None)
            for mode, res in voxreg_res.items():
                t = res["rows"][f"{case}/{key}"]
                ratio = ref["median_ms"] / t["median_ms"] if ref else None
                rows.append([case_label, LABELS[key], f"voxreg malloc {mode}",
                             f"{t['median_ms']:.1f}", f"{t['min_ms']:.1f}",
                             "" if ratio is None else f"{ratio:.2f}x"])
                records.append({"case": case, "model": key, "impl": f"voxreg malloc {mode}",
                                "speedup_vs_vxm": ratio, **t})
    print()
    print(format_table(["case", "model", "implementation", "median ms", "min ms", "vxm/voxreg"],
                       rows, left=3))
    print("\nvxm/voxreg = voxelmorph median / voxreg median (> 1: voxreg faster), against the "
          "voxelmorph row of the same model; the 'VoxelMorph defaults' row is compared with "
          "voxelmorph's equal-arch (no integration) row.")
    if vxm_note:
        print(vxm_note)
    else:
        for mode, res in voxreg_res.items():
            lc, vc = res["loss_check"], vxm_res["loss_check"]
            print(f"loss check [malloc {mode}]: mse {lc['mse']:.6f} vs {vc['mse']:.6f}, grad l2 "
                  f"{lc['grad_l2']:.6f} vs {vc['grad_l2']:.6f} (voxreg vs neurite, same tensors)")
            break
        print(f"target (equal arch, no integration): voxreg >= {TARGET}x faster")
        for r in records:
            if r["model"] == "equal" and r.get("speedup_vs_vxm") is not None:
                ok = r["speedup_vs_vxm"] >= TARGET
                print(f"  {r['case']}, {r['impl']}: {r['speedup_vs_vxm']:.2f}x "
                      f"({'met' if ok else 'NOT met'})")

    prof = None
    if args.profile:
        prof = profile_voxreg(inputs, args.cases[-1], args.repeats, args.seed)
    elapsed = time.perf_counter() - started
    print(f"\nload average at end {load_avg()}; total {elapsed:.0f} s")

    if args.json:
        result = {
            "cases": {c: {"batch": CASES[c][0], "shape": list(CASES[c][1])} for c in args.cases},
            "repeats": args.repeats, "rounds": args.rounds, "warmup": WARMUP, "lambda": LAMBDA, "lr": LR,
            "clock": args.clock,
            "seed": args.seed, "load_avg_start": load_start, "load_avg_end": load_avg(),
            "env": env_info(), "voxreg": voxreg_res, "vxm": vxm_res, "vxm_note": vxm_note,
            "rows": records, "profile_variants": prof, "elapsed_s": elapsed,
        }
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
