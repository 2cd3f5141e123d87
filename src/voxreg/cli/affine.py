"""``voxreg affine``: affine registration of two images (:func:`voxreg.apps.affine.affine_files`)."""

from __future__ import annotations

import click

from voxreg.apps.affine import affine_files
from voxreg.cli.options import int_list

__all__ = ["affine_command"]


@click.command("affine")
@click.argument("moving", type=click.Path())
@click.argument("fixed", type=click.Path())
@click.option("--moved", "-o", "moved_out", required=True, type=click.Path(),
              help="output: the moving image resampled onto the fixed grid (linear)")
@click.option("--transform", "transform_out", type=click.Path(),
              help="output: the affine as an ITK/ANTs text transform (.txt or .tfm; fixed -> "
              "moving, LPS mm), usable with antsApplyTransforms -t")
@click.option("--loss", type=click.Choice(["mi", "ncc", "lncc", "mse"]), default="mi",
              show_default=True,
              help="mi: mutual information (any contrasts); ncc: global normalised "
              "cross-correlation; lncc: local NCC; mse: same contrast only")
@click.option("--labels", "labels_in", type=click.Path(),
              help="a label map on the moving grid to carry along (values and dtype kept)")
@click.option("--moved-labels", "moved_labels_out", type=click.Path(),
              help="output: the --labels map on the fixed grid")
@click.option("--label-interp", type=click.Choice(["label", "nearest"]), default="label",
              show_default=True,
              help="how --labels is resampled: 'label' (the label whose linearly interpolated "
              "indicator is largest, as ANTs' genericLabel) or 'nearest'")
@click.option("--levels", default=None,
              help="pyramid shrink factors, coarse to fine (default 4,2,1)")
@click.option("--iterations", default=None,
              help="most optimiser iterations per level, one number or one per level (default "
              "200 Adam steps on the first level, then 30 and 10 L-BFGS iterations)")
@click.option("--init", type=click.Choice(["com", "center", "header"]), default="com",
              show_default=True,
              help="start: the headers' alignment plus matched centres of mass (com) or grid "
              "centres (center), or the headers' alignment alone (header)")
def affine_command(moving, fixed, moved_out, transform_out, loss, labels_in, moved_labels_out,
                   label_interp, levels, iterations, init):
    """Affine registration of MOVING to FIXED (12 parameters in 3D, 6 in 2D).

    The images may lie on different grids: their affines place them in the world and the
    result is written on the fixed grid with the fixed image's affine. Prints the seconds taken.
    """
    if labels_in is not None and moved_labels_out is None:
        raise ValueError("--labels and --moved-labels go together: give both or neither")
    out = affine_files(moving, fixed, moved=moved_out, transform=transform_out, loss=loss,
                       labels=labels_in, moved_labels=moved_labels_out,
                       label_interp=label_interp, levels=int_list(levels, "--levels"),
                       iterations=int_list(iterations, "--iterations"), init=init)
    click.echo(f"moved image: {moved_out}")
    if labels_in is not None:
        click.echo(f"moved labels: {moved_labels_out}")
    if transform_out is not None:
        click.echo(f"transform: {transform_out} (ITK affine, fixed -> moving, LPS mm)")
    click.echo(f"loss ({loss}): {out.result.initial_loss:.4f} -> {out.result.loss:.4f}")
    click.echo(f"seconds: {out.result.seconds:.3f}")
