"""Template training (Dalca et al., NeurIPS 2019) on the shared training engine.

:class:`TemplateTrainer` (or :func:`train_template`) minimises, per batch of subjects,

==========================  ==================================================================
``transformer_loss``        image loss ``(subject, template warped to the subject)``
``neg_transformer_loss``    image loss ``(template, subject warped to the template)``
``mean_loss``               ``mean(m**2)`` with ``m`` the running mean of the velocity fields
                            (VoxelMorph's ``MeanStream``: the mean over the last ``mean_cap``
                            subjects, the current batch carrying the gradient); it keeps the
                            template at the centre of the population
``flow_loss``               ``Grad("l2")`` smoothness of the velocity field
==========================  ==================================================================

with weights ``0.5, 0.5, mean_weight, lambda_``. Each epoch also logs ``mean_disp_rms`` (RMS over
voxels of the epoch's mean displacement, in voxels: near 0 when the template is centred),
``disp_rms`` (RMS displacement of single subjects, for scale) and, for an unconditional model,
``sharpness`` (:func:`voxreg.evaluation.sharpness` of the template).

Models are saved with :func:`voxreg.checkpoint.save_model` (safetensors, no pickle) and read back
with :func:`voxreg.checkpoint.load_template_model`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from voxreg import _checks, io, plot
from voxreg._runtime import resolve_device
from voxreg.checkpoint import load_template_model, save_model, warm_start
from voxreg.evaluation import sharpness, templates_at
from voxreg.losses import resolve_loss
from voxreg.nn.template import (
    ConditionalTemplate,
    TemplateCreation,
    TemplateModel,
    TemplateOutput,
    attribute_batch,
    image_batch,
)
from voxreg.training.engine import (
    CHECKPOINT_NAME,
    HISTORY_NAME,
    MODEL_NAME,
    PLOT_NAME,
    budget_spent,
    epoch_seed,
    plot_history,
    restore,
    write_history,
)

__all__ = ["SNAPSHOT_DIR", "TemplateTrainer", "train_template"]

SNAPSHOT_DIR = "snapshots"


class TemplateTrainer:
    """Train a template model with Adam on the losses of the module doc.

    Args:
        model: a :class:`TemplateCreation` or :class:`ConditionalTemplate`.
        images: ``(N, *inshape)`` or ``(N, 1, *inshape)`` training images (kept on the CPU, sent
            to the device batch by batch).
        attributes: ``(N, n_attributes)`` (or ``(N,)``) for a conditional model.
        epochs: total epochs (a resumed run continues up to it).
        steps_per_epoch: optimizer steps per epoch (default ``max(1, N // batch_size)``).
        batch_size: subjects per step, drawn at random (each epoch's draw is fixed by ``seed`` and
            the epoch, so a resumed run sees the batches an uninterrupted one would).
        lr: Adam learning rate (template, decoder and registration network alike).
        image_loss: ``"mse"`` or ``"ncc"`` (or a callable ``(y_true, y_pred) -> scalar``).
        lambda_: weight of the velocity smoothness ``Grad("l2")``.
        mean_weight: weight of the mean-stream penalty.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seeds the batch draws and torch's RNG each epoch.
        out_dir: run folder for ``history.csv``, ``loss.png``, ``checkpoint.safetensors``
            (every ``checkpoint_every`` epochs and at the end), ``model.safetensors`` (at the
            end) and ``snapshots/``; ``loss.png`` is drawn at the end and at most once a minute
            on the way.
        checkpoint_every: epochs between checkpoints.
        snapshot_every: every this many epochs (and at the end) write the template as a PNG
            (mid-slices) and an image file into ``out_dir/snapshots`` (a conditional model:
            at ``snapshot_attributes``).
        snapshot_attributes: attribute values of the snapshots of a conditional model (default:
            the 10th, 50th and 90th percentile of the training attributes).
        affine: ``(4, 4)`` voxel-to-world matrix of the snapshot files (default identity).
        snapshot_format: extension of the snapshot images (``".nii.gz"``, ``".npy"``...).
        resume: ``True`` continues from ``out_dir/checkpoint.safetensors`` if it exists; or a
            checkpoint path.
        time_budget: seconds; no new epoch is started once the elapsed time plus the slowest
            epoch so far would exceed it (at least one epoch runs).
        progress: tqdm bar per epoch.
        verbose: print one line per epoch.
        metadata: stored in the checkpoints.
    """

    def __init__(
        self,
        model: TemplateModel,
        images: Any,
        attributes: Any = None,
        epochs: int = 1,
        steps_per_epoch: int | None = None,
        batch_size: int = 1,
        lr: float = 1e-3,
        image_loss: str | Callable[[Tensor, Tensor], Tensor] = "mse",
        lambda_: float = 0.01,
        mean_weight: float = 1.0,
        device: str | torch.device | None = "auto",
        seed: int = 0,
        out_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        snapshot_every: int | None = None,
        snapshot_attributes: Any = None,
        affine: Any = None,
        snapshot_format: str = ".nii.gz",
        resume: bool | str | os.PathLike = False,
        time_budget: float | None = None,
        progress: bool = True,
        verbose: bool = True,
        metadata: dict[str, Any] | None = None,
    ):
        if not isinstance(model, TemplateModel):
            raise TypeError(f"model must be a TemplateCreation or ConditionalTemplate, got "
                            f"{type(model).__name__}")
        self.model = model
        self.images = image_batch(images, model.inshape)
        self.conditional = isinstance(model, ConditionalTemplate)
        if self.conditional:
            if attributes is None:
                raise ValueError("a ConditionalTemplate needs attributes, one row per image")
            self.attributes = attribute_batch(attributes, len(self.images), model.n_attributes)
        else:
            if attributes is not None:
                raise ValueError("attributes were given but the model is unconditional "
                                 "(use a ConditionalTemplate)")
            self.attributes = None
        self.epochs = _checks.positive_int(epochs, "epochs")
        self.batch_size = _checks.positive_int(batch_size, "batch_size")
        self.steps_per_epoch = (max(1, len(self.images) // self.batch_size)
                                if steps_per_epoch is None
                                else _checks.positive_int(steps_per_epoch, "steps_per_epoch"))
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
                math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.lr = float(lr)
        self.lambda_ = _checks.non_negative(lambda_, "lambda_")
        self.mean_weight = _checks.non_negative(mean_weight, "mean_weight")
        if isinstance(image_loss, str) and image_loss.lower() not in ("mse", "ncc"):
            raise ValueError(f"image_loss must be 'mse' or 'ncc' (or a callable), got {image_loss!r}")
        self.image_loss_name = image_loss if isinstance(image_loss, str) else getattr(
            image_loss, "__name__", type(image_loss).__name__)
        self.image_loss = resolve_loss(image_loss)
        self.smooth_loss = resolve_loss("grad", loss_mult=model.int_downsize)
        self.device = resolve_device(device)
        self.seed = int(seed)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.checkpoint_every = _checks.positive_int(checkpoint_every, "checkpoint_every")
        self.snapshot_every = (None if snapshot_every in (None, 0)
                               else _checks.positive_int(snapshot_every, "snapshot_every"))
        if self.snapshot_every and self.out_dir is None:
            raise ValueError("snapshot_every needs out_dir (where the snapshots go)")
        if resume and self.out_dir is None and not isinstance(resume, (str, os.PathLike)):
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")
        self.resume = resume
        if time_budget is not None and not (isinstance(time_budget, (int, float))
                                            and time_budget > 0):
            raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget!r}")
        self.time_budget = time_budget
        self.affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be a (4, 4) matrix, got shape {self.affine.shape}")
        self.snapshot_format = snapshot_format
        if self.conditional:
            if snapshot_attributes is None:
                snapshot_attributes = np.percentile(self.attributes.numpy(), [10, 50, 90], axis=0)
            self.snapshot_attributes = np.asarray(snapshot_attributes, dtype=np.float64).reshape(
                -1, model.n_attributes)
        else:
            self.snapshot_attributes = None
        self.progress = progress
        self.verbose = verbose
        self.metadata = dict(metadata or {})
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.epoch = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self._plotted = time.perf_counter()
        self.names = ["transformer_loss", "neg_transformer_loss", "mean_loss", "flow_loss"]
        self.weights = [0.5, 0.5, self.mean_weight, self.lambda_]

    # -----------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "image_loss": self.image_loss_name, "lambda": self.lambda_,
            "mean_weight": self.mean_weight, "loss_weights": self.weights, "lr": self.lr,
            "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed, "images": len(self.images),
        }

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        """``(steps, batch_size)`` image indices of an epoch (fixed by the seed and the epoch)."""
        n = len(self.images)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), 13])
        need = self.steps_per_epoch * self.batch_size
        order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])
        return order[:need].reshape(self.steps_per_epoch, self.batch_size)

    def _terms(self, out: TemplateOutput, subject: Tensor) -> dict[str, Tensor]:
        mean = self.model.mean_stream(out.velocity)
        return {
            "transformer_loss": self.image_loss(subject, out.moved_template),
            "neg_transformer_loss": self.image_loss(out.template, out.moved_subject),
            "mean_loss": torch.mean(mean**2),
            "flow_loss": self.smooth_loss(torch.zeros_like(out.velocity), out.velocity),
        }

    def _log(self, line: str) -> None:
        if self.verbose:
            print(line, flush=True)

    def _resume(self) -> None:
        path = restore(self, ("batch_size", "steps_per_epoch", "seed", "lr", "lambda",
                               "mean_weight", "images"))
        if path is not None:
            self._log(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

    def _checkpoint(self, final: bool) -> None:
        if self.out_dir is None:
            return
        meta = {**self.metadata, "training": self._settings()}
        save_model(self.model, self.out_dir / CHECKPOINT_NAME, metadata=meta,
                   optimizer=self.optimizer, step=self.step, epoch=self.epoch,
                   history=self.history)
        if final:
            save_model(self.model, self.out_dir / MODEL_NAME, metadata=meta, step=self.step,
                       epoch=self.epoch, history=self.history)
        # the loss curve at the end, and at most once a minute on the way (drawing is slow)
        if self.history and (final or time.perf_counter() - self._plotted > 60):
            self._plotted = time.perf_counter()
            losses = [{"epoch": row["epoch"],
                       **{k: v for k, v in row.items() if k.endswith("loss")}}
                      for row in self.history]
            plot_history(losses, self.out_dir / PLOT_NAME)

    def snapshot(self) -> list[Path]:
        """Write the current template(s) into ``out_dir/snapshots``: a PNG of the (mid-)slices
        and an image file per template. Returns the paths written."""
        folder = self.out_dir / SNAPSHOT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"template_epoch{self.epoch:04d}"
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            if self.conditional:
                images = templates_at(self.model, self.snapshot_attributes)
                names = self.model.attribute_names
                titles = [", ".join(f"{n} {v:.4g}" for n, v in zip(names, row))
                          for row in self.snapshot_attributes]
                suffixes = ["_" + "_".join(f"{n}{v:.4g}" for n, v in zip(names, row))
                            for row in self.snapshot_attributes]
            else:
                images = [self.model.template_image()]
                titles, suffixes = ["template"], [""]
        self.model.train(was_training)
        paths = []
        for image, suffix in zip(images, suffixes):
            paths.append(io.save_image(folder / f"{stem}{suffix}{self.snapshot_format}", image,
                                       affine=self.affine))
        png = folder / f"{stem}.png"
        titles = [f"{t} (epoch {self.epoch})" for t in titles]
        if self.model.ndim == 2:
            plot.slices(list(images), titles=titles, save=png, width=3.5 * len(images))
        else:
            plot.volume_slices(list(images), titles=titles, save=png)
        paths.append(png)
        return paths

    def fit(self) -> list[dict[str, Any]]:
        """Train up to ``epochs`` epochs; return the history (one dict per epoch)."""
        model = self.model.to(self.device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._resume()
        start = self.epoch
        tic_all = time.perf_counter()
        slowest = 0.0
        saved = snapped = False
        for epoch in range(start, self.epochs):
            if budget_spent(self.time_budget, epoch > start, tic_all, slowest):
                self._log(f"time budget of {self.time_budget:.0f} s reached after epoch {epoch}")
                break
            torch.manual_seed(epoch_seed(self.seed, epoch))
            model.train()
            tic = time.perf_counter()
            sums: dict[str, Tensor] = {}
            disp_sum = None
            disp_sq = torch.zeros((), device=self.device)
            count = 0
            bar = tqdm(total=self.steps_per_epoch, disable=not self.progress, leave=False,
                       desc=f"epoch {epoch + 1}/{self.epochs}", dynamic_ncols=True)
            for indices in self._epoch_batches(epoch):
                idx = torch.from_numpy(indices)
                subject = self.images[idx].to(self.device, non_blocking=True)
                attrs = None if self.attributes is None else self.attributes[idx].to(self.device)
                out = model(subject, attrs)
                terms = self._terms(out, subject)
                loss = sum(w * terms[n] for n, w in zip(self.names, self.weights))
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {self.step + 1}; "
                        "lower lr or check the data")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                with torch.no_grad():
                    values = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
                    for k, v in values.items():
                        sums[k] = sums[k] + v if k in sums else v.clone()
                    disp = out.disp.detach()
                    disp_sum = disp.sum(0) if disp_sum is None else disp_sum + disp.sum(0)
                    disp_sq = disp_sq + (disp**2).sum(1).mean((1, 2) if disp.dim() == 4
                                                              else (1, 2, 3)).sum()
                    count += disp.shape[0]
                bar.update(1)
                if self.progress and (self.step % 10 == 0 or bar.n == 1):
                    bar.set_postfix(loss=f"{values['loss'].item():.4g}")
            bar.close()
            row: dict[str, Any] = {"epoch": epoch + 1, "step": self.step}
            row.update({k: float(v) / self.steps_per_epoch for k, v in sums.items()})
            mean = disp_sum / count
            row["mean_disp_rms"] = float(torch.sqrt((mean**2).sum(0).mean()))
            row["disp_rms"] = float(torch.sqrt(disp_sq / count))
            if not self.conditional:
                row["sharpness"] = sharpness(model.template_image())
            row["seconds"] = round(time.perf_counter() - tic, 3)
            slowest = max(slowest, row["seconds"])
            self.history.append(row)
            self.epoch = epoch + 1
            self._log(self._line(row))
            saved = snapped = False
            if self.out_dir is not None:
                write_history(self.history, self.out_dir / HISTORY_NAME)
                if self.snapshot_every and self.epoch % self.snapshot_every == 0:
                    self.snapshot()
                    snapped = True
                if self.epoch == self.epochs:
                    self._checkpoint(final=True)
                    saved = True
                elif self.epoch % self.checkpoint_every == 0:
                    self._checkpoint(final=False)
        if self.out_dir is not None:
            # the end of the run (all epochs, or the time budget): checkpoint, final model and a
            # last snapshot, unless just written
            if not saved:
                self._checkpoint(final=True)
            if self.snapshot_every and not snapped:
                self.snapshot()
        model.eval()
        return self.history

    def _line(self, row: dict[str, Any]) -> str:
        parts = [f"epoch {row['epoch']}/{self.epochs}"]
        parts += [f"{k}: {v:.4g}" for k, v in row.items()
                  if k not in ("epoch", "step", "seconds") and isinstance(v, float)]
        parts.append(f"({row['seconds']:.2f} s)")
        return "  ".join(parts)


def train_template(
    images: Any,
    attributes: Any = None,
    *,
    attribute_names: Sequence[str] | None = None,
    nb_features: Sequence[Sequence[int]] | int | None = None,
    int_steps: int = 7,
    int_downsize: int = 2,
    mean_cap: int = 100,
    decoder_features: Sequence[int] = (16, 16, 16, 16),
    out_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    init_seed: int = 0,
    init_registration: str | os.PathLike | nn.Module | None = None,
    **kwargs: Any,
) -> tuple[TemplateModel, list[dict[str, Any]]]:
    """Build a template model for ``images`` and train it; return ``(model, history)``.

    Without ``attributes`` a :class:`TemplateCreation` initialised from the voxel-wise mean of
    ``images``; with them a :class:`ConditionalTemplate` on that mean, its attributes standardised
    by their training mean and standard deviation. When resuming from a checkpoint, the model is
    rebuilt from the checkpoint's config (the architecture arguments are then ignored).

    Args:
        images: ``(N, *spatial)`` or ``(N, 1, *spatial)``.
        attributes: ``(N,)`` or ``(N, A)``, optional.
        attribute_names: names of the attributes (default ``attribute0``...).
        nb_features, int_steps, int_downsize, mean_cap: the registration network and mean stream.
        decoder_features: decoder channels of a conditional model.
        out_dir, resume: as :class:`TemplateTrainer`.
        init_seed: seeds the initial weights.
        init_registration: a fresh run's registration network starts from the weights of this
            model (a shipped name such as ``"brain3d-diff"``, a model file or a module) wherever
            name and shape match (:func:`voxreg.checkpoint.warm_start`); ignored when resuming.
        **kwargs: passed to :class:`TemplateTrainer` (``epochs``, ``steps_per_epoch``,
            ``batch_size``, ``lr``, ``lambda_``, ``mean_weight``, ``snapshot_every``, ``device``...).
    """
    array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    array = array.astype(np.float32, copy=False)
    if array.ndim not in (3, 4, 5):
        raise ValueError(f"images must be (N, *spatial) or (N, 1, *spatial) with 2 or 3 spatial "
                         f"axes, got shape {array.shape}")
    if array.ndim >= 4 and array.shape[1] == 1:
        array = array[:, 0]
    inshape = tuple(array.shape[1:])
    checkpoint = None
    if resume:
        checkpoint = (Path(resume) if isinstance(resume, (str, os.PathLike))
                      else (Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None))
    if checkpoint is not None and checkpoint.is_file():
        model = load_template_model(checkpoint)
        model.train()
        if tuple(model.inshape) != inshape:
            raise ValueError(f"{str(checkpoint)!r} was trained on shape {tuple(model.inshape)}, "
                             f"the images are {inshape}")
        if (attributes is not None) != isinstance(model, ConditionalTemplate):
            raise ValueError(f"{str(checkpoint)!r} holds a {type(model).__name__} model; "
                             + ("attributes were given" if attributes is not None
                                else "attributes are needed"))
    else:
        torch.manual_seed(int(init_seed))
        mean = array.mean(0)
        if attributes is None:
            model = TemplateCreation(inshape, template_init=mean, nb_features=nb_features,
                                     int_steps=int_steps, int_downsize=int_downsize,
                                     mean_cap=mean_cap)
        else:
            a = np.asarray(attributes, dtype=np.float64)
            a = a[:, None] if a.ndim == 1 else a
            if a.ndim != 2 or a.shape[0] != len(array):
                raise ValueError(f"attributes must have one row per image ({len(array)}), got "
                                 f"shape {np.asarray(attributes).shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError("attributes must be finite numbers")
            scale = a.std(0)
            scale = np.where(scale > 0, scale, 1.0)
            model = ConditionalTemplate(
                inshape, n_attributes=a.shape[1], mean_image=mean,
                attribute_names=attribute_names, attribute_center=a.mean(0).tolist(),
                attribute_scale=scale.tolist(), decoder_features=decoder_features,
                nb_features=nb_features, int_steps=int_steps, int_downsize=int_downsize,
                mean_cap=mean_cap)
        if init_registration is not None:
            warm_start(model.registration, init_registration)
    trainer = TemplateTrainer(model, array, attributes, out_dir=out_dir, resume=resume, **kwargs)
    history = trainer.fit()
    return model, history
