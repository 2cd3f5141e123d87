"""The training engine: one run loop shared by every trainer.

:class:`Engine` owns a training run: Adam on the model's parameters, the epoch loop (per-epoch
seeds, progress bar, one verbose line per epoch, non-finite loss detection), the time budget, the
history (one row per epoch: ``epoch``, ``step``, the mean ``loss`` and terms, the trainer's own
metrics, ``seconds``), the run folder and resume. A trainer subclasses it and supplies its batches
(:meth:`~Engine.begin_epoch`), the loss of one batch (:meth:`~Engine.step_loss`), its per-epoch
metrics (:meth:`~Engine.epoch_metrics`), its settings (:meth:`~Engine.settings`) and any extra
output (:meth:`~Engine.write_extras`).

A run folder (``out_dir``) holds ``history.csv`` (rewritten after every epoch), ``loss.png`` (the
curves, redrawn with the checkpoints), ``checkpoint.safetensors`` (model, optimizer, ``step``,
``epoch``, history and the trainer's settings; every ``checkpoint_every`` epochs and at the end;
what ``resume`` reads) and ``model.safetensors`` (the final model, at the end).
"""

from __future__ import annotations

import csv
import math
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from voxreg import _checks, plot
from voxreg._atomic import atomic_path
from voxreg._runtime import resolve_device
from voxreg.checkpoint import load_checkpoint, save_model

