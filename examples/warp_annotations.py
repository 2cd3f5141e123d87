"""Warp an image and its annotations with an affine transform (the seed's first tutorial).

An MNIST digit (or, without the data, a generated digit-like stroke) is padded to 48x48 and warped
by a random affine matrix. Five annotation points placed on the digit follow it: because warping
pulls back (``moved(x) = moving(A x)``), points move with the *inverse* transform, here the dense
field of ``inv(A)``. The script saves a two-panel picture and the numbers (JSON), and checks that
each moved point still sits on the digit.

    python examples/warp_annotations.py --out outputs/annotations
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import voxreg  # noqa: E402
from voxreg._atomic import atomic_path  # noqa: E402


def generated_digit(rng: np.random.Generator) -> np.ndarray:
    """A 28x28 digit-like image: a thick, blurred '2'-shaped stroke (used without MNIST)."""
    arc = np.linspace(0, 1, 80)
    top = np.stack([9 - 4 * np.sin(np.pi * arc), 8 + 12 * arc], 1)
    diagonal = np.stack([np.linspace(9, 21, 70), np.linspace(20, 8, 70)], 1)
    bottom = np.stack([np.full(50, 21.0), np.linspace(8, 21, 50)], 1)
    path = np.concatenate([top, diagonal, bottom]) + rng.normal(0, 0.3, size=2)
    rows, cols = np.mgrid[0:28, 0:28]
    image = np.zeros((28, 28))
    for r, c in path:
        image = np.maximum(image, np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 1.1**2)))
    return (image * 255).astype(np.uint8)


def load_digit(rng: np.random.Generator, data: str | None) -> tuple[np.ndarray, str]:
    """One 28x28 uint8 digit: from MNIST when it can be found, otherwise generated."""
    try:
        from voxreg.data import load_mnist

        images, labels = load_mnist(path=data, split="train")
        return images[rng.integers(len(images))], "MNIST"
    except (ImportError, FileNotFoundError):
        return generated_digit(rng), "generated digit (MNIST not found)"


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """Identity plus N(0, 0.1) on the 2x2 block; translation uniform in [-10, 10] voxels."""
    affine = np.eye(2, 3)
    affine[:, :2] += rng.normal(0, 0.1, size=(2, 2))
    affine[:, 2] = rng.uniform(-10, 10, size=2)
    return affine


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/annotations", help="output folder")
    parser.add_argument("--seed", type=int, default=4, help="random seed")
    parser.add_argument("--data", default=None, help="path to mnist.npz (default: search)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)

    digit, source = load_digit(rng, args.data)
    image = np.pad(digit.astype(np.float32) / 255.0, 10)  # 28x28 -> 48x48
    shape = image.shape

    # five annotations on the digit's strokes (voxel coordinates, ij order), spread out
    candidates = np.argwhere(image > 0.5).astype(np.float64)
    points = candidates[[rng.integers(len(candidates))]]
    while len(points) < 5:
        distance = np.linalg.norm(candidates[:, None] - points[None], axis=-1).min(1)
        points = np.concatenate([points, candidates[[distance.argmax()]]])

    affine = torch.as_tensor(random_affine(rng))[None]  # (1, 2, 3), pull-back, about the centre
    moved = voxreg.warp(torch.as_tensor(image, dtype=torch.float64)[None, None], affine)[0, 0]
    # the annotations follow the image through the dense field of the inverse affine
    inverse_field = voxreg.affine_to_disp(voxreg.invert(affine), shape)
    moved_points = voxreg.warp_points(torch.as_tensor(points)[None], inverse_field)[0].numpy()

    # check: the moved image at the moved points shows what the image showed at the points
    before = image[tuple(points.round().astype(int).T)]
    inside = np.all((moved_points >= 0) & (moved_points <= np.array(shape) - 1), axis=1)
    idx = np.clip(moved_points.round().astype(int), 0, np.array(shape) - 1)
    after_values = moved.numpy()[idx[:, 0], idx[:, 1]]

    figure, axes = plt.subplots(1, 2, figsize=(8, 4.2), constrained_layout=True)
    for ax, picture, pts, title in [
        (axes[0], image, points, "moving image + annotations"),
        (axes[1], moved.numpy(), moved_points, "affinely warped image + warped annotations"),
    ]:
        ax.imshow(picture, cmap="gray", vmin=0, vmax=1)
        ax.scatter(pts[:, 1], pts[:, 0], s=60, c=[f"C{i}" for i in range(5)], edgecolors="white")
        for k, (r, c) in enumerate(pts):
            ax.annotate(str(k), (c, r), xytext=(4, -4), textcoords="offset points", color="yellow")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    figure.suptitle(f"{source}: warp with A, annotations with the field of inv(A)", fontsize=10)
    with atomic_path(out / "warp_annotations.png") as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)

    numbers = {
        "source": source,
        "affine": affine[0].tolist(),
        "points": points.tolist(),
        "moved_points": moved_points.tolist(),
        "intensity_at_points": before.tolist(),
        "intensity_at_moved_points": after_values.tolist(),
        "points_inside_image": inside.tolist(),
    }
    with atomic_path(out / "warp_annotations.json") as tmp:
        tmp.write_text(json.dumps(numbers, indent=2))
    np.set_printoptions(precision=3, suppress=True)
    print(f"digit: {source}")
    print(f"affine (voxel coordinates, about the centre, pull-back):\n{affine[0].numpy()}")
    print("annotation   before (row, col)   after (row, col)   intensity before -> after")
    for k in range(5):
        print(f"  {k}          {points[k]}        {moved_points[k]}     "
              f"{before[k]:.2f} -> {after_values[k]:.2f}")
    print(f"wrote {out / 'warp_annotations.png'} and {out / 'warp_annotations.json'}")
    return numbers


if __name__ == "__main__":
    main()
