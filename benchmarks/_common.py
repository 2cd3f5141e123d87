"""Shared helpers for the benchmarks: timing, thread setup, environment description, tables.

This module imports only the standard library and torch, so it can also be imported by a
benchmark's worker running in another environment (e.g. ``.venv-vxm`` with the official
voxelmorph), where voxreg is not installed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def setup_threads(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (default: all cores) and return the number in force."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Time ``fn()`` under ``torch.no_grad()``: ``warmup`` untimed calls, then ``repeats`` timed.

    Returns ``{"median_ms", "min_ms", "times_ms", "result"}``, ``result`` being the last call's
    return value (for checking outputs without recomputing them).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    result = None
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            result = fn()
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "times_ms": times,
        "result": result,
    }


def env_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A plain-text table; the first ``left`` columns left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def write_json(path, result: dict[str, Any]) -> None:
    """Write a benchmark's results as indented JSON (the folder is created) and say where."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
