"""Data: MNIST loading and preparation, and pair generators for training.

* :func:`load_mnist`, :func:`prepare_digits`, :func:`find_mnist` (:mod:`voxreg.data.mnist`);
* :class:`ScanToScanDataset`, :class:`ScanToAtlasDataset` (torch ``Dataset`` s of image pairs)
  and the VoxelMorph-tutorial-style generator :func:`vxm_data_generator`
  (:mod:`voxreg.data.generators`);
* SynthMorph-style synthetic pairs: :class:`SynthPairDataset`, :func:`synth_label_maps`,
  :func:`synth_images`, :func:`synth_pair` (:mod:`voxreg.data.synthesis`);
* per-image attributes from CSV tables: :func:`read_attributes`, :func:`image_id`
  (:mod:`voxreg.data.tables`).
"""

from voxreg.data.generators import (
    ImageSource,
    ScanToAtlasDataset,
    ScanToScanDataset,
    evaluation_pairs,
    vxm_data_generator,
)
from voxreg.data.mnist import find_mnist, load_mnist, prepare_digits
from voxreg.data.synthesis import (
    ImageSynthesis,
    LabelSynthesis,
    SynthPairDataset,
    synth_images,
    synth_label_maps,
    synth_pair,
)
from voxreg.data.tables import image_id, read_attributes

__all__ = [
    "ImageSource",
    "ImageSynthesis",
    "LabelSynthesis",
    "ScanToAtlasDataset",
    "ScanToScanDataset",
    "SynthPairDataset",
    "evaluation_pairs",
    "find_mnist",
    "image_id",
    "load_mnist",
    "prepare_digits",
    "read_attributes",
    "synth_images",
    "synth_label_maps",
    "synth_pair",
    "vxm_data_generator",
]
