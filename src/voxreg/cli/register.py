"""``voxreg register``: register MOVING to FIXED with a trained model
(:func:`voxreg.apps.register.register_files`)."""

from __future__ import annotations

import warnings

import click

from voxreg.apps.register import register_files
from voxreg.cli.options import DEVICE, NORMALIZE, NORMALIZE_HELP, one_line
from voxreg.io import CONVENTIONS
from voxreg.registration import DEFAULT_FINETUNE_STEPS

__all__ = ["register"]

#: how the printed lines name the convention of a field written
_DESCRIPTIONS = {"lps-mm": "lps-mm: LPS mm for ANTs/ITK", "ras-mm": "ras-mm: RAS mm for FreeSurfer",
                 "voxel": "voxel: voxels, voxreg only"}


@click.command()
@click.argument("moving", type=click.Path())
@click.argument("fixed", type=click.Path())
@click.option("--model", "-m", "model_name", required=True,
              help="checkpoint file or shipped model name (see 'voxreg models')")
@click.option("--moved", "-o", "moved_out", required=True, type=click.Path(),
              help="output: the moving image warped onto the fixed grid")
@click.option("--warp", "warp_out", type=click.Path(),
              help="output: the displacement field on the fixed grid, in --warp-convention")
@click.option("--inverse-warp", "inverse_out", type=click.Path(),
              help="output: the inverse displacement (moving -> fixed), written like --warp (in "
              "--warp-convention) on the moving grid; it pulls the fixed image onto the "
              "moving one. Exact for a diffeomorphic model (exp of the negated velocity); for a "
              "plain model (int_steps=0) a fixed-point approximation, with a warning giving its "
              "residual")
@click.option("--moved-fixed", "moved_fixed_out", type=click.Path(),
              help="output: the fixed image warped onto the moving image by the inverse "
              "(what a bidirectional model's second output is)")
@click.option("--warp-convention", type=click.Choice(list(CONVENTIONS)), default=None,
              help="convention of --warp and --inverse-warp: 'lps-mm' (ANTs/ITK 5D NIfTI: "
              "antsApplyTransforms -r FIXED -t WARP), 'ras-mm' (FreeSurfer/mri_synthmorph 4D "
              "NIfTI or MGZ), 'voxel' (voxels, voxreg's .npz only). Default by extension: "
              "lps-mm for .nii.gz/.nii, ras-mm for .mgz, voxel for .npz")
@click.option("--warp-units", type=click.Choice(["voxel", "mm"]), default=None, hidden=True,
              help="deprecated: --warp-units mm is --warp-convention ras-mm, voxel is voxel (.npz)")
@click.option("--warp-format", type=click.Choice(["voxreg", "ants"]), default=None, hidden=True,
              help="deprecated: --warp-format ants is --warp-convention lps-mm")
@click.option("--finetune", "finetune_steps", type=click.IntRange(min=0), default=0,
              is_flag=False, flag_value=DEFAULT_FINETUNE_STEPS, metavar="[N]",
              help="instance-specific optimisation: refine the network's field on this pair alone "
              "for at most N Adam steps of image loss + smoothness, stopping early once the loss "
              "stops improving (progress bar on stderr). '--finetune' alone means "
              f"N={DEFAULT_FINETUNE_STEPS}, which takes most of the gain (benchmarks/README.md "
              "has the measurements). Default 0: the network alone")
@click.option("--finetune-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Adam step of the finetuning, in voxels per step (default 0.1)")
@click.option("--finetune-lambda", type=click.FloatRange(min=0), default=None,
              help="smoothness weight of the finetuning (default: the model's training weight, "
              "else 0.01)")
@click.option("--image-loss", type=click.Choice(["mse", "ncc", "mi"]), default=None,
              help="image loss of the finetuning (default: the model's training loss if its "
              "metadata says, else mse)")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="progress bar while finetuning")
@click.option("--resample", is_flag=True,
              help="resample the moving image onto the fixed grid (via the affines) if the grids differ")
@click.option("--affine", "affine_first", is_flag=True,
              help="affine registration first (voxreg.affine, the images' headers give the start, "
              "so the grids may differ), then the model on the affinely moved image; --moved and "
              "--warp hold the composition of both (one field on the fixed grid, pulling back the "
              "moving image resampled onto the fixed grid through the headers: apply it with "
              "'voxreg warp IMAGE --resample')")
