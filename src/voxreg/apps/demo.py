"""``voxreg demo``: the MNIST tutorial (:func:`voxreg.apps.tutorial.mnist_tutorial`), full or
short."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from voxreg.apps import tutorial

__all__ = ["QUICK_DEMO", "run_demo"]

#: The short schedule of ``quick=True``: 2 epochs of 10 steps, 2 example figures.
QUICK_DEMO = {"epochs": 2, "steps_per_epoch": 10, "examples": 2}


def run_demo(out_dir: str | os.PathLike = "voxreg-demo", quick: bool = False) -> Any:
    """Run the MNIST tutorial into ``out_dir``: train a small 2D model, register digits, save the
    pictures, ``results.json`` and the training files there.

    Args:
        out_dir: output folder (created; it must not be a file).
        quick: a short training run (:data:`QUICK_DEMO`) instead of the full tutorial.

    Returns:
        What the tutorial returns (a dict of its headline numbers).

    Raises:
        NotADirectoryError: ``out_dir`` is a file.
        ValueError: this installation has no ``voxreg.apps.tutorial.mnist_tutorial``.

    >>> run_demo("demo", quick=True)  # doctest: +SKIP
    """
    function = getattr(tutorial, "mnist_tutorial", None)  # looked up now: it may be replaced
    if function is None:
        raise ValueError("voxreg.apps.tutorial has no mnist_tutorial(); this installation is incomplete")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out_dir)!r} is a file, not a folder")
    kwargs = {}
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        params = {}
    if quick:
        if "quick" in params:
            kwargs["quick"] = True
        else:  # a short run: a few small epochs
            kwargs.update({k: v for k, v in QUICK_DEMO.items() if k in params})
    return function(out, **kwargs)
