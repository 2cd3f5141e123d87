"""``voxreg template``: learn a template of image files
(:func:`voxreg.apps.template.template_from_files`)."""

from __future__ import annotations

import click

from voxreg.apps.template import template_from_files
from voxreg.cli.options import DEVICE, NORMALIZE, NORMALIZE_HELP, float_list, int_list

__all__ = ["template_command"]


@click.command("template")
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--out", "-o", "out", required=True, type=click.Path(),
              help="output: the learned template, on the inputs' grid with their affine "
              "(conditional: the template at the mean attribute value)")
@click.option("--list", "list_file", type=click.Path(), help="text file with one image path per line")
@click.option("--glob", "pattern", help="glob pattern of the images (quote it)")
@click.option("--run", "run_dir", type=click.Path(),
              help="run folder: checkpoint.safetensors, model.safetensors, history.csv, loss.png, "
              "snapshots/ (default: OUT's name without extension + '-run', next to OUT)")
@click.option("--epochs", default=10, show_default=True, type=int, help="total epochs")
@click.option("--steps-per-epoch", default=None, type=int,
              help="optimizer steps per epoch (default: number of images / batch size)")
@click.option("--batch-size", default=1, show_default=True, type=int, help="subjects per step")
@click.option("--lr", default=1e-3, show_default=True, type=float,
              help="Adam learning rate of the template and the networks (VoxelMorph uses 1e-4 "
              "over far longer training)")
@click.option("--lambda", "lambda_", default=0.01, show_default=True, type=float,
              help="weight of the velocity smoothness (gradient l2) loss")
@click.option("--mean-weight", default=1.0, show_default=True, type=float,
              help="weight of the penalty on the running mean velocity (keeps the template "
              "centred in the population)")
@click.option("--image-loss", type=click.Choice(["mse", "ncc"]), default="mse", show_default=True,
              help="image similarity, used in both directions")
@click.option("--int-steps", default=7, show_default=True, type=int,
              help="scaling-and-squaring steps (> 0: diffeomorphic)")
@click.option("--int-downsize", default=2, show_default=True, type=int,
              help="integrate the velocity on a grid this many times coarser")
@click.option("--enc", default="16,32,32,32", show_default=True,
              help="encoder features per level of the registration UNet")
@click.option("--dec", default="32,32,32,32,32,16,16", show_default=True, help="decoder features")
@click.option("--attributes", "attributes_csv", type=click.Path(),
              help="CSV table of subject attributes for a conditional template; rows are matched "
              "to images by an 'id' column (file name without extension) or a 'path' column")
@click.option("--attribute", "attribute", default=None,
              help="the attribute column(s) of --attributes to condition on, comma-separated "
              "(e.g. age)")
@click.option("--at", "at_values", default=None,
              help="conditional only: also write the template at these attribute values "
              "(comma-separated, one attribute), as OUT with '_<attribute><value>' before the "
              "extension")
@click.option("--resume", is_flag=True, help="continue from RUN/checkpoint.safetensors")
@click.option("--snapshot-every", default=0, show_default=True, type=int,
              help="every N epochs (and at the end) save the template as a PNG of its "
              "(mid-)slices and an image file in RUN/snapshots (0: never)")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--normalize", type=NORMALIZE, default="percentile", show_default=True,
              help=NORMALIZE_HELP)
@click.option("--seed", default=0, show_default=True, type=int,
              help="seeds the weights and the batch draws")
@click.option("--progress/--no-progress", default=True, help="show a progress bar")
def template_command(images, out, list_file, pattern, run_dir, epochs, steps_per_epoch,
                     batch_size, lr, lambda_, mean_weight, image_loss, int_steps, int_downsize,
                     enc, dec, attributes_csv, attribute, at_values, resume, snapshot_every,
                     device, normalize, seed, progress):
    """Learn a template (atlas) of IMAGES (and/or --list / --glob).

    The template starts as the voxel-wise mean of the images and is learned jointly with a
    diffeomorphic bidirectional VxmDense that registers it to each subject, with a penalty on the
    mean deformation so it stays centred (Dalca et al., NeurIPS 2019). With --attributes and
    --attribute, a conditional template: mean image + a decoder of the attributes (e.g. age).
    All images must share one grid (shape and affine).
    """
    result = template_from_files(
        images, out=out, list_file=list_file, glob=pattern, run=run_dir, epochs=epochs,
        steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr, lambda_=lambda_,
        mean_weight=mean_weight, image_loss=image_loss, int_steps=int_steps,
        int_downsize=int_downsize, enc=int_list(enc, "--enc"), dec=int_list(dec, "--dec"),
        attributes=attributes_csv, attribute=attribute, at=float_list(at_values, "--at"),
        resume=resume, snapshot_every=snapshot_every, device=device, normalize=normalize,
        seed=seed, progress=progress, log=click.echo)
    if result.history:
        last = result.history[-1]
        click.echo(f"epoch {last['epoch']}: loss {last.get('loss', float('nan')):.6g}, "
                   f"mean displacement {last.get('mean_disp_rms', float('nan')):.3g} voxels (RMS)")
    if result.template_sharpness is not None:
        click.echo(f"sharpness (RMS gradient): template {result.template_sharpness:.4g},"
                   f" voxel-wise mean {result.mean_sharpness:.4g}")
    click.echo(f"template: {result.out}")
    for _, path in result.at:
        click.echo(f"template: {path}")
    click.echo(f"run: {result.run}")
