"""Evaluate a model on labelled pairs of files: the pipeline of ``voxreg eval``."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from voxreg import io, metrics, transforms
from voxreg._runtime import resolve_device
from voxreg.apps.files import (
    ModelLike,
    fit_rank,
    grid_error,
    mean_sd,
    model_normalize,
    onto_grid,
    prepare_pair,
    read_pairs,
    resolve_model,
    write_csv,
)
from voxreg.registration import model_ndim
from voxreg.registration import register as run_register

__all__ = ["PAIR_RESULT_COLUMNS", "STRUCTURE_COLUMNS", "SUMMARY_KEYS", "EvalResult",
           "evaluate_pairs"]

#: Columns of the per-pair table (:attr:`EvalResult.pairs`).
PAIR_RESULT_COLUMNS = ["pair", "moving", "fixed", "mean_dice_before", "mean_dice", "mean_hd95_mm",
                       "folding_percent", "sd_log_jac", "seconds_per_pair", "labels"]
#: Columns of the per-structure table (:attr:`EvalResult.structures`).
STRUCTURE_COLUMNS = ["pair", "moving", "fixed", "label", "dice_before", "dice", "hd95_mm"]
#: The per-pair values summarised over pairs (:attr:`EvalResult.summary`).
SUMMARY_KEYS = ("mean_dice_before", "mean_dice", "mean_hd95_mm", "folding_percent", "sd_log_jac",
                "seconds_per_pair")


@dataclass
class EvalResult:
    """What :func:`evaluate_pairs` returns.

    Attributes:
        pairs: one dict per pair with the keys :data:`PAIR_RESULT_COLUMNS` (Dice before and after
            registration averaged over the structures, HD95 in mm averaged over them, % of
            voxels with ``det J <= 0``, SD of ``log det J``, seconds per pair, label count).
        structures: one dict per pair and structure with the keys :data:`STRUCTURE_COLUMNS`.
        device: where the model ran.
        out, structures_out: the CSV files written, or ``None``.
    """

    pairs: list[dict[str, Any]]
    structures: list[dict[str, Any]]
    device: torch.device
    out: Path | None = None
    structures_out: Path | None = None

    @property
    def summary(self) -> dict[str, str]:
        """``"mean ± sd"`` over the pairs of each of :data:`SUMMARY_KEYS`."""
        return {key: mean_sd([row[key] for row in self.pairs]) for key in SUMMARY_KEYS}


def _nanmean(values) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def evaluate_pairs(
    model: ModelLike,
    pairs: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    out: str | os.PathLike | None = None,
    labels: Sequence[int] | None = None,
    no_hd95: bool = False,
    resample: bool = False,
    normalize: Literal["percentile", "minmax", "none"] | None = None,
    device: str | torch.device = "auto",
    on_pair: Callable[[dict[str, Any]], Any] | None = None,
) -> EvalResult:
    """Register labelled pairs with a model and score them, as ``voxreg eval`` does.

    Each pair is prepared as :func:`voxreg.apps.register.register_files` prepares it (grid check
    or ``resample``, normalisation, rank), registered by the network alone, and its moving label
    map warped (nearest) with the displacement; Dice (:func:`voxreg.metrics.dice`) is taken
    before and after, HD95 in mm with the fixed image's voxel sizes, and the Jacobian statistics
    of the displacement (:func:`voxreg.metrics.jacobian_stats`).

    Args:
        model: a checkpoint file, a shipped model name or a registration module.
        pairs: a CSV file with the columns ``moving,fixed,moving_labels,fixed_labels`` (paths
            relative to its folder), or a sequence of such mappings
            (:func:`voxreg.apps.files.read_pairs`).
        out: per-pair CSV to write (``None``: nothing written); the per-structure CSV goes next
            to it as ``<stem>_structures.csv``. Both are written atomically at the end.
        labels: the labels to score (default: every non-zero label of either map of a pair).
        no_hd95: skip the Hausdorff distances (NaN in the tables).
        resample: resample moving images (linear) and labels (nearest) onto the fixed grid when
            the grids differ.
        normalize: as for ``register_files`` (default: the model's training setting).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``... or a :class:`torch.device`.
        on_pair: called with each pair's row (a dict of :data:`PAIR_RESULT_COLUMNS`) as soon as
            it is scored.

    Returns:
        An :class:`EvalResult` (per-pair and per-structure rows, ``summary``).

    Raises:
        FileNotFoundError: the pairs file, a file it names, or the model is missing.
        ValueError: a malformed pairs table, ``out`` not a ``.csv`` (or an input), fixed labels
            off the fixed image's grid, different grids without ``resample``.

    >>> result = evaluate_pairs("brain2d-smooth", "pairs.csv", out="eval.csv")  # doctest: +SKIP
    >>> result.summary["mean_dice"]  # doctest: +SKIP
    '0.61 ± 0.05'
    """
    rows = read_pairs(pairs)
    out_path = struct_path = None
    if out is not None:
        out_path = Path(out)
        if not out_path.name.lower().endswith(".csv"):
            raise ValueError(f"--out must be a .csv file, got {str(out)!r}")
        struct_path = out_path.with_name(out_path.stem + "_structures.csv")
        table = (pairs,) if isinstance(pairs, (str, os.PathLike)) else ()
        all_inputs = tuple([*table] + [r[c] for r in rows for c in r])
        for path in (out_path, struct_path):
            io.check_output_file(path, all_inputs)
    dev = resolve_device(device)
    net = resolve_model(model, dev)
    ndim = model_ndim(net)
    method = model_normalize(net, normalize)

    pair_rows: list[dict[str, Any]] = []
    struct_rows: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        mov, fix = prepare_pair(row["moving"], row["fixed"], resample, method, ndim)
        mov_seg = io.load_labels(row["moving_labels"])
        fix_seg = io.load_labels(row["fixed_labels"])
        fit_rank(mov_seg, ndim, "moving labels")
        fit_rank(fix_seg, ndim, "fixed labels")
        if not io.same_grid(fix_seg, fix):
            raise ValueError(grid_error(fix_seg, fix, "fixed labels", "fixed image"))
        mov_seg = onto_grid(mov_seg, fix, "moving labels", "fixed image", resample, "nearest")
        _, disp, seconds = run_register(net, mov.data, fix.data, device=dev, return_time=True)
        disp_np = np.asarray(disp, dtype=np.float32)
        seg_t = torch.from_numpy(np.ascontiguousarray(mov_seg.data))[None, None]
        warped = transforms.warp(seg_t, torch.from_numpy(disp_np)[None], interp="nearest")[0, 0].numpy()
        scored = list(labels) if labels is not None else [
            int(v) for v in np.union1d(np.unique(mov_seg.data), np.unique(fix_seg.data)) if v != 0]
        before = metrics.dice(mov_seg.data, fix_seg.data, scored)
        after = metrics.dice(warped, fix_seg.data, scored)
        hd = {}
        for label in scored:
            hd[label] = float("nan") if no_hd95 else metrics.hausdorff95(
                warped, fix_seg.data, label, fix.spacing)
            struct_rows.append({"pair": index, "moving": row["moving"], "fixed": row["fixed"],
                                "label": label, "dice_before": before[label],
                                "dice": after[label], "hd95_mm": hd[label]})
        jac = metrics.jacobian_stats(disp_np)
        pair_rows.append({
            "pair": index, "moving": row["moving"], "fixed": row["fixed"],
            "mean_dice_before": _nanmean(before.values()), "mean_dice": _nanmean(after.values()),
            "mean_hd95_mm": _nanmean(hd.values()), "folding_percent": jac["folding_percent"],
            "sd_log_jac": jac["sd_log_jac"], "seconds_per_pair": seconds, "labels": len(scored),
        })
        if on_pair is not None:
            on_pair(pair_rows[-1])

    if out_path is not None:
        write_csv(out_path, pair_rows, PAIR_RESULT_COLUMNS)
        write_csv(struct_path, struct_rows, STRUCTURE_COLUMNS)
    return EvalResult(pair_rows, struct_rows, dev, out_path, struct_path)
