"""Reading and writing images, label maps and displacement fields.

Formats (chosen by the file's extension):

=================  ==========================================================================
``.nii.gz .nii``   NIfTI-1 (nibabel); the affine maps voxel indices to RAS millimetres
``.mgz .mgh``      FreeSurfer MGH (nibabel)
``.npz``           numpy archive: key ``vol`` (images) or ``seg`` (label maps), or its only
                   array; pick one with ``key=``. Identity affine.
``.npy``           one numpy array. Identity affine.
=================  ==========================================================================

Arrays are ``(*spatial)``, or channels first ``(C, *spatial)`` (a 4D NIfTI ``(X, Y, Z, C)`` is
read as ``(C, X, Y, Z)`` and :attr:`Image.channels` is set), following ``docs/conventions.md``.

Writing (:func:`save_image`, :func:`save_warp`) is atomic: the data go to a temporary file in the
destination folder, which then replaces the destination in one step, so an output is either
whole or absent. Integer label maps stay integer (int64 is stored in the smallest integer type
that holds the values, since many tools cannot read 64-bit NIfTI); float64 is stored as float32.

Displacement fields (``(ndim, *spatial)``, voxels, pull-back: ``moved(x) = moving(x + disp(x))``)
are written as NIfTI vector images ``(*spatial, 1, ndim)`` with intent ``vector`` (1007):

* ``convention="voxreg"`` (default): the components along the array axes ``i, j, k``, in voxels
  (``units="voxel"``) or in world millimetres ``W[:3, :3] @ d`` (``units="mm"``, RAS, see
  :func:`voxreg.transforms.disp_to_world`). The header's ``intent_name`` records the units so
  that :func:`load_warp` can give back voxels.
* ``convention="ants"``: what ANTs/ITK expect from a displacement field: LPS millimetres, i.e.
  the RAS mm vector with its x and y components negated, float32, 5D. Such a file can be passed
  to ``antsApplyTransforms -t warp.nii.gz`` (moving image, reference = the fixed image), since
  ANTs fields also map a fixed-space point to the moving-space point (pull-back).

The package: :mod:`~voxreg.io.images` (images and label maps) and :mod:`~voxreg.io.warps`
(displacement fields). Import the names below from ``voxreg.io``.
"""

from voxreg.io.images import (
    SUPPORTED,
    Image,
    Normalize,
    check_output_file,
    check_output_path,
    format_of,
    load_image,
    load_labels,
    normalize,
    read_grid,
    resample_to,
    same_grid,
    save_image,
    voxel_sizes,
)
from voxreg.io.warps import load_warp, save_warp

__all__ = [
    "Image",
    "Normalize",
    "SUPPORTED",
    "check_output_file",
    "check_output_path",
    "format_of",
    "load_image",
    "load_labels",
    "load_warp",
    "normalize",
    "read_grid",
    "resample_to",
    "same_grid",
    "save_image",
    "save_warp",
    "voxel_sizes",
]