__all__ = [
    "CHECKPOINT_NAME",
    "HISTORY_NAME",
    "MODEL_NAME",
    "PLOT_NAME",
    "Engine",
    "budget_spent",
    "epoch_indices",
    "epoch_seed",
    "plot_history",
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


def epoch_indices(n: int, steps: int, batch_size: int, seed: int, epoch: int,
                  stream: int) -> np.ndarray:
    """``(steps, batch_size)`` indices into ``n`` items for one epoch: consecutive random
    permutations, fixed by ``seed``, ``epoch`` and ``stream`` (a constant per trainer)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)])
    need = steps * batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])
    return order[:need].reshape(steps, batch_size)


def budget_spent(budget: float | None, started: bool, tic: float, slowest: float) -> bool:
    """Whether a time-budgeted run should start no new epoch: at least one epoch has run
    (``started``) and the time since ``tic`` (``time.perf_counter()``) plus the slowest epoch so
    far would pass ``budget`` seconds."""
    return (budget is not None and started
            and time.perf_counter() - tic + slowest > budget)


class Engine:
    """A training run; subclass it and supply the hooks below, then call :meth:`fit`.

    Args (keyword-only; the trainers take them as their own arguments):
        model: the module to train (moved to ``device``; Adam on all its parameters).
        epochs: total number of epochs (a resumed run continues up to it).
        lr: Adam learning rate.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``... (see
            :func:`voxreg._runtime.resolve_device`).
        seed: seeds torch's RNG at each epoch (and the trainers' batch order).
        out_dir: the run folder (see the module doc); ``None`` writes nothing.
        checkpoint_every: also checkpoint every this many epochs (``None``: only at the end).
        resume: ``True`` continues from ``out_dir/checkpoint.safetensors`` when there is one (a
            fresh start otherwise), or give a checkpoint path (which must exist). The model,
            optimizer, ``step``, ``epoch`` and history are restored; the run then goes on up to
            ``epochs``. A watched setting (:attr:`WATCHED`) that differs from the checkpoint's
            gives a warning, as does data whose batches cannot be replayed (:attr:`replayable`).
        time_budget: seconds: no new epoch is started once the time spent plus the slowest epoch
            so far would pass it (at least one epoch runs); the run then ends as after its last
            epoch, with a checkpoint and the final model, and can be resumed.
        progress: show a tqdm bar per epoch.
        verbose: print one line per epoch (and the resume and budget notes).
        metadata: stored in the checkpoints, next to ``"training"``: :meth:`settings`.

    A subclass sets ``steps_per_epoch`` (the progress bar's length) and supplies
    :meth:`begin_epoch` and :meth:`step_loss`; optionally :meth:`epoch_metrics`,
    :meth:`settings`, :meth:`write_extras`, :meth:`curves`, :attr:`replayable`, :attr:`WATCHED`
    and :attr:`PLOT_EVERY`.

    Attributes after :meth:`fit`: ``history`` (list of per-epoch dicts), ``optimizer``, ``step``
    (optimizer steps taken), ``epoch`` (epochs completed).

    Raises:
        ValueError: for an invalid argument, or ``resume=True`` without ``out_dir``.
        FileNotFoundError: (in :meth:`fit`) when ``resume`` names a checkpoint that is not there.
        FloatingPointError: (in :meth:`fit`) when the loss of a step is not finite.
    """

    #: the settings whose change since the checkpoint makes a resumed run differ (a warning)
    WATCHED: tuple[str, ...] = ("batch_size", "steps_per_epoch", "seed", "lr")
    #: seconds between drawings of ``loss.png`` on the way (0: with every checkpoint)
    PLOT_EVERY: float = 0.0
    steps_per_epoch: int

    def __init__(self, model: nn.Module, *, epochs: int, lr: float,
                 device: str | torch.device | None, seed: int, out_dir: str | os.PathLike | None,
                 checkpoint_every: int | None, resume: bool | str | os.PathLike,
                 time_budget: float | None, progress: bool, verbose: bool,
                 metadata: dict[str, Any] | None):
        self.epochs = _checks.positive_int(epochs, "epochs")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
                math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.checkpoint_every = (None if checkpoint_every is None
                                 else _checks.positive_int(checkpoint_every, "checkpoint_every"))
        if resume and out_dir is None and not isinstance(resume, (str, os.PathLike)):
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")
        if time_budget is not None and (isinstance(time_budget, bool) or not (
                isinstance(time_budget, (int, float)) and time_budget > 0)):
            raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget!r}")
        self.model = model
        self.lr = float(lr)
        self.device = resolve_device(device)
        self.seed = int(seed)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.resume = resume
        self.time_budget = time_budget
        self.progress = progress
        self.verbose = verbose
        self.metadata = dict(metadata or {})
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.epoch = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self._plotted = time.perf_counter()

    # -- the hooks -------------------------------------------------------------------------------

    def begin_epoch(self, epoch: int) -> Iterable[Any]:
        """Start epoch ``epoch`` (0-based; torch is seeded and the model in train mode): reset
        any per-epoch state and return the epoch's batches (``steps_per_epoch`` of them)."""
        raise NotImplementedError

    def step_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, terms)`` of one batch: the scalar to minimise and the terms to log (their
        epoch means enter the history). The engine checks, back-propagates and steps."""
        raise NotImplementedError

    def epoch_metrics(self) -> dict[str, float]:
        """Values added to the epoch's history row after the mean losses (e.g. validation)."""
        return {}

    def settings(self) -> dict[str, Any]:
        """The training settings stored in the checkpoints' metadata (``"training"``) and
        compared, for the :attr:`WATCHED` ones, on resume."""
        return {}

    def write_extras(self, end: bool) -> None:
        """Extra run-folder output: called after each epoch's ``history.csv`` (``end=False``) and
        once at the end of the run, after the final checkpoint (``end=True``); only with
        ``out_dir``."""

    def curves(self) -> list[dict[str, Any]]:
        """The rows drawn into ``loss.png`` (default: the whole history)."""
        return self.history

    @property
    def replayable(self) -> bool:
        """Whether a resumed run sees exactly the batches an uninterrupted one would."""
        return True

    # -- the run ---------------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """Train for ``epochs`` epochs (in total, counting those of a resumed checkpoint), or
        until the time budget; return the history. The model is left in eval mode."""
        model = self.model.to(self.device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._resume()
        start = self.epoch
        tic_all = time.perf_counter()
        slowest = 0.0
        saved = False
        for epoch in range(start, self.epochs):
            if budget_spent(self.time_budget, epoch > start, tic_all, slowest):
                self._log(f"time budget of {self.time_budget:.0f} s reached after epoch {epoch}")
                break
            row = self._run_epoch(epoch)
            slowest = max(slowest, row["seconds"])
            self.history.append(row)
            self.epoch = epoch + 1
            self._log(self._line(row))
            saved = False
            if self.out_dir is not None:
                write_history(self.history, self.out_dir / HISTORY_NAME)
                self.write_extras(end=False)
                last = self.epoch == self.epochs
                if last or (self.checkpoint_every and self.epoch % self.checkpoint_every == 0):
                    self.checkpoint(final=last)
                    saved = last
        if self.out_dir is not None:
            # the end of the run (all epochs done before, or the time budget): checkpoint and
            # the final model, unless just written
            if not saved:
                self.checkpoint(final=True)
            self.write_extras(end=True)
        model.eval()
        return self.history

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        torch.manual_seed(epoch_seed(self.seed, epoch))
        self.model.train()
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        tic = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, disable=not self.progress, leave=False,
                   desc=f"epoch {epoch + 1}/{self.epochs}", dynamic_ncols=True)
        for batch in self.begin_epoch(epoch):
            loss, terms = self.step_loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {self.step + 1}; "
                    "lower lr or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            values = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
            for k, v in values.items():  # summed on the device: no sync per step
                sums[k] = sums[k] + v if k in sums else v.clone()
                counts[k] = counts.get(k, 0) + 1
            bar.update(1)
            if self.progress and (self.step % 10 == 0 or counts["loss"] == 1):
                bar.set_postfix(loss=f"{values['loss'].item():.4g}")
        bar.close()
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.step}
        row.update({k: float(v) / counts[k] for k, v in sums.items()})
        row.update(self.epoch_metrics())
        row["seconds"] = round(time.perf_counter() - tic, 3)
        return row

    def checkpoint(self, final: bool = False) -> None:
        """Write ``checkpoint.safetensors`` (and with ``final`` also ``model.safetensors``) into
        ``out_dir``, and redraw ``loss.png`` (at the end, else at most every
        :attr:`PLOT_EVERY` seconds)."""
        if self.out_dir is None:
            return
        meta = {**self.metadata, "training": self.settings()}
        save_model(self.model, self.out_dir / CHECKPOINT_NAME, metadata=meta,
                   optimizer=self.optimizer, step=self.step, epoch=self.epoch,
                   history=self.history)
        if final:
            save_model(self.model, self.out_dir / MODEL_NAME, metadata=meta, step=self.step,
                       epoch=self.epoch, history=self.history)
        if self.history and (final or not self.PLOT_EVERY
                             or time.perf_counter() - self._plotted > self.PLOT_EVERY):
            self._plotted = time.perf_counter()
            plot_history(self.curves(), self.out_dir / PLOT_NAME)

    def _resume(self) -> None:
        explicit = isinstance(self.resume, (str, os.PathLike))
        path = Path(self.resume) if explicit else self.out_dir / CHECKPOINT_NAME
        if not path.is_file():
            if explicit:
                raise FileNotFoundError(f"resume: no checkpoint at {path}")
            self._log(f"resume: no checkpoint in {self.out_dir}; starting from scratch")
            return
        ckpt = load_checkpoint(path, device=self.device, model=self.model)
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.step = int(ckpt.step or 0)
        self.epoch = int(ckpt.epoch or 0)
        self.history = list(ckpt.history or [])
        old = (ckpt.metadata or {}).get("training", {})
        now = self.settings()
        changed = [k for k in self.WATCHED if k in old and old[k] != now[k]]
        if changed:
            warnings.warn(f"resuming with different {', '.join(changed)} than the checkpoint's: "
                          "the run will not match an uninterrupted one", stacklevel=3)
        if not self.replayable and self.epoch:
            warnings.warn("resuming from a generator: the batches cannot be replayed, so the run "
                          "will differ from an uninterrupted one (use a Dataset for exact resume)",
                          stacklevel=3)
        self._log(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

    def _log(self, line: str) -> None:
        if self.verbose:
            print(line, flush=True)

    def _line(self, row: dict[str, Any]) -> str:
        parts = [f"epoch {row['epoch']}/{self.epochs}"]
        parts += [f"{k}: {v:.4g}" for k, v in row.items()
                  if k not in ("epoch", "step", "seconds") and isinstance(v, float)]
        parts.append(f"({row['seconds']:.2f} s)")
        return "  ".join(parts)
