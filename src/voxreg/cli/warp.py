"""``voxreg warp``: apply a saved displacement to an image (:func:`voxreg.apps.warp.warp_file`)."""

from __future__ import annotations

import click

from voxreg.apps.warp import warp_file
from voxreg.cli.options import NORMALIZE, NORMALIZE_HELP

__all__ = ["warp_command"]


@click.command("warp")
@click.argument("image", type=click.Path())
@click.option("--warp", "warp_path", required=True, type=click.Path(),
              help="a field written by 'voxreg register --warp' (any units or format)")
@click.option("--out", "-o", "out", required=True, type=click.Path(), help="output image")
@click.option("--interp", type=click.Choice(["linear", "nearest", "label"]), default="linear",
              show_default=True, help="for label maps 'label' (the label whose linearly "
              "interpolated indicator is largest, as ANTs' genericLabel) or 'nearest': both keep "
              "label values and dtype")
@click.option("--normalize", type=NORMALIZE, default="none", show_default=True, help=NORMALIZE_HELP)
@click.option("--resample", is_flag=True,
              help="first resample IMAGE onto the warp's grid via the affines if the grids differ")
def warp_command(image, warp_path, out, interp, normalize, resample):
    """Apply a saved displacement to IMAGE (pull-back: out(x) = image(x + disp(x))).

    The output lies on the warp's (fixed) grid with its affine. IMAGE must be on that grid (as the
    moving image was when it was registered) unless --resample is given.
    """
    warp_file(image, warp_path, out, interp=interp, normalize=normalize, resample=resample)
    click.echo(f"warped image: {out}")
