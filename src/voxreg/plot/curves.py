"""Training curves: :func:`history` draws one line per term from a dict of lists, a list of
per-epoch dicts or a CSV file.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from voxreg.plot.figures import (
    new_figure,
    save_figure,
    to_numpy,
)

__all__ = ["history"]


def _number(text: object) -> float | None:
    """A float from a CSV cell or a value (empty -> nan); None when it is not a number."""
    if text is None:
        return math.nan
    if isinstance(text, torch.Tensor):
        text = text.detach().cpu().item() if text.numel() == 1 else text
    if isinstance(text, str):
        text = text.strip()
        if text == "":
            return math.nan
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _columns(rows: Sequence[Mapping], name: str) -> dict[str, list[float]]:
    """Numeric columns of a list of row mappings (missing/empty -> nan; text columns dropped)."""
    keys: list[str] = []
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"{name} rows must be mappings, got {type(row).__name__}")
        keys.extend(k for k in row if k not in keys)
    columns: dict[str, list[float]] = {}
    for key in keys:
        values = [_number(row.get(key)) for row in rows]
        if all(v is not None for v in values):
            columns[str(key)] = values  # type: ignore[assignment]
    return columns


def _read_history(history: object) -> dict[str, list[float]]:
    name = "history"
    if isinstance(history, (str, os.PathLike)):
        path = Path(history)
        if not path.is_file():
            raise ValueError(f"history file not found: {path}")
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        columns = _columns(rows, name)
    elif isinstance(history, Mapping):
        columns = {}
        for key, values in history.items():
            if isinstance(values, (torch.Tensor, np.ndarray)):
                values = to_numpy(values, f"history[{key!r}]").ravel().tolist()
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(f"history[{key!r}] must be a sequence of numbers")
            numbers = [_number(v) for v in values]
            if any(v is None for v in numbers):
                raise ValueError(f"history[{key!r}] must hold numbers")
            columns[str(key)] = numbers  # type: ignore[assignment]
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        columns = _columns(list(history), name)
    else:
        raise ValueError(
            "history must be a dict of lists, a list of dicts or a CSV path, "
            f"got {type(history).__name__}"
        )
    if not columns or all(len(v) == 0 for v in columns.values()):
        raise ValueError("history holds no numeric column")
    return columns


def history(
    history: object,
    log: bool = False,
    keys: Sequence[str] | None = None,
    title: str | None = None,
    width: float = 7.0,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Training curves: one labelled line per term.

    Args:
        history: a dict of lists (``{"loss": [...], "sim": [...]}``), a list of dicts (one per
            epoch, as a training loop logs them) or the path of a CSV file with a header row
            (one column per term). An ``epoch`` column/key (also ``step`` or ``iteration``),
            if present, gives the x axis; otherwise x is 0, 1, 2, ... Text columns are ignored,
            empty cells are gaps.
        log: logarithmic y axis.
        keys: the terms to draw (default: every numeric column but the x one).
        title: axes title.
        width: figure width in inches.
        save: write a PNG there.

    Returns:
        The figure, with one axes holding one line per term (labelled, with a legend).
    """
    columns = _read_history(history)
    x_key = next((k for k in ("epoch", "step", "iteration") if k in columns), None)
    x_values = columns.get(x_key) if x_key else None
    terms = [k for k in columns if k != x_key]
    if keys is not None:
        if isinstance(keys, str):
            keys = [keys]
        missing = [k for k in keys if k not in terms]
        if missing:
            raise ValueError(f"keys {missing} not in history (terms: {terms})")
        terms = list(keys)
    if not terms:
        raise ValueError("history holds no term to plot besides the x axis")
    fig, axes = new_figure(1, 1, width, 0.6)
    ax = axes[0, 0]
    for key in terms:
        values = np.asarray(columns[key], dtype=np.float64)
        if x_values is not None:
            if len(x_values) != len(values):
                raise ValueError(
                    f"history[{key!r}] has {len(values)} values but {x_key!r} has {len(x_values)}"
                )
            xs = np.asarray(x_values, dtype=np.float64)
        else:
            xs = np.arange(len(values), dtype=np.float64)
        ax.plot(xs, values, label=key, marker="." if len(values) < 30 else None)
    ax.set_xlabel(x_key or "epoch")
    ax.set_ylabel("value")
    if log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title is not None:
        ax.set_title(str(title))
    return save_figure(fig, save)
