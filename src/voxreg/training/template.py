"""Template training (Dalca et al., NeurIPS 2019) on the shared training engine
(:class:`voxreg.training.engine.Engine`: epochs, time budget, run folder, checkpoints, resume).

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

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from voxreg import _checks, io, plot
from voxreg.checkpoint import load_template_model, warm_start
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
from voxreg.training.engine import CHECKPOINT_NAME, Engine, epoch_indices

__all__ = ["SNAPSHOT_DIR", "TemplateTrainer", "train_template"]

SNAPSHOT_DIR = "snapshots"


class TemplateTrainer(Engine):
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
        checkpoint_every: epochs between checkpoints (``None``: only at the end).
        snapshot_every: every this many epochs (and at the end) write the template as a PNG
            (mid-slices) and an image file into ``out_dir/snapshots`` (a conditional model:
            at ``snapshot_attributes``).
        snapshot_attributes: attribute values of the snapshots of a conditional model (default:
            the 10th, 50th and 90th percentile of the training attributes).
        affine: ``(4, 4)`` voxel-to-world matrix of the snapshot files (default identity).
        snapshot_format: extension of the snapshot images (``".nii.gz"``, ``".npy"``...).
        resume: ``True`` continues from ``out_dir/checkpoint.safetensors`` if it exists; or a
            checkpoint path. Exact; a warning when ``batch_size``, ``steps_per_epoch``, ``seed``,
            ``lr``, ``lambda_``, ``mean_weight`` or the number of images changed.
        time_budget: seconds; no new epoch is started once the elapsed time plus the slowest
            epoch so far would exceed it (at least one epoch runs).
        progress: tqdm bar per epoch.
        verbose: print one line per epoch.
        metadata: stored in the checkpoints.

    Raises:
        TypeError: for a model that is not a template model.
        ValueError: for an invalid argument (or attributes that do not fit the model).

    Attributes after :meth:`fit`: ``history``, ``optimizer``, ``step``, ``epoch``.
    """

    WATCHED = ("batch_size", "steps_per_epoch", "seed", "lr", "lambda", "mean_weight", "images")
    PLOT_EVERY = 60.0  # drawing the curves is slow

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
        super().__init__(model, epochs=epochs, lr=lr, device=device, seed=seed, out_dir=out_dir,
                         checkpoint_every=checkpoint_every, resume=resume,
                         time_budget=time_budget, progress=progress, verbose=verbose,
                         metadata=metadata)
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
        self.batch_size = _checks.positive_int(batch_size, "batch_size")
        self.steps_per_epoch = (max(1, len(self.images) // self.batch_size)
                                if steps_per_epoch is None
                                else _checks.positive_int(steps_per_epoch, "steps_per_epoch"))
        self.lambda_ = _checks.non_negative(lambda_, "lambda_")
        self.mean_weight = _checks.non_negative(mean_weight, "mean_weight")
        if isinstance(image_loss, str) and image_loss.lower() not in ("mse", "ncc"):
            raise ValueError(f"image_loss must be 'mse' or 'ncc' (or a callable), got {image_loss!r}")
        self.image_loss_name = image_loss if isinstance(image_loss, str) else getattr(
            image_loss, "__name__", type(image_loss).__name__)
        self.image_loss = resolve_loss(image_loss)
        self.smooth_loss = resolve_loss("grad", loss_mult=model.int_downsize)
        self.snapshot_every = (None if snapshot_every in (None, 0)
                               else _checks.positive_int(snapshot_every, "snapshot_every"))
        if self.snapshot_every and self.out_dir is None:
            raise ValueError("snapshot_every needs out_dir (where the snapshots go)")
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
        self.names = ["transformer_loss", "neg_transformer_loss", "mean_loss", "flow_loss"]
        self.weights = [0.5, 0.5, self.mean_weight, self.lambda_]
        self._snapped = False  # whether the last epoch wrote a snapshot
        self._disp_sum: Tensor | None = None  # the epoch's displacement statistics
        self._disp_sq = torch.zeros(())
        self._count = 0

    # -- the engine's hooks ----------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {
            "image_loss": self.image_loss_name, "lambda": self.lambda_,
            "mean_weight": self.mean_weight, "loss_weights": self.weights, "lr": self.lr,
            "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed, "images": len(self.images),
        }

    def begin_epoch(self, epoch: int) -> Iterable[np.ndarray]:
        """The epoch's ``(batch_size,)`` image indices, ``steps_per_epoch`` of them (fixed by the
        seed and the epoch)."""
        self._disp_sum = None
        self._disp_sq = torch.zeros((), device=self.device)
        self._count = 0
        return epoch_indices(len(self.images), self.steps_per_epoch, self.batch_size, self.seed,
                             epoch, stream=13)

    def step_loss(self, indices: np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
        idx = torch.from_numpy(indices)
        subject = self.images[idx].to(self.device, non_blocking=True)
        attrs = None if self.attributes is None else self.attributes[idx].to(self.device)
        out = self.model(subject, attrs)
        terms = self._terms(out, subject)
        with torch.no_grad():
            disp = out.disp.detach()
            self._disp_sum = disp.sum(0) if self._disp_sum is None else self._disp_sum + disp.sum(0)
            self._disp_sq = self._disp_sq + (disp**2).sum(1).mean(
                (1, 2) if disp.dim() == 4 else (1, 2, 3)).sum()
            self._count += disp.shape[0]
        return sum(w * terms[n] for n, w in zip(self.names, self.weights)), terms

    def _terms(self, out: TemplateOutput, subject: Tensor) -> dict[str, Tensor]:
        mean = self.model.mean_stream(out.velocity)
        return {
            "transformer_loss": self.image_loss(subject, out.moved_template),
            "neg_transformer_loss": self.image_loss(out.template, out.moved_subject),
            "mean_loss": torch.mean(mean**2),
            "flow_loss": self.smooth_loss(torch.zeros_like(out.velocity), out.velocity),
        }

    def epoch_metrics(self) -> dict[str, float]:
        """``mean_disp_rms``, ``disp_rms`` and (unconditional model) ``sharpness``."""
        mean = self._disp_sum / self._count
        metrics = {"mean_disp_rms": float(torch.sqrt((mean**2).sum(0).mean())),
                   "disp_rms": float(torch.sqrt(self._disp_sq / self._count))}
        if not self.conditional:
            metrics["sharpness"] = sharpness(self.model.template_image())
        return metrics

    def curves(self) -> list[dict[str, Any]]:
        """The loss columns alone."""
        return [{"epoch": row["epoch"], **{k: v for k, v in row.items() if k.endswith("loss")}}
                for row in self.history]

    def write_extras(self, end: bool) -> None:
        """A snapshot every ``snapshot_every`` epochs, and at the end unless just written."""
        if not self.snapshot_every:
            return
        if not end:
            self._snapped = self.epoch % self.snapshot_every == 0
            if self._snapped:
                self.snapshot()
        elif not self._snapped:
            self.snapshot()

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

    Raises:
        ValueError: for images that are not a stack of 2D/3D images, attributes without one row
            per image, or a checkpoint whose shape or kind does not fit; and as
            :class:`TemplateTrainer`.

    >>> model, history = train_template(images, epochs=100, out_dir="atlas")  # doctest: +SKIP
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
