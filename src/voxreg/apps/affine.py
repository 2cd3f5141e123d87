"""Affine registration of two image files: the pipeline of ``voxreg affine``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from voxreg import io
from voxreg.affine import AffineResult, register_affine
from voxreg.apps.files import ImageLike, as_image, describe, grid_error, source_path

__all__ = ["AffineFilesResult", "affine_files"]


@dataclass
class AffineFilesResult:
    """What :func:`affine_files` returns.

    Attributes:
        result: the :class:`voxreg.affine.AffineResult` (matrices, losses, ``seconds``).
        moved: the moving image (its original intensities, linear) on the fixed grid with the
            fixed affine (``path``: the file written, if any).
        moved_labels: with ``labels``: the label map on the fixed grid, else ``None``.
        written: the files written, by command-line option (``"--transform"``, ``"--moved"``,
            ``"--moved-labels"``), in writing order.
    """

    result: AffineResult
    moved: io.Image
    moved_labels: io.Image | None = None
    written: dict[str, Path] = field(default_factory=dict)


def affine_files(
    moving: ImageLike,
    fixed: ImageLike,
    *,
    moved: str | os.PathLike | None = None,
    transform: str | os.PathLike | None = None,
    loss: Literal["mi", "ncc", "lncc", "mse"] = "mi",
    labels: ImageLike | None = None,
    moved_labels: str | os.PathLike | None = None,
    label_interp: Literal["label", "nearest"] = "label",
    levels: Sequence[int] | None = None,
    iterations: Sequence[int] | int | None = None,
    init: Literal["com", "center", "header"] = "com",
) -> AffineFilesResult:
    """Affine registration of ``moving`` to ``fixed`` (12 parameters in 3D, 6 in 2D), as
    ``voxreg affine`` does (:func:`voxreg.affine.register_affine`).

    The images may lie on different grids: their affines place them in the world, and the
    results lie on the fixed grid with the fixed image's affine. The transform pulls back
    (fixed -> moving, ``docs/conventions.md`` rules 5 and 12).

    Args:
        moving, fixed: file paths, nibabel images or :class:`voxreg.io.Image` objects (never
            modified), one channel, 2D or 3D.
        moved: output file of the moved image (``None``: not written, only returned).
        transform: output ITK/ANTs text transform (``.txt``/``.tfm``; fixed -> moving, LPS mm).
        loss: ``"mi"``, ``"ncc"``, ``"lncc"`` or ``"mse"``.
        labels: a label map on the moving grid to carry along (values and dtype kept).
        moved_labels: output file of the carried label map (needs ``labels``).
        label_interp: ``"label"`` (as ANTs' genericLabel) or ``"nearest"``.
        levels, iterations, init: as :func:`voxreg.affine.register_affine` (default: its own).

    Returns:
        An :class:`AffineFilesResult`. Outputs are written atomically, the transform first.

    Raises:
        FileNotFoundError: a missing input (named).
        ValueError: an output that is an input, cannot be written or repeats another; a
            ``transform`` that is not ``.txt``/``.tfm``; ``moved_labels`` without ``labels``;
            labels off the moving grid; a multi-channel image.

    >>> out = affine_files("moving.nii.gz", "fixed.nii.gz", moved="moved.nii.gz",
    ...                    transform="affine.txt", loss="ncc")  # doctest: +SKIP
    >>> out.result.world_matrix.shape  # doctest: +SKIP
    (4, 4)
    """
    for value, what in ((moving, "moving image"), (fixed, "fixed image"), (labels, "--labels")):
        if isinstance(value, (str, os.PathLike)) and not Path(value).exists():
            raise FileNotFoundError(f"{what} {str(value)!r} does not exist")
    if moved_labels is not None and labels is None:
        raise ValueError("--labels and --moved-labels go together: give both or neither")
    inputs = tuple(p for p in map(source_path, (moving, fixed, labels)) if p is not None)
    outputs = []
    if moved is not None:
        outputs.append(io.check_output_path(moved, inputs))
    if moved_labels is not None:
        outputs.append(io.check_output_path(moved_labels, inputs))
    if transform is not None:
        if not str(transform).lower().endswith((".txt", ".tfm")):
            raise ValueError(f"--transform must be a .txt or .tfm file (ITK text), got {str(transform)!r}")
        outputs.append(io.check_output_file(transform, inputs))
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise ValueError("--moved, --moved-labels and --transform must be different files")
    options: dict[str, Any] = {"loss": loss, "init": init}
    if levels is not None:
        options["levels"] = list(levels)
    if iterations is not None:
        options["iterations"] = iterations

    mov, fix = as_image(moving, "moving"), as_image(fixed, "fixed")
    for image, what in ((mov, "moving image"), (fix, "fixed image")):
        if image.channels:
            raise ValueError(f"{what} {describe(image)} has several channels; 'voxreg affine' "
                             "reads one-channel images")
    label_map = None
    if labels is not None:
        label_map = as_image(labels, "--labels", labels=True)
        if not io.same_grid(label_map, mov):
            raise ValueError(grid_error(label_map, mov, "--labels", "moving image")
                             + "; the labels must lie on the moving image's grid")
    result = register_affine(mov, fix, **options)
    moved_image = result.resample(mov, interp="linear")
    written: dict[str, Path] = {}
    if transform is not None:
        written["--transform"] = result.save_itk(transform)
    moved_image = io.Image(moved_image.data, fix.affine, fix.header, None, moved_image.channels)
    if moved is not None:
        written["--moved"] = moved_image.path = io.save_image(
            moved, moved_image.data, affine=fix.affine, header=fix.header)
    labels_image = None
    if label_map is not None:
        carried = result.resample(label_map, interp=label_interp)
        labels_image = io.Image(carried.data, fix.affine, fix.header, None, carried.channels)
        if moved_labels is not None:
            written["--moved-labels"] = labels_image.path = io.save_image(
                moved_labels, carried.data, affine=fix.affine, header=fix.header)
    return AffineFilesResult(result, moved_image, labels_image, written)