@click.option("--affine-loss", type=click.Choice(["mi", "ncc", "mse"]), default="mi",
              show_default=True, help="similarity of the affine step")
@click.option("--transform", "transform_out", type=click.Path(),
              help="with --affine: also write the affine as an ITK/ANTs text transform (.txt/.tfm)")
@click.option("--normalize", type=NORMALIZE, default=None,
              help=NORMALIZE_HELP + ". Default: what the model was trained with if it says, else "
              "'percentile'")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--pipeline", type=click.Choice(["auto", "native", "direct"]), default="auto",
              show_default=True,
              help="'auto': scans that are not on the model's domain grid are brought into it "
              "(affine to the model's reference, brain mask, one resampling) and the result is "
              "mapped back onto the fixed scan's grid; 'direct': the network runs on the fixed "
              "grid as given")
@click.option("--moving-labels", type=click.Path(),
              help="a label map on the moving scan's grid to carry onto the fixed grid")
@click.option("--moved-labels", "moved_labels_out", type=click.Path(),
              help="output: the moved label map (with --moving-labels)")
@click.option("--interp", "label_interp", type=click.Choice(["label", "nearest"]), default="label",
              show_default=True, help="interpolation of --moving-labels")
def register(moving, fixed, model_name, moved_out, warp_out, inverse_out, moved_fixed_out,
             warp_convention, warp_units, warp_format, finetune_steps, finetune_lr, finetune_lambda,
             image_loss, progress, resample, affine_first, affine_loss, transform_out, normalize, device,
             pipeline, moving_labels, moved_labels_out, label_interp):
    """Register MOVING to FIXED with a trained model.

    Writes the moved image (and with --warp the displacement) on the fixed grid with the fixed
    image's affine, and prints the seconds per pair. MOVING and FIXED must share a grid (shape and
    affine) unless --resample is given (the moving image is then resampled onto the fixed grid,
    and --inverse-warp / --moved-fixed refer to that resampled image). With --finetune the
    network's field is refined on this pair (voxreg.registration.finetune).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = register_files(
            moving, fixed, model_name, moved=moved_out, warp=warp_out, inverse_warp=inverse_out,
            moved_fixed=moved_fixed_out, transform=transform_out, warp_convention=warp_convention,
            warp_units=warp_units, warp_format=warp_format, finetune=finetune_steps,
            finetune_lr=finetune_lr, finetune_lambda=finetune_lambda, image_loss=image_loss,
            progress=progress, resample=resample, affine=affine_first, affine_loss=affine_loss,
            normalize=normalize, device=device, pipeline=pipeline, moving_labels=moving_labels,
            moved_labels=moved_labels_out, label_interp=label_interp)
    for warning in caught:
        click.echo(f"warning: {one_line(warning.message)}", err=True)
    click.echo(f"moved image: {moved_out}")
    if result.native is not None:
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.native.seconds.items())
        click.echo(f"native pipeline: scans brought into the model's domain ({stages})")
        if moved_labels_out is not None:
            click.echo(f"moved labels: {moved_labels_out} ({label_interp})")
    if result.affine is not None:
        click.echo(f"affine: {result.affine.seconds:.3f} s ({affine_loss})"
                   + (f", transform {transform_out}" if transform_out else ""))
    conventions = result.warp_conventions
    if warp_out is not None:
        click.echo(f"warp: {warp_out} ({_DESCRIPTIONS[conventions['--warp']]}, on the fixed grid)")
    if inverse_out is not None:
        kind = "exact: exp(-velocity)" if result.inverse_exact else "fixed-point approximation"
        residual = "" if result.inverse_residual is None else \
            f", mean residual {result.inverse_residual:.3g} voxels"
        click.echo(f"inverse warp: {inverse_out} ({_DESCRIPTIONS[conventions['--inverse-warp']]}, "
                   f"on the moving grid; {kind}{residual})")
    if moved_fixed_out is not None:
        click.echo(f"moved fixed image: {moved_fixed_out}")
    if finetune_steps > 0:
        tuned = result.registration
        stop = ", stopped early" if tuned.stopped_early else ""
        click.echo(f"finetune: {tuned.steps} steps{stop}, {tuned.image_loss} + "
                   f"{tuned.lambda_:g} * grad loss {tuned.initial_loss:.6g} -> "
                   f"{tuned.final_loss:.6g}")
    click.echo(f"seconds per pair: {result.seconds:.4f} ({result.device})")
