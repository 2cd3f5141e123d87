"""The training engine shared by every trainer: run-folder files, history, loss curves,
checkpoint restore, per-epoch seeds and the time budget.

A run folder holds ``history.csv`` (one row per epoch), ``loss.png`` (the curves),
``checkpoint.safetensors`` (model, optimizer, counters and history; what ``resume`` reads) and
``model.safetensors`` (the final model alone).
"""

from __future__ import annotations

import csv
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from voxreg import plot
from voxreg._atomic import atomic_path
from voxreg.checkpoint import load_checkpoint

__all__ = [
    "CHECKPOINT_NAME",
    "HISTORY_NAME",
    "MODEL_NAME",
    "PLOT_NAME",
    "budget_spent",
    "epoch_seed",
    "plot_history",
    "restore",
    "write_history",
]

CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_NAME = "model.safetensors"
HISTORY_NAME = "history.csv"
PLOT_NAME = "loss.png"


def write_history(history: list[dict[str, Any]], path: Path) -> None:
    """Write the per-epoch rows as CSV (atomically; columns in order of first appearance)."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in columns})


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss curves, one line per loss term (log scale when all values are positive)."""
    skip = {"epoch", "step", "seconds", "lr"}
    keys: list[str] = []
    for row in history:
        keys += [k for k, v in row.items() if k not in skip and k not in keys
                 and isinstance(v, (int, float))]
    values = [row[k] for row in history for k in keys if k in row]
    positive = bool(values) and all(v > 0 for v in values if v == v)
    plot.history(history, log=positive, keys=keys or None, save=path)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's batch order, from the run's seed and the epoch number."""
    return int(np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 11]).integers(2**62))


def budget_spent(budget: float | None, started: bool, tic: float, slowest: float) -> bool:
    """Whether a time-budgeted run should start no new epoch: at least one epoch has run
    (``started``) and the time since ``tic`` (``time.perf_counter()``) plus the slowest epoch so
    far would pass ``budget`` seconds."""
    return (budget is not None and started
            and time.perf_counter() - tic + slowest > budget)


def restore(run: Any, watched: Sequence[str]) -> Path | None:
    """Load a run's checkpoint into it (model, optimizer, ``step``, ``epoch``, ``history``).

    ``run`` is a :class:`Trainer` or any trainer with the same ``resume``, ``out_dir``,
    ``device``, ``model``, ``optimizer``, ``_settings()`` and ``_log()``. Returns the checkpoint
    path, or ``None`` when ``resume=True`` finds none (a fresh start); an explicit path that does
    not exist raises. Warns when a ``watched`` training setting differs from the checkpoint's.
    """
    explicit = isinstance(run.resume, (str, os.PathLike))
    path = Path(run.resume) if explicit else run.out_dir / CHECKPOINT_NAME
    if not path.is_file():
        if explicit:
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        run._log(f"resume: no checkpoint in {run.out_dir}; starting from scratch")
        return None
    ckpt = load_checkpoint(path, device=run.device, model=run.model)
    if ckpt.optimizer_state is not None:
        run.optimizer.load_state_dict(ckpt.optimizer_state)
    run.step = int(ckpt.step or 0)
    run.epoch = int(ckpt.epoch or 0)
    run.history = list(ckpt.history or [])
    old = (ckpt.metadata or {}).get("training", {})
    now = run._settings()
    changed = [k for k in watched if k in old and old[k] != now[k]]
    if changed:
        warnings.warn(f"resuming with different {', '.join(changed)} than the checkpoint's: "
                      "the run will not match an uninterrupted one", stacklevel=4)
    return path
