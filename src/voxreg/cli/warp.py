"""``voxreg warp``: resample an image through saved transforms
(:func:`voxreg.apps.warp.warp_file`)."""

from __future__ import annotations

import click

from voxreg.apps.warp import warp_file
from voxreg.cli.options import NORMALIZE, NORMALIZE_HELP
from voxreg.io import CONVENTIONS

__all__ = ["warp_command"]


@click.command("warp")
@click.argument("image", type=click.Path())
@click.option("--transform", "-t", "transforms", multiple=True, metavar="T",
              help="a transform, repeatable, in ANTs order (antsApplyTransforms -t T1 -t T2: a "
              "reference point y reads IMAGE at T2(T1(y))): a displacement field (.nii.gz, .nii, "
              ".mgz, .npz) or an affine (.mat, .txt, .tfm); '[affine.mat,1]' for its inverse. "
              "Needs -r")
@click.option("--reference", "-r", type=click.Path(),
              help="with -t: the image whose grid the output takes (antsApplyTransforms -r)")
@click.option("--warp", "warp_path", type=click.Path(),
              help="instead of -t/-r: one field, the output on its grid (e.g. 'voxreg register "
              "--warp'); IMAGE on that grid unless --resample")
@click.option("--out", "-o", "out", required=True, type=click.Path(), help="output image")
@click.option("--interp", type=click.Choice(["linear", "nearest", "label"]), default="linear",
              show_default=True, help="for label maps 'label' (the label whose linearly "
              "interpolated indicator is largest, as ANTs' genericLabel) or 'nearest': both keep "
              "label values and dtype")
@click.option("--warp-convention", type=click.Choice(list(CONVENTIONS)), default=None,
              help="convention of field files that do not state theirs (a 4D NIfTI, an MGZ, a "
              "plain .npz): 'lps-mm' (ANTs/ITK), 'ras-mm' (FreeSurfer, mri_synthmorph), "
              "'voxel' (voxels of the field's grid)")
@click.option("--key", default=None, metavar="KEY",
              help="the array of an IMAGE .npz holding several: 'vol' (image) or 'seg' (labels)")
@click.option("--normalize", type=NORMALIZE, default="none", show_default=True, help=NORMALIZE_HELP)
@click.option("--resample", is_flag=True,
              help="with --warp: accept IMAGE on another grid than the warp's (read through the "
              "affines in the same single interpolation)")
def warp_command(image, transforms, reference, warp_path, out, interp, warp_convention, key,
                 normalize, resample):
    """Resample IMAGE through saved transforms, in one interpolation.

    voxreg warp IMAGE -r REFERENCE -t T1 [-t T2 ...] -o OUT applies the transforms as
    antsApplyTransforms does (the first one acts first on the reference points) and writes OUT
    on REFERENCE's grid; IMAGE may lie on any grid. voxreg warp IMAGE --warp W -o OUT applies one
    field, the output on the field's grid (pull-back: out(x) = image(x + disp(x))). Intensities
    keep their units (float32) unless --normalize; --interp nearest/label keep a label map's
    values and dtype.
    """
    warp_file(image, warp_path, out, transforms=list(transforms) or None, reference=reference,
              interp=interp, normalize=normalize, resample=resample,
              warp_convention=warp_convention, key=key)
    click.echo(f"warped image: {out}")
