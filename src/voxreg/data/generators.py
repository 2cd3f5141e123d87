"""Pairs of images for training: torch datasets and a VoxelMorph-style generator.

Images can be given as

* a numpy array or tensor ``(N, *spatial)`` (one channel each; with ``channels=True``,
  ``(N, C, *spatial)``);
* a list of arrays, all the same shape (``(*spatial)``, or ``(C, *spatial)`` with
  ``channels=True``);
* a list of anything (file names, ids) together with ``loader=``, a callable that turns one
  item into such an array; items are loaded when a pair needs them, so large 3D sets need not
  fit in memory.

Pairs are drawn at random but reproducibly: pair ``i`` of epoch ``e`` depends only on
``(seed, e, i)``, so a DataLoader with any number of workers, or a resumed run, sees the same
pairs. Call :meth:`set_epoch` (the trainer does) to draw fresh pairs each epoch.

Every item is a dict of float32 tensors ``moving`` and ``fixed`` ``(C, *spatial)``, plus int64
``moving_seg`` and ``fixed_seg`` ``(1, *spatial)`` when label maps are given; the default
``collate`` of a DataLoader stacks them into ``(B, C, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ImageSource", "ScanToAtlasDataset", "ScanToScanDataset", "vxm_data_generator"]


class ImageSource:
    """Uniform, indexable access to a set of same-shaped images (see the module doc).

    Args:
        images: array ``(N, ...)``, sequence of arrays, or sequence of items for ``loader``.
        loader: optional callable ``item -> array``.
        channels: the arrays already carry a leading channel axis.
        name: argument name used in error messages.
        dtype: numpy dtype the images are converted to (``None`` keeps theirs).
    """

    def __init__(
        self,
        images: Any,
        loader: Callable[[Any], Any] | None = None,
        channels: bool = False,
        name: str = "images",
        dtype: Any = np.float32,
    ):
        if loader is not None and not callable(loader):
            raise TypeError(f"loader must be callable, got {type(loader).__name__}")
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        if isinstance(images, np.ndarray) and loader is None:
            if images.ndim not in ((4, 5) if channels else (3, 4)):
                raise ValueError(
                    f"{name} must be an array (N, {'C, ' if channels else ''}*spatial) with 2 or "
                    f"3 spatial axes, got shape {images.shape}"
                )
        elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise TypeError(
                f"{name} must be an array (N, *spatial), a list of arrays, or a list of items "
                f"with loader=, got {type(images).__name__}"
            )
        if len(images) == 0:
            raise ValueError(f"{name} must hold at least one image")
        self.images = images
        self.loader = loader
        self.channels = channels
        self.name = name
        self.dtype = dtype
        first = self._raw(0)
        self.shape = first.shape  # per-image shape, channel axis included
        self.ndim = len(self.shape) - 1
        if self.ndim not in (2, 3):
            raise ValueError(
                f"each image of {name} must have 2 or 3 spatial axes"
                f"{' after its channel axis' if channels else ''}, got shape "
                f"{first.shape[1:] if not channels else first.shape}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def _raw(self, index: int) -> np.ndarray:
        item = self.images[index]
        if self.loader is not None:
            item = self.loader(item)
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        array = np.asarray(item)
        if self.dtype is not None:
            array = array.astype(self.dtype, copy=False)
        if not self.channels:
            array = array[None]
        return array

    def __getitem__(self, index: int) -> np.ndarray:
        """Image ``index`` as ``(C, *spatial)``."""
        array = self._raw(index)
        if array.shape != self.shape:
            raise ValueError(
                f"{self.name}[{index}] has shape {array.shape[0 if self.channels else 1:]}, "
                f"but {self.name}[0] has {self.shape[0 if self.channels else 1:]}: all images "
                "must share one shape"
            )
        return array

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def _unique_labels(source: ImageSource, limit: int = 64) -> list[int] | None:
    """Sorted labels present in the first ``limit`` label maps (all of them when in memory)."""
    if isinstance(source.images, np.ndarray) and source.loader is None:
        return [int(v) for v in np.unique(source.images)]
    if len(source) > limit:
        return None
    values: set[int] = set()
    for i in range(len(source)):
        values.update(int(v) for v in np.unique(source[i]))
    return sorted(values)


class _PairDataset(Dataset):
    def __init__(self, pairs_per_epoch: int | None, seed: int, default_len: int):
        if pairs_per_epoch is None:
            pairs_per_epoch = default_len
        if int(pairs_per_epoch) < 1:
            raise ValueError(f"pairs_per_epoch must be a positive integer, got {pairs_per_epoch}")
        self.pairs_per_epoch = int(pairs_per_epoch)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the pairs of epoch ``epoch`` (pair ``i`` depends on seed, epoch and ``i``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.pairs_per_epoch

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.pairs_per_epoch:
            raise IndexError(f"pair index {index} out of range for {self.pairs_per_epoch} pairs")
        return index

    @staticmethod
    def _item(moving, fixed, moving_seg=None, fixed_seg=None) -> dict[str, torch.Tensor]:
        item = {"moving": torch.from_numpy(moving), "fixed": torch.from_numpy(fixed)}
        if moving_seg is not None:
            item["moving_seg"] = torch.from_numpy(moving_seg.astype(np.int64))
            item["fixed_seg"] = torch.from_numpy(fixed_seg.astype(np.int64))
        return item


class ScanToScanDataset(_PairDataset):
    """Random pairs of distinct images of one set (subject-to-subject registration).

    Args:
        images: the images (see the module doc).
        pairs_per_epoch: length of the dataset; default ``len(images)``.
        seed: seed of the pair draw.
        segs: optional label maps matching ``images`` one to one (same forms; integer).
        loader: optional callable turning an item of ``images`` (and of ``segs``) into an array.
        channels: the images already carry a channel axis.

    ``labels`` lists the label values present in ``segs`` (when they are cheap to find), for
    a segmentation loss.
    """

    def __init__(
        self,
        images: Any,
        pairs_per_epoch: int | None = None,
        seed: int = 0,
        segs: Any = None,
        loader: Callable[[Any], Any] | None = None,
        channels: bool = False,
    ):
        self.images = ImageSource(images, loader, channels, "images")
        super().__init__(pairs_per_epoch, seed, len(self.images))
        self.segs = None
        self.labels = None
        if segs is not None:
            self.segs = ImageSource(segs, loader, False, "segs", dtype=None)
            if len(self.segs) != len(self.images):
                raise ValueError(
                    f"segs must hold one label map per image: {len(self.segs)} label maps for "
                    f"{len(self.images)} images"
                )
            if self.segs.spatial != self.images.spatial:
                raise ValueError(
                    f"segs must share the images' spatial shape {self.images.spatial}, got "
                    f"{self.segs.spatial}"
                )
            self.labels = _unique_labels(self.segs)

    @property
    def inshape(self) -> tuple[int, ...]:
        return self.images.spatial

    def pair(self, index: int) -> tuple[int, int]:
        """Indices ``(moving, fixed)`` of pair ``index`` in the current epoch."""
        index = self._check_index(index)
        n = len(self.images)
        rng = _rng(self.seed, self.epoch, index)
        i = int(rng.integers(n))
        if n == 1:
            return i, i
        j = int(rng.integers(n - 1))
        return i, j + (j >= i)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i, j = self.pair(index)
        if self.segs is None:
            return self._item(self.images[i], self.images[j])
        return self._item(self.images[i], self.images[j], self.segs[i], self.segs[j])


class ScanToAtlasDataset(_PairDataset):
    """Pairs of a random image and one atlas (VoxelMorph's atlas-based registration).

    Args:
        images: the images (see the module doc).
        atlas: one image, ``(*spatial)`` (or ``(C, *spatial)`` with ``channels=True``).
        pairs_per_epoch: length of the dataset; default ``len(images)``.
        seed: seed of the draw.
        segs, atlas_seg: optional label maps of the images and of the atlas (both or neither).
        direction: ``"scan_to_atlas"`` (moving = scan, fixed = atlas) or ``"atlas_to_scan"``.
        loader, channels: as for :class:`ScanToScanDataset` (``loader`` applies to the items
            of ``images`` and ``segs`` only).
    """

    def __init__(
        self,
        images: Any,
        atlas: Any,
        pairs_per_epoch: int | None = None,
        seed: int = 0,
        segs: Any = None,
        atlas_seg: Any = None,
        direction: str = "scan_to_atlas",
        loader: Callable[[Any], Any] | None = None,
        channels: bool = False,
    ):
        if direction not in ("scan_to_atlas", "atlas_to_scan"):
            raise ValueError(
                f"direction must be 'scan_to_atlas' or 'atlas_to_scan', got {direction!r}"
            )
        if (segs is None) != (atlas_seg is None):
            raise ValueError("give both segs and atlas_seg, or neither")
        self.images = ImageSource(images, loader, channels, "images")
        super().__init__(pairs_per_epoch, seed, len(self.images))
        self.direction = direction
        if isinstance(atlas, torch.Tensor):
            atlas = atlas.detach().cpu().numpy()
        atlas = np.asarray(atlas, dtype=np.float32)
        if not channels:
            atlas = atlas[None]
        if atlas.shape != self.images.shape:
            raise ValueError(
                f"atlas must have the images' shape {self.images.shape[0 if channels else 1:]}, "
                f"got {atlas.shape[0 if channels else 1:]}"
            )
        self.atlas = np.ascontiguousarray(atlas)
        self.segs = self.atlas_seg = self.labels = None
        if segs is not None:
            self.segs = ImageSource(segs, loader, False, "segs", dtype=None)
            if len(self.segs) != len(self.images) or self.segs.spatial != self.images.spatial:
                raise ValueError(
                    f"segs must hold one label map of shape {self.images.spatial} per image, got "
                    f"{len(self.segs)} of shape {self.segs.spatial}"
                )
            atlas_seg = np.asarray(
                atlas_seg.detach().cpu().numpy() if isinstance(atlas_seg, torch.Tensor) else atlas_seg
            )
            if atlas_seg.shape != self.images.spatial:
                raise ValueError(
                    f"atlas_seg must have shape {self.images.spatial}, got {atlas_seg.shape}"
                )
            self.atlas_seg = atlas_seg[None]
            found = _unique_labels(self.segs)
            if found is not None:
                self.labels = sorted(set(found) | {int(v) for v in np.unique(atlas_seg)})

    @property
    def inshape(self) -> tuple[int, ...]:
        return self.images.spatial

    def scan(self, index: int) -> int:
        """Index of the scan used by pair ``index`` in the current epoch."""
        index = self._check_index(index)
        return int(_rng(self.seed, self.epoch, index).integers(len(self.images)))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = self.scan(index)
        scan, atlas = self.images[i], self.atlas.copy()
        scan_seg = atlas_seg = None
        if self.segs is not None:
            scan_seg, atlas_seg = self.segs[i], self.atlas_seg.copy()
        if self.direction == "scan_to_atlas":
            return self._item(scan, atlas, scan_seg, atlas_seg)
        return self._item(atlas, scan, atlas_seg, scan_seg)


def vxm_data_generator(
    x: Any, batch_size: int = 32, seed: int | None = None
) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Endless batches of random pairs, as in the VoxelMorph MNIST tutorial (channels first).

    Args:
        x: images ``(N, *spatial)`` (numpy, tensor, or a list of same-shaped arrays).
        batch_size: pairs per batch.
        seed: seed of the draw (``None``: fresh randomness).

    Yields:
        ``([moving, fixed], [fixed, zero_field])``: ``moving`` and ``fixed`` float32
        ``(B, 1, *spatial)``; ``zero_field`` float32 ``(B, ndim, *spatial)`` of zeros (the
        target of the smoothness loss).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    source = ImageSource(x, name="x")
    stack = (
        source.images[:, None].astype(np.float32, copy=False)
        if isinstance(source.images, np.ndarray)
        else None
    )
    rng = np.random.default_rng(seed)
    zero = np.zeros((int(batch_size), source.ndim, *source.spatial), dtype=np.float32)
    while True:
        idx_moving = rng.integers(0, len(source), size=batch_size)
        idx_fixed = rng.integers(0, len(source), size=batch_size)
        if stack is not None:
            moving, fixed = stack[idx_moving], stack[idx_fixed]
        else:
            moving = np.stack([source[int(i)] for i in idx_moving])
            fixed = np.stack([source[int(i)] for i in idx_fixed])
        yield [moving, fixed], [fixed, zero]


def evaluation_pairs(n: int, count: int, seed: int = 0, stream: int = 0) -> np.ndarray:
    """``count`` distinct ordered pairs ``(moving, fixed)`` of ``n`` images (``moving != fixed``),
    drawn reproducibly from ``(seed, stream)``: ``(count, 2)`` int array, sorted."""
    if n < 2:
        raise ValueError(f"need at least 2 images for pairs, got {n}")
    count = min(int(count), n * (n - 1))
    rng = np.random.default_rng([int(seed), int(stream)])
    all_pairs = np.array([(i, j) for i in range(n) for j in range(n) if i != j])
    return all_pairs[np.sort(rng.choice(len(all_pairs), size=count, replace=False))]
