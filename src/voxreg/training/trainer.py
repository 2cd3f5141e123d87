"""Pairwise registration training (VoxelMorph's unsupervised and semi-supervised losses).

:func:`train` (or :class:`Trainer`) fits a model that maps ``(moving, fixed)`` to
``(moved, disp)`` (``(moved, moved_fixed, disp)`` when bidirectional) with Adam, on the loss terms
of VoxelMorph, in this order:

==========================  ==================================================================
``transformer_loss``        image loss ``(fixed, moved)``
``neg_transformer_loss``    bidirectional models only: image loss ``(moving, moved_fixed)``
``flow_loss``               regulariser ``(zeros, field)`` on the pre-integration velocity
                            (``reg_on="velocity"``, VoxelMorph's choice, when the model can return
                            it) or on the displacement (``reg_on="disp"``)
``seg_loss``                only when the data carry label maps: loss ``(fixed_onehot,
                            warp(moving_onehot, disp))``, e.g. Dice (optionally on a grid
                            ``seg_downsize`` times coarser, and on a subset ``seg_labels``)
==========================  ==================================================================

``loss`` is the weighted sum; the terms are logged unweighted (as Keras does). An image term
given as ``None`` or with weight 0 is not computed at all (nor logged): SynthMorph-style training
(images never used as targets) is ``losses=[None, "grad", "dice"]``, ``loss_weights=[0, lambda,
1]`` on data that carry label maps (e.g. :class:`voxreg.data.SynthPairDataset`).

The data can be a map-style torch ``Dataset`` (e.g. :class:`voxreg.data.ScanToScanDataset`; best:
batches are drawn reproducibly from ``seed`` and the epoch, so a resumed run sees exactly the
batches an uninterrupted one would), a ``DataLoader``, or any iterator of batches (e.g.
:func:`voxreg.data.vxm_data_generator`). A batch is a dict with ``moving``, ``fixed`` and optional
``moving_seg``/``fixed_seg``; or ``([moving, fixed], [fixed, zero_field])`` as VoxelMorph's
generators yield; or ``(moving, fixed[, moving_seg, fixed_seg])``; numpy or torch, ``(B, C, *spatial)``.

The run itself (epochs, time budget, run folder, checkpoints, resume) is the engine's:
:class:`voxreg.training.engine.Engine`.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate

from voxreg import _checks
from voxreg import losses as L
from voxreg import transforms as T
from voxreg.losses import resolve_loss
from voxreg.training.engine import Engine, epoch_indices

__all__ = ["Trainer", "train"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _field_loss(fn: LossFn) -> LossFn:
    """Let the functional regularisers ``losses.grad(disp)`` / ``losses.bending_energy(disp)``
    serve as ``(y_true, y_pred)`` losses."""
    if fn is getattr(L, "grad", None) or fn is getattr(L, "bending_energy", None):
        return lambda y_true, y_pred: fn(y_pred)
    return fn


def _to_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"batch item {name} must be a numpy array or tensor, got {type(value).__name__}")


def _parse_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(moving, fixed, moving_seg, fixed_seg)`` from any supported batch layout."""
    if isinstance(batch, dict):
        if "moving" not in batch or "fixed" not in batch:
            raise ValueError(f"a dict batch needs keys 'moving' and 'fixed', got {sorted(batch)}")
        parts = [batch["moving"], batch["fixed"], batch.get("moving_seg"), batch.get("fixed_seg")]
    elif isinstance(batch, (list, tuple)):
        if len(batch) == 2 and isinstance(batch[0], (list, tuple)):  # ([moving, fixed], [...])
            inputs = batch[0]
            if len(inputs) < 2:
                raise ValueError("a VoxelMorph-style batch needs inputs [moving, fixed]")
            parts = [inputs[0], inputs[1], None, None]
        elif len(batch) in (2, 4):
            parts = [*batch, None, None][:4]
        else:
            raise ValueError(
                "a batch must be a dict, ([moving, fixed], [fixed, zero]), (moving, fixed) or "
                f"(moving, fixed, moving_seg, fixed_seg); got a sequence of {len(batch)}"
            )
    else:
        raise TypeError(f"unsupported batch type {type(batch).__name__}")
    if (parts[2] is None) != (parts[3] is None):
        raise ValueError("a batch must carry both moving_seg and fixed_seg, or neither")
    moving = _to_tensor(parts[0], "moving")
    fixed = _to_tensor(parts[1], "fixed")
    segs = [None if p is None else _to_tensor(p, n) for p, n in
            ((parts[2], "moving_seg"), (parts[3], "fixed_seg"))]
    return moving, fixed, segs[0], segs[1]


