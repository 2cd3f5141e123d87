"""The domain of a shipped model: the grid, space, content and intensities it was trained on.

A registration network works best on images prepared like its training data. Every shipped model
records that domain in its file (``metadata["domain"]``); :class:`ModelDomain` reads it, and the
file-level pipeline (:mod:`voxreg.apps.native`) uses it to bring any pair of scans into the
model's domain and back.

Fields:

==================  ==========================================================================
``ndim``            2 or 3
``shape``           the grid, e.g. ``(96, 112, 96)``
``affine``          ``(4, 4)`` voxel index -> world millimetres (RAS) of that grid; for 2D
                    models the third column is the slice normal
``space``           the world space in words (e.g. MNI152 2009a nonlinear symmetric)
``skull_stripped``  whether the training images were skull-stripped (``None``: not a head)
``normalize``       how intensities were scaled: ``{"method": "percentile", "upper": 99.5,
                    "within": "brain mask", "clip": [0, 1]}`` (divide by the 99.5th
                    percentile inside the brain, clip to [0, 1]) or ``{"method": "minmax"}``
``contrast``        what the model registers (``"T1"``, ``"any"`` for contrast-agnostic
                    models, ``"digits"``)
``reference``       stem of the reference image shipped with voxreg (``models/<stem>.nii.gz``)
                    that defines the space, or ``None``
``mask``            stem of the reference's brain mask, or ``None``
``purpose``         ``"registration"`` (a pair -> a warp) or ``"template"`` (a learned template
                    and its network)
==================  ==========================================================================

The reference of the 3D brain models is voxreg's own learned template of IXI T1 brains in the
MNI152 2 mm grid (the template of the shipped ``template3d`` model), with a brain mask derived
from it; both ship in ``voxreg/models/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voxreg import io
from voxreg._runtime import MODELS_DIR

__all__ = ["ModelDomain", "model_domain"]


@dataclass(frozen=True)
class ModelDomain:
    """What a model was trained on (see the module doc for the fields).

    >>> d = ModelDomain.from_metadata({"ndim": 2, "shape": [32, 32], "space": "MNIST digits",
    ...                                "contrast": "digits", "normalize": {"method": "minmax"}})
    >>> d.shape, d.voxel_size, d.purpose
    ((32, 32), (1.0, 1.0), 'registration')
    """

    ndim: int
    shape: tuple[int, ...]
    affine: np.ndarray = field(repr=False)
    space: str = ""
    skull_stripped: bool | None = None
    normalize: Mapping[str, Any] = field(default_factory=lambda: {"method": "minmax"})
    contrast: str = ""
    reference: str | None = None
    mask: str | None = None
    purpose: str = "registration"

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any] | None) -> ModelDomain | None:
        """The domain stored in a model's metadata (``metadata["domain"]``), or ``None``.

        Raises:
            ValueError: when the entry is malformed (names the field).
        """
        if not meta:
            return None
        if not isinstance(meta, Mapping):
            raise ValueError(f"a model's domain must be a mapping, got {type(meta).__name__}")
        try:
            ndim = int(meta["ndim"])
            shape = tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"a model's domain needs 'ndim' and 'shape' ({err})") from None
        if ndim not in (2, 3) or len(shape) != ndim or min(shape) < 1:
            raise ValueError(f"a model's domain has ndim {ndim} and shape {shape}")
        affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(
                np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("a model's domain 'affine' must be an invertible (4, 4) matrix")
        return cls(ndim=ndim, shape=shape, affine=affine, space=str(meta.get("space", "")),
                   skull_stripped=meta.get("skull_stripped"),
                   normalize=dict(meta.get("normalize", {"method": "minmax"})),
                   contrast=str(meta.get("contrast", "")), reference=meta.get("reference"),
                   mask=meta.get("mask"), purpose=str(meta.get("purpose", "registration")))

    def to_metadata(self) -> dict[str, Any]:
        """The JSON-ready entry stored as ``metadata["domain"]``."""
        return {"ndim": self.ndim, "shape": list(self.shape), "affine": self.affine.tolist(),
                "space": self.space, "skull_stripped": self.skull_stripped,
                "normalize": dict(self.normalize), "contrast": self.contrast,
                "reference": self.reference, "mask": self.mask, "purpose": self.purpose}

    @property
    def voxel_size(self) -> tuple[float, ...]:
        """Voxel size in millimetres along each array axis."""
        return io.voxel_sizes(self.affine, self.ndim)

    @property
    def orientation(self) -> str:
        """Axis codes of the grid, e.g. ``"RAS"``: for each array axis, the world direction
        (Right/Left, Anterior/Posterior, Superior/Inferior) it runs towards most."""
        codes = []
        for axis in range(self.ndim):
            column = self.affine[:3, axis]
            world = int(np.argmax(np.abs(column)))
            codes.append(("RAS" if column[world] > 0 else "LPI")[world])
        return "".join(codes)

    def on_grid(self, image: io.Image, atol: float = 1e-3) -> bool:
        """Whether ``image`` already lies on this domain's grid (shape and affine)."""
        return tuple(image.shape) == self.shape and bool(np.allclose(image.affine, self.affine,
                                                                     atol=atol))

    def reference_image(self) -> io.Image:
        """The shipped reference image of this domain (float32 on the domain grid).

        Raises:
            ValueError: when the domain has no reference.
        """
        return io.load_image(self._shipped(self.reference, "reference"))

    def reference_mask(self) -> np.ndarray:
        """The reference's brain mask, boolean on the domain grid."""
        return np.asarray(io.load_labels(self._shipped(self.mask, "mask")).data) > 0

    def scale_intensities(self, data: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Scale an image's intensities as the training data were (float32).

        ``percentile``: divide by the ``upper`` percentile of the voxels inside ``mask`` (all
        positive voxels without one) and clip to ``clip``; ``minmax``: ``(x - min) / (max -
        min)``. A scan's background and outliers therefore do not move the brain's range.
        """
        array = np.asarray(data, dtype=np.float32)
        method = self.normalize.get("method", "minmax")
        if method == "percentile":
            inside = array[mask] if mask is not None else array[array > 0]
            upper = float(np.percentile(inside, float(self.normalize.get("upper", 99.5)))) \
                if inside.size else 0.0
            lo, hi = self.normalize.get("clip", (0.0, 1.0))
            if upper <= 0:
                return np.zeros_like(array)
            return np.clip(array / upper, lo, hi).astype(np.float32)
        return io.normalize(array, "minmax")

    def describe(self) -> str:
        """One line: grid, voxel size, orientation, space, content and intensities."""
        size = "x".join(f"{v:g}" for v in self.voxel_size)
        grid = "x".join(map(str, self.shape))
        parts = [f"{self.ndim}D {grid} at {size} mm {self.orientation}"]
        if self.space:
            parts.append(self.space)
        if self.skull_stripped is not None:
            parts.append("skull-stripped" if self.skull_stripped else "whole head")
        if self.contrast:
            parts.append(f"contrast {self.contrast}")
        method = self.normalize.get("method", "minmax")
        parts.append("intensities / p99.5 in brain, clipped to [0, 1]" if method == "percentile"
                     else "intensities min-max to [0, 1]")
        return "; ".join(parts)

    @staticmethod
    def _shipped(stem: str | None, what: str):
        if not stem:
            raise ValueError(f"this model's domain has no {what} image")
        path = MODELS_DIR / f"{stem}.nii.gz"
        if not path.is_file():
            raise FileNotFoundError(f"the domain's {what} {stem!r} is not shipped ({path})")
        return path


def model_domain(model: Any) -> ModelDomain | None:
    """The domain of a loaded model (from ``model.metadata["domain"]``), or ``None`` when its
    file records none."""
    meta = getattr(model, "metadata", None) or {}
    return ModelDomain.from_metadata(meta.get("domain"))
