"""``voxreg train``: train a VoxelMorph model on image files
(:func:`voxreg.apps.train.train_from_files`)."""

from __future__ import annotations

import click

from voxreg.apps.train import train_from_files
from voxreg.cli.options import DEVICE, NORMALIZE, NORMALIZE_HELP, int_list

__all__ = ["train"]


@click.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--list", "list_file", type=click.Path(), help="text file with one image path per line")
@click.option("--glob", "pattern", help="glob pattern of training images (quote it)")
@click.option("--atlas", type=click.Path(), help="train scan-to-atlas to this fixed image "
              "(default: scan-to-scan on random pairs)")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(),
              help="output folder: checkpoint.safetensors, model.safetensors, history.csv, loss.png")
@click.option("--enc", default="16,32,32,32", show_default=True, help="encoder features per level")
@click.option("--dec", default="32,32,32,32,32,16,16", show_default=True, help="decoder features")
@click.option("--int-steps", default=7, show_default=True, type=int,
              help="scaling-and-squaring steps (0: plain displacement model)")
@click.option("--int-downsize", default=2, show_default=True, type=int)
@click.option("--bidir", is_flag=True, help="bidirectional (symmetric) image loss")
@click.option("--image-loss", type=click.Choice(["mse", "ncc", "mi"]), default="mse",
              show_default=True, help="image similarity loss (not used with --synth)")
@click.option("--lambda", "lambda_", default=0.01, show_default=True, type=float,
              help="weight of the smoothness (gradient) loss")
@click.option("--seg", "seg_paths", multiple=True, type=click.Path(),
              help="label map of a training image (repeat it, in the images' order); for "
              "--seg-weight, or to seed --synth with real anatomy")
@click.option("--seg-list", type=click.Path(),
              help="text file with one label-map path per line, matched to the images in order")
@click.option("--seg-glob", help="glob pattern of label maps (sorted, quote it), matched to the "
              "images in order")
@click.option("--atlas-seg", type=click.Path(), help="label map of --atlas (with --seg-weight)")
@click.option("--seg-weight", type=float, default=None,
              help="semi-supervised VoxelMorph: add W x Dice loss between the warped moving label "
              "map and the fixed one (needs label maps; images alone at test time). With --synth: "
              "the Dice weight (default 1)")
@click.option("--seg-labels", default=None,
              help="comma-separated label values of the Dice loss (default: every non-zero label "
              "of the label maps)")
@click.option("--seg-downsize", default=1, show_default=True, type=int,
              help="compute the Dice loss on a grid this many times coarser (faster, e.g. 2 in 3D)")
@click.option("--synth", is_flag=True,
              help="SynthMorph: train on synthetic label maps with random-contrast images only "
              "(Dice on the warped labels + lambda x Grad; no image loss). IMAGES are not needed: "
              "give --shape (or IMAGES / label maps for the grid; label maps then seed the synthesis)")
@click.option("--shape", default=None, help="--synth: spatial shape of the pairs, e.g. 96,112 or "
              "96,112,96")
@click.option("--synth-labels", default=16, show_default=True, type=int,
              help="--synth: classes of each synthetic label map")
@click.option("--synth-blob", default=12.0, show_default=True, type=float,
              help="--synth: size of the synthetic label regions (voxels between noise nodes)")
@click.option("--synth-warp", default=4.0, show_default=True, type=float,
              help="--synth: largest std (voxels) of the random velocity that deforms each side of "
              "a pair")
@click.option("--epochs", default=10, show_default=True, type=int, help="total epochs")
@click.option("--steps-per-epoch", default=None, type=int,
              help="optimizer steps per epoch (default: number of images / batch size; 100 with "
              "--synth)")
@click.option("--batch-size", default=1, show_default=True, type=int)
@click.option("--lr", default=1e-4, show_default=True, type=float)
@click.option("--resume", is_flag=True, help="continue from OUT/checkpoint.safetensors")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--normalize", type=NORMALIZE, default="percentile", show_default=True,
              help=NORMALIZE_HELP + " (stored with the model; register/eval use it by default)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--progress/--no-progress", default=True, help="show a progress bar")
def train(images, list_file, pattern, atlas, out_dir, enc, dec, int_steps, int_downsize, bidir,
          image_loss, lambda_, seg_paths, seg_list, seg_glob, atlas_seg, seg_weight, seg_labels,
          seg_downsize, synth, shape, synth_labels, synth_blob, synth_warp, epochs,
          steps_per_epoch, batch_size, lr, resume, device, normalize, seed, progress):
    """Train a VoxelMorph model (VxmDense) on IMAGES (and/or --list / --glob).

    All images (and the atlas) must share one grid. Without --atlas, random pairs of training
    images are registered to each other. With --seg-weight W and one label map per image
    (--seg / --seg-list / --seg-glob, in the images' order), the loss adds W x Dice of the warped
    labels (semi-supervised). With --synth, the model is trained on synthetic pairs only
    (SynthMorph): random label maps and random-contrast images, Dice loss on the labels.
    """
    run = train_from_files(
        images, out=out_dir, list_file=list_file, glob=pattern, atlas=atlas,
        enc=int_list(enc, "--enc"), dec=int_list(dec, "--dec"), int_steps=int_steps,
        int_downsize=int_downsize, bidir=bidir, image_loss=image_loss, lambda_=lambda_,
        seg=seg_paths, seg_list=seg_list, seg_glob=seg_glob, atlas_seg=atlas_seg,
        seg_weight=seg_weight, seg_labels=int_list(seg_labels, "--seg-labels"),
        seg_downsize=seg_downsize, synth=synth, shape=int_list(shape, "--shape"),
        synth_labels=synth_labels, synth_blob=synth_blob, synth_warp=synth_warp, epochs=epochs,
        steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr, resume=resume,
        device=device, normalize=normalize, seed=seed, progress=progress, log=click.echo)
    if run.history:
        last = run.history[-1]
        click.echo(f"epoch {last.get('epoch')}: loss {last.get('loss', float('nan')):.6g}")
    click.echo(f"model: {run.model_path}")
    click.echo(f"checkpoint: {run.checkpoint}")