def _one_hot(seg: Tensor, labels: Tensor) -> Tensor:
    """``(B, 1, *spatial)`` label map -> float ``(B, L, *spatial)`` one-hot over ``labels``."""
    if seg.dim() >= 2 and seg.shape[1] == 1:
        seg = seg[:, 0]
    shape = (1, -1) + (1,) * (seg.dim() - 1)
    return (seg.unsqueeze(1) == labels.view(shape)).to(torch.get_default_dtype())


class _Batches:
    """Deterministic per-epoch batches over a dataset, a loader or an iterator."""

    def __init__(self, data: Any, batch_size: int, steps_per_epoch: int | None, seed: int,
                 num_workers: int, pin_memory: bool):
        self.data = data
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self._iterator = None
        if isinstance(data, DataLoader):
            self.kind = "loader"
            default = len(data) if hasattr(data, "__len__") else None
        elif isinstance(data, Dataset) and hasattr(data, "__len__"):
            self.kind = "dataset"
            if len(data) == 0:
                raise ValueError("the dataset is empty")
            default = max(1, len(data) // self.batch_size)
        elif isinstance(data, Iterable) or hasattr(data, "__next__"):
            self.kind = "iterator"
            default = len(data) if isinstance(data, Sequence) else None
        else:
            raise TypeError(
                "data must be a torch Dataset, a DataLoader or an iterator of batches, got "
                f"{type(data).__name__}"
            )
        if steps_per_epoch is None:
            if default is None:
                raise ValueError(
                    "steps_per_epoch is required when the data is an endless generator"
                )
            steps_per_epoch = default
        if int(steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch}")
        self.steps = int(steps_per_epoch)

    @property
    def rewindable(self) -> bool:
        return self.kind == "dataset"

    def epoch(self, epoch: int) -> Iterable[Any]:
        if self.kind == "dataset":
            if hasattr(self.data, "set_epoch"):
                self.data.set_epoch(epoch)
            batches = epoch_indices(len(self.data), self.steps, self.batch_size, self.seed,
                                    epoch, stream=7).tolist()
            return DataLoader(self.data, batch_sampler=batches, num_workers=self.num_workers,
                              pin_memory=self.pin_memory, collate_fn=default_collate)
        return self._take(self.steps)

    def _take(self, steps: int):
        for _ in range(steps):
            yield self._next()

    def _next(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self.data)
        try:
            return next(self._iterator)
        except StopIteration:
            if self._iterator is self.data:  # a generator: cannot restart
                raise RuntimeError(
                    "the data generator ran out of batches; give an endless generator, a "
                    "Dataset, or fewer steps_per_epoch"
                ) from None
            self._iterator = iter(self.data)
            try:
                return next(self._iterator)
            except StopIteration:
                raise RuntimeError("the data yielded no batch") from None


class Trainer(Engine):
    """Fit a registration model with Adam on VoxelMorph's losses (see the module doc).

    Args:
        model: maps ``(moving, fixed)`` to ``(moved, disp)`` or ``(moved, moved_fixed, disp)``
            (e.g. :class:`voxreg.nn.networks.VxmDense`).
        data: a ``Dataset``, ``DataLoader`` or iterator of batches (see the module doc).
        losses: one loss per term in the order ``transformer_loss``, (``neg_transformer_loss``
            for bidirectional models), ``flow_loss``, and optionally ``seg_loss``; callables
            ``(y_true, y_pred) -> scalar`` or names (see :func:`resolve_loss`). Default:
            ``mse``, ``grad`` and, when the data has label maps, ``dice``. An image term may
            be ``None`` (or get weight 0): it is then skipped, and the seg loss drives training.
        loss_weights: one weight per term; default ``[1, 0.01]`` (``[0.5, 0.5, 0.01]`` when
            bidirectional), plus ``0.01`` for a seg term (also when only it is left out).
        epochs: total number of epochs (a resumed run continues up to it).
        steps_per_epoch: optimizer steps per epoch; default ``len(dataset) // batch_size`` (or
            ``len(loader)``); required for endless generators.
        batch_size: pairs per step (for a Dataset; loaders and generators batch themselves).
        lr: Adam learning rate.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        seed: seeds the batch order and torch's RNG at each epoch.
        out_dir: the run folder: ``history.csv``, ``loss.png``, ``checkpoint.safetensors``,
            ``model.safetensors`` (see :mod:`voxreg.training.engine`).
        checkpoint_every: also checkpoint every this many epochs (always at the end).
        resume: ``True`` continues from ``out_dir/checkpoint.safetensors`` (if there is one), or
            give a checkpoint path; exact for a ``Dataset`` (a warning for other data).
        progress: show a tqdm bar.
        val_fn: ``val_fn(model) -> float or dict``, called after each epoch in eval mode without
            gradients; its values enter the history prefixed ``val_``.
        reg_on: ``"auto"``, ``"velocity"`` (needs a model whose forward accepts
            ``return_velocity``) or ``"disp"``: the field of the ``flow_loss``.
        seg_labels: labels of the seg term; default the dataset's ``labels`` without 0, else
            those in each batch.
        seg_downsize: compute the seg term on a grid this many times coarser (default 1).
        num_workers: ``DataLoader`` workers for a ``Dataset``.
        verbose: print the per-epoch line.
        metadata: stored in the checkpoints.
        time_budget: seconds: no new epoch is started once the time spent plus the slowest
            epoch so far would pass it; the run then ends as after its last epoch, with a
            checkpoint and the final model, and can be resumed.

    Raises:
        TypeError: for a model that is not a module, or data of an unsupported kind.
        ValueError: for an invalid argument or loss specification; in :meth:`fit`, for a batch
            without the label maps a seg-only loss needs.

    Attributes after :meth:`fit`: ``history`` (list of per-epoch dicts), ``optimizer``,
    ``step`` (optimizer steps taken), ``epoch`` (epochs completed).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        losses: Sequence[str | LossFn | None] | None = None,
        loss_weights: Sequence[float] | None = None,
        epochs: int = 1,
        steps_per_epoch: int | None = None,
        batch_size: int = 1,
        lr: float = 1e-4,
        device: str | torch.device | None = "auto",
        seed: int = 0,
        out_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool | str | os.PathLike = False,
        progress: bool = True,
        val_fn: Callable[[nn.Module], Any] | None = None,
        reg_on: str = "auto",
        seg_labels: Sequence[int] | None = None,
        seg_downsize: int = 1,
        num_workers: int = 0,
        verbose: bool = True,
        metadata: dict[str, Any] | None = None,
        time_budget: float | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__(model, epochs=epochs, lr=lr, device=device, seed=seed, out_dir=out_dir,
                         checkpoint_every=checkpoint_every, resume=resume,
                         time_budget=time_budget, progress=progress, verbose=verbose,
                         metadata=metadata)
        self.batch_size = _checks.positive_int(batch_size, "batch_size")
        if reg_on not in ("auto", "velocity", "disp"):
            raise ValueError(f"reg_on must be 'auto', 'velocity' or 'disp', got {reg_on!r}")
        self.seg_downsize = _checks.positive_int(seg_downsize, "seg_downsize")
        self.val_fn = val_fn
        self.batches = _Batches(data, self.batch_size, steps_per_epoch, self.seed, num_workers,
                                self.device.type == "cuda")
        self.steps_per_epoch = self.batches.steps

        self.bidir = bool(getattr(model, "bidir", False))
        accepts_velocity = self._accepts("return_velocity")
        if reg_on == "auto":
            reg_on = "velocity" if accepts_velocity else "disp"
        elif reg_on == "velocity" and not accepts_velocity:
            raise ValueError(
                "reg_on='velocity' needs a model whose forward accepts return_velocity=True"
            )
        self.reg_on = reg_on
        self.seg_labels = None if seg_labels is None else [int(v) for v in seg_labels]
        if self.seg_labels is not None and not self.seg_labels:
            raise ValueError("seg_labels must hold at least one label")
        if self.seg_labels is None:
            found = getattr(data, "labels", None)
            if found is not None:
                self.seg_labels = [int(v) for v in found if int(v) != 0]
        self._set_losses(losses, loss_weights)

    def _accepts(self, keyword: str) -> bool:
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return False
        return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def _set_losses(self, losses, loss_weights) -> None:
        names = ["transformer_loss"] + (["neg_transformer_loss"] if self.bidir else [])
        names += ["flow_loss"]
        downsize = getattr(self.model, "int_downsize", 1) if self.reg_on == "velocity" else 1
        if getattr(self.model, "int_steps", 1) == 0:
            downsize = 1
        defaults = ([0.5, 0.5] if self.bidir else [1.0]) + [0.01]
        if losses is None:
            losses = ["mse"] * (2 if self.bidir else 1) + ["grad", "dice"]
        losses = list(losses)
        if len(losses) not in (len(names), len(names) + 1):
            raise ValueError(
                f"losses must hold {len(names)} terms ({', '.join(names)}), or "
                f"{len(names) + 1} with a final seg_loss, got {len(losses)}"
            )
        has_seg = len(losses) == len(names) + 1
        if loss_weights is None:
            loss_weights = defaults + [0.01] * has_seg
        loss_weights = [float(w) for w in loss_weights]
        if has_seg and len(loss_weights) == len(names):
            loss_weights.append(0.01)
        if len(loss_weights) != len(losses):
            raise ValueError(
                f"loss_weights must hold one weight per loss term ({len(losses)}), got "
                f"{len(loss_weights)}"
            )
        if any(not math.isfinite(w) for w in loss_weights):
            raise ValueError(f"loss_weights must be finite numbers, got {loss_weights}")
        self.seg_loss = losses[-1] if has_seg else None
        losses = losses[: len(names)]
        if losses[-1] is None:
            raise ValueError("the flow_loss (regulariser) term cannot be None; give weight 0 instead")
        self.names = names
        self.loss_fns = [None if f is None else resolve_loss(f, downsize if n == "flow_loss" else None)
                         for f, n in zip(losses, names)]
        self.loss_fns[-1] = _field_loss(self.loss_fns[-1])
        self.weights = [0.0 if f is None else w for f, w in zip(self.loss_fns, loss_weights)]
        # image terms that cost nothing: not computed (SynthMorph trains on the seg loss alone)
        self._skip = {n for n, f, w in zip(names, self.loss_fns, self.weights)
                      if n != "flow_loss" and (f is None or w == 0)}
        self._images_unused = len(self._skip) == len(names) - 1
        self.seg_weight = loss_weights[len(names)] if self.seg_loss is not None else 0.0
        self._seg_fn = resolve_loss(self.seg_loss) if self.seg_loss is not None else None
        if self._images_unused and (self._seg_fn is None or self.seg_weight == 0):
            raise ValueError(
                "the image loss is None or has weight 0 and there is no weighted seg_loss: "
                "nothing but smoothness to fit; give an image loss weight or a seg loss (e.g. "
                "losses=[None, 'grad', 'dice'], loss_weights=[0, 0.01, 1] with label maps)"
            )

    def _forward(self, moving: Tensor, fixed: Tensor, moving_seg, fixed_seg) -> dict[str, Tensor]:
        if self._images_unused and (self._seg_fn is None or moving_seg is None):
            raise ValueError(
                "the image loss is None or has weight 0, so training needs label maps, but this "
                "batch carries none (moving_seg/fixed_seg)"
            )
        # without image terms a bidirectional model need not warp the fixed image
        kwargs = {"registration": True} if (self._images_unused and self.bidir
                                              and self._accepts("registration")) else {}
        bidir = self.bidir and not kwargs
        if self.reg_on == "velocity":
            out = self.model(moving, fixed, return_velocity=True, **kwargs)
            field, out = out[-1], out[:-1]
        else:
            out = self.model(moving, fixed, **kwargs)
            field = None
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise ValueError("the model must return (moved, disp) or (moved, moved_fixed, disp)")
        moved, disp = out[0], out[-1]
        if field is None:
            field = disp
        terms: dict[str, Tensor] = {}
        if "transformer_loss" not in self._skip:
            terms["transformer_loss"] = self.loss_fns[0](fixed, moved)
        if bidir:
            if len(out) != 3:
                raise ValueError("a bidirectional model must return (moved, moved_fixed, disp)")
            if "neg_transformer_loss" not in self._skip:
                terms["neg_transformer_loss"] = self.loss_fns[1](moving, out[1])
        terms["flow_loss"] = self.loss_fns[-1](torch.zeros_like(field), field)
        if self._seg_fn is not None and moving_seg is not None:
            terms["seg_loss"] = self._seg_term(moving_seg, fixed_seg, disp)
        return terms

    def _seg_term(self, moving_seg: Tensor, fixed_seg: Tensor, disp: Tensor) -> Tensor:
        """The seg loss between the fixed one-hot labels and the moving ones warped by ``disp``
        (``(B, ndim, *spatial)``), on a grid ``seg_downsize`` times coarser if asked: there the
        one-hot maps are averaged over ``f**ndim`` blocks (soft label fractions) and the field too,
        divided by ``f`` (coarse voxels), which keeps the two grids aligned."""
        labels = self.seg_labels
        if labels is None:
            labels = [v for v in torch.unique(torch.cat([moving_seg.flatten(),
                                                          fixed_seg.flatten()])).tolist()
                      if v != 0]
        labels_t = torch.as_tensor(labels, device=moving_seg.device, dtype=moving_seg.dtype)
        moving_onehot = _one_hot(moving_seg, labels_t)
        fixed_onehot = _one_hot(fixed_seg, labels_t)
        factor = self.seg_downsize
        if factor > 1:
            if min(disp.shape[2:]) < factor:
                raise ValueError(f"seg_downsize {factor} is larger than the image "
                                 f"{tuple(disp.shape[2:])}")
            pool = F.avg_pool2d if disp.dim() == 4 else F.avg_pool3d
            moving_onehot = pool(moving_onehot, factor)
            fixed_onehot = pool(fixed_onehot, factor)
            disp = pool(disp, factor) / factor
        return self._seg_fn(fixed_onehot, T.warp(moving_onehot, disp))

    def _total(self, terms: dict[str, Tensor]) -> Tensor:
        total = sum(w * terms[n] for n, w in zip(self.names, self.weights) if n in terms)
        if "seg_loss" in terms:
            total = total + self.seg_weight * terms["seg_loss"]
        return total

    # -- the engine's hooks ----------------------------------------------------------------------

    def begin_epoch(self, epoch: int) -> Iterable[Any]:
        return self.batches.epoch(epoch)

    def step_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        moving, fixed, moving_seg, fixed_seg = _parse_batch(batch)
        moving = moving.to(self.device, torch.get_default_dtype(), non_blocking=True)
        fixed = fixed.to(self.device, torch.get_default_dtype(), non_blocking=True)
        if moving_seg is not None:
            moving_seg = moving_seg.to(self.device, non_blocking=True)
            fixed_seg = fixed_seg.to(self.device, non_blocking=True)
        terms = self._forward(moving, fixed, moving_seg, fixed_seg)
        return self._total(terms), terms

    @property
    def replayable(self) -> bool:
        return self.batches.rewindable

    def settings(self) -> dict[str, Any]:
        settings = {
            "losses": ["none" if f is None else getattr(f, "__name__", type(f).__name__)
                       for f in self.loss_fns]
            + ([getattr(self._seg_fn, "__name__", type(self._seg_fn).__name__)]
               if self._seg_fn is not None else []),
            "loss_weights": self.weights + ([self.seg_weight] if self._seg_fn is not None else []),
            "reg_on": self.reg_on,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed,
        }
        if self._seg_fn is not None:
            settings["seg_labels"] = self.seg_labels
            settings["seg_downsize"] = self.seg_downsize
        return settings

    def epoch_metrics(self) -> dict[str, float]:
        """The validation values (``val_fn``), prefixed ``val_``."""
        if self.val_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad():
            result = self.val_fn(self.model)
        self.model.train()
        if result is None:
            return {}
        if not isinstance(result, dict):
            result = {"val": result}
        out = {}
        for k, v in result.items():
            key = k if str(k).startswith("val") else f"val_{k}"
            out[key] = float(v)
        return out


def train(
    model: nn.Module,
    data: Any,
    losses: Sequence[str | LossFn | None] | None = None,
    loss_weights: Sequence[float] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Train ``model`` with Adam on VoxelMorph's losses; return the history.

    ``Trainer(model, data, losses, loss_weights, **options).fit()``: the arguments and
    ``options`` (``epochs``, ``batch_size``, ``lr``, ``out_dir``, ``resume``, ``val_fn``...) are
    those of :class:`Trainer`, which documents them, the files written and the errors.

    Returns:
        The history: a list of per-epoch dicts (``epoch``, ``step``, ``loss``, each term,
        validation values, ``seconds``), as also written to ``out_dir/history.csv``.

    >>> from voxreg.data import ScanToScanDataset
    >>> from voxreg.nn.networks import VxmDense
    >>> model = VxmDense((64, 64))
    >>> history = train(model, ScanToScanDataset(images), epochs=10, batch_size=8,
    ...                 out_dir="run", resume=True)  # doctest: +SKIP
    """
    return Trainer(model, data, losses, loss_weights, **options).fit()
