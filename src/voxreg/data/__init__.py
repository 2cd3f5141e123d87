"""Data: MNIST loading and preparation, and pair generators for training.

* :func:`load_mnist`, :func:`prepare_digits`, :func:`find_mnist` (:mod:`voxreg.data.mnist`);
* :class:`ScanToScanDataset`, :class:`ScanToAtlasDataset` (torch ``Dataset`` s of image pairs)
  and the VoxelMorph-tutorial-style generator :func:`vxm_data_generator`
  (:mod:`voxreg.data.generators`).
"""

from voxreg.data.generators import (
    ImageSource,
    ScanToAtlasDataset,
    ScanToScanDataset,
    evaluation_pairs,
    vxm_data_generator,
)
from voxreg.data.mnist import find_mnist, load_mnist, prepare_digits

__all__ = [
    "ImageSource",
    "ScanToAtlasDataset",
    "ScanToScanDataset",
    "evaluation_pairs",
    "find_mnist",
    "load_mnist",
    "prepare_digits",
    "vxm_data_generator",
]
