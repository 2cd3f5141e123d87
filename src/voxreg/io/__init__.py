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

Writing (:func:`save_image`, :func:`save_displacement`) is atomic: the data go to a temporary
file in the destination folder, which then replaces the destination in one step, so an output is
either whole or absent. Integer label maps stay integer (int64 is stored in the smallest integer
type that holds the values, since many tools cannot read 64-bit NIfTI); float64 is stored as
float32.

Displacement fields (``(ndim, *spatial)``, voxels, pull-back: ``moved(x) = moving(x + disp(x))``)
are written in one of three conventions that the file states (:mod:`voxreg.io.warps`):
``"lps-mm"`` (ANTs/ITK, a 5D vector NIfTI), ``"ras-mm"`` (FreeSurfer/mri_synthmorph, a 4D NIfTI or
an MGZ) and ``"voxel"`` (voxreg's own, ``.npz`` only, so that no other tool misreads it).
:func:`load_displacement` reads them back in voxels, and refuses to guess the convention of an
untagged file other than ITK's 5D layout.

The package: :mod:`~voxreg.io.images` (images and label maps) and :mod:`~voxreg.io.warps`
(displacement fields). Import the names below from ``voxreg.io``.
"""

from voxreg.io.images import (
    SUPPORTED,
    Image,
    Normalize,
    check_affine,
    check_input_file,
    check_output_file,
    check_output_path,
    format_of,
    load_image,
    load_labels,
    normalize,
    npz_keys,
    read_grid,
    resample_to,
    same_grid,
    save_image,
    voxel_sizes,
)
from voxreg.io.warps import (
    CONVENTIONS,
    FIELD_FORMATS,
    Convention,
    as_disp,
    load_displacement,
    load_warp,
    resolve_convention,
    save_displacement,
    save_warp,
)

__all__ = [
    "CONVENTIONS",
    "Convention",
    "FIELD_FORMATS",
    "Image",
    "Normalize",
    "SUPPORTED",
    "as_disp",
    "check_affine",
    "check_input_file",
    "check_output_file",
    "check_output_path",
    "format_of",
    "load_displacement",
    "load_image",
    "load_labels",
    "load_warp",
    "normalize",
    "npz_keys",
    "read_grid",
    "resample_to",
    "resolve_convention",
    "same_grid",
    "save_displacement",
    "save_image",
    "save_warp",
    "voxel_sizes",
]
