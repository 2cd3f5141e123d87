"""Multi-contrast registration: Dice on same-contrast pairs and with the moving image inverted.

On ``--pairs`` ixi2d axial validation pairs (:func:`voxreg.apps.brain2d.val_pairs`, seed 0: the
pairs of ``examples/multicontrast2d.py`` and ``examples/synth2d.py``) each method registers the
moving slice as it is ("same") and intensity-inverted inside the brain ("inverted",
:func:`voxreg.data.synthesis.invert_contrast`: ``1 - image`` where the labels are non-zero, a T1
made to look T2-like) to the fixed slice. Dice is the mean over the non-zero labels present in
both label maps (:func:`voxreg.metrics.mean_dice_present`) after warping the moving labels with
nearest-neighbour interpolation.

Methods:

* networks, one forward pass: the shipped ``brain2d-smooth`` (MSE, T1 pairs only) and
  ``synth2d`` (synthetic data only), plus any ``--model LABEL=PATH`` (e.g. the runs of
  ``examples/multicontrast2d.py``, trained on mixed-contrast pairs with NCC, MI or MSE);
* pure optimisation with each image loss (``mse``, ``ncc``, ``mi``): :func:`voxreg.finetune`
  from a zero field (an untrained network, whose prediction is about 1e-5 voxels) for
  ``--steps`` steps, no early stop, ``lambda`` 0.01 / 1 / 0.1 (the usual weights for the losses'
  scales); this is what ``voxreg register --finetune N --image-loss LOSS`` does after the
  network.

``--threads`` defaults to 1. Results: ``--json`` (default
``benchmarks/results/bench_multicontrast.json``).

    .venv/bin/python benchmarks/bench_multicontrast.py \\
        --model ncc-mixed=outputs/multicontrast2d/ncc-inv0.5/model.safetensors
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_info, format_table, setup_threads, write_json  # noqa: E402

import voxreg  # noqa: E402
from voxreg import transforms as T  # noqa: E402
from voxreg.apps import brain2d  # noqa: E402
from voxreg.data.synthesis import invert_contrast  # noqa: E402
from voxreg.metrics import mean_dice_present  # noqa: E402
from voxreg.nn.networks import VxmDense  # noqa: E402

LAMBDA = {"mse": 0.01, "ncc": 1.0, "mi": 0.1}


def _score(moving_labels: np.ndarray, fixed_labels: np.ndarray, disp: Any) -> tuple[float, float]:
    """Dice after warping the moving labels by ``disp`` ``(2, H, W)``, and % folding voxels."""
    disp_t = torch.as_tensor(np.asarray(disp, dtype=np.float32)).reshape(1, 2,
                                                                         *moving_labels.shape)
    seg = torch.from_numpy(moving_labels.astype(np.int64))[None, None]
    moved = T.warp(seg, disp_t, interp="nearest")[0, 0].numpy()
    return (mean_dice_present(fixed_labels, moved, moving_labels),
            float(T.folding_fraction(disp_t).reshape(-1)[0]) * 100)


def _row(method: str, register, images, inverted, labels, pairs) -> dict[str, Any]:
    """Register every pair twice (same contrast, moving inverted) with ``register(moving,
    fixed) -> disp``; mean Dice and folding of each."""
    row: dict[str, Any] = {"method": method}
    for name, moving_images in (("same", images), ("inverted", inverted)):
        scores = [_score(labels[i], labels[j], register(moving_images[i], images[j]))
                  for i, j in pairs]
        row[f"dice_{name}"] = float(np.mean([s[0] for s in scores]))
        row[f"folding_{name}"] = float(np.mean([s[1] for s in scores]))
        row[f"dice_{name}_per_pair"] = [s[0] for s in scores]
    row["gap"] = row["dice_inverted"] - row["dice_same"]
    print(f"  {method:>28}: same {row['dice_same']:.4f}  inverted {row['dice_inverted']:.4f}  "
          f"gap {row['gap']:+.4f}", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200, help="optimisation steps")
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                        help="another network to score (repeat)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="conditions worth recording (e.g. a busy CPU)")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results"
                                              / "bench_multicontrast.json"))
    args = parser.parse_args(argv)

    threads = setup_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data = brain2d.load_ixi2d()
    images, labels = data["val_images"], data["val_labels"]
    inverted = invert_contrast(images, labels)
    pairs = brain2d.val_pairs(len(images), args.pairs, seed=0)
    before = float(np.mean([mean_dice_present(labels[j], labels[i]) for i, j in pairs]))
    print(f"threads {threads}; {len(pairs)} pairs; Dice before registration {before:.4f}")

    networks = [("brain2d-smooth", "brain2d-smooth"), ("synth2d", "synth2d")]
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"--model must be LABEL=PATH, got {spec!r}")
        networks.append((label, path))
    rows = []
    for label, source in networks:
        model = voxreg.load_model(source).eval()

        def predict(moving, fixed, model=model):
            with torch.no_grad():
                _, disp = model(torch.from_numpy(moving)[None, None],
                                torch.from_numpy(fixed)[None, None], registration=True)
            return disp[0].numpy()

        rows.append(_row(f"network {label}", predict, images, inverted, labels, pairs))

    torch.manual_seed(0)
    zero = VxmDense(brain2d.INSHAPE, nb_features=brain2d.SEED_FEATURES).eval()
    for loss in ("mse", "ncc", "mi"):
        def optimise(moving, fixed, loss=loss):
            return voxreg.finetune(zero, moving, fixed, steps=args.steps, image_loss=loss,
                                   lambda_=LAMBDA[loss], tol=None, progress=False).disp

        rows.append(_row(f"optimise {loss} N={args.steps}", optimise, images, inverted, labels,
                         pairs))

    result = {
        "benchmark": "bench_multicontrast", "started_utc": started,
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": env_info(), "note": args.note, "pairs": pairs.tolist(), "dice_before": before,
        "steps": args.steps, "lambda": LAMBDA, "networks": dict(networks), "rows": rows,
    }
    print()
    print(format_table(["method", "Dice same", "Dice inverted", "gap", "% folding inverted"],
                       [[r["method"], f"{r['dice_same']:.3f}", f"{r['dice_inverted']:.3f}",
                         f"{r['gap']:+.3f}", f"{r['folding_inverted']:.2f}"] for r in rows]))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
