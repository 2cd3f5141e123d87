"""Multi-contrast registration on 2D IXI slices: which image loss survives an inverted contrast?

Trains the seed's 2D ``VxmDense`` scan-to-scan on the ixi2d axial training slices with one image
loss (``--image-loss ncc``, ``mi`` or ``mse``) + ``lambda * Grad("l2")``, then registers the
validation pairs twice: as they are (same contrast), and with the moving slice intensity-inverted
inside the brain (``1 - image`` where the labels are non-zero: a T1 made to look T2-like). The
Dice of the warped labels should stay close for a contrast-robust loss (local NCC, which is
squared and so blind to the sign of the correlation; mutual information) and collapse for MSE.

    python examples/multicontrast2d.py --image-loss ncc --lambda 1 --steps 1200
    python examples/multicontrast2d.py --image-loss mse --lambda 0.01 --steps 1200

Writes ``--out`` (default ``outputs/multicontrast2d/<loss>``): the run (checkpoint, history) and
``evaluation.json``. Data: IXI (CC BY-SA 3.0) with DLMUSE labels, ``../shared/data/ixi2d``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import voxreg
from voxreg.apps import brain2d
from voxreg.data import ScanToScanDataset
from voxreg.data.synthesis import invert_contrast


class InvertedMoving(torch.utils.data.Dataset):
    """Scan-to-scan pairs whose moving slice is intensity-inverted inside the head (``image > 0``)
    with probability ``p``, decided per pair from the pair's index: training pairs of two
    contrasts, which only a contrast-robust image loss can score."""

    def __init__(self, pairs: ScanToScanDataset, p: float = 0.5, seed: int = 0):
        self.pairs, self.p, self.seed = pairs, float(p), int(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getattr__(self, name):  # set_epoch and friends of the wrapped dataset
        if name == "pairs":
            raise AttributeError(name)
        return getattr(self.pairs, name)

    def __getitem__(self, index: int):
        item = dict(self.pairs[index])
        if np.random.default_rng((self.seed, index)).random() < self.p:
            moving = item["moving"]
            item["moving"] = torch.where(moving > 0, 1.0 - moving, torch.zeros_like(moving))
        return item


def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
             pairs: np.ndarray) -> dict[str, float]:
    """Mean Dice of ``pairs`` with the moving slice as it is and inverted."""
    same = brain2d.evaluate_brain2d(model, images, labels, pairs, timing=False)
    n = len(images)
    both = np.concatenate([images, invert_contrast(images, labels)])
    inv_pairs = np.stack([pairs[:, 0] + n, pairs[:, 1]], axis=1)
    inv = brain2d.evaluate_brain2d(model, both, np.concatenate([labels, labels]), inv_pairs,
                                   timing=False)
    return {"dice_before": same["dice_before"], "dice_same": same["dice_after"],
            "dice_inverted": inv["dice_after"], "folding_pct": same["folding_pct"],
            "folding_pct_inverted": inv["folding_pct"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-loss", default="ncc", choices=["ncc", "mi", "mse"])
    p.add_argument("--lambda", dest="lambda_", type=float, default=1.0,
                   help="Grad l2 weight (VoxelMorph: about 1 for NCC, 0.01 for MSE)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pairs", type=int, default=50, help="validation pairs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--invert-p", type=float, default=0.0,
                   help="train on pairs whose moving slice is inverted with this probability")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    data = brain2d.load_ixi2d()
    suffix = f"-inv{args.invert_p:g}" if args.invert_p > 0 else ""
    out = Path(args.out or f"outputs/multicontrast2d/{args.image_loss}{suffix}")
    torch.manual_seed(args.seed)
    model = brain2d.make_model()
    steps_per_epoch = 100
    tic = time.perf_counter()
    dataset = ScanToScanDataset(data["train_images"], seed=args.seed)
    if args.invert_p > 0:
        dataset = InvertedMoving(dataset, args.invert_p, args.seed)
    voxreg.train(model, dataset,
                 losses=[args.image_loss, "grad"], loss_weights=[1.0, args.lambda_],
                 epochs=max(1, args.steps // steps_per_epoch), steps_per_epoch=steps_per_epoch,
                 batch_size=args.batch_size, lr=args.lr, device="cpu", seed=args.seed,
                 out_dir=out, resume=True, progress=False,
                 metadata={"image_loss": args.image_loss, "lambda": args.lambda_})
    seconds = time.perf_counter() - tic
    pairs = brain2d.val_pairs(len(data["val_images"]), args.pairs, seed=0)
    result = evaluate(model.eval(), data["val_images"], data["val_labels"], pairs)
    result.update(image_loss=args.image_loss, lambda_=args.lambda_, steps=args.steps,
                  invert_p=args.invert_p,
                  train_seconds=round(seconds, 1), pairs=len(pairs))
    print(json.dumps(result, indent=1))
    (out / "evaluation.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
