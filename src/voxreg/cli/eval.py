"""``voxreg eval``: evaluate a model on labelled pairs (:func:`voxreg.apps.evaluate.evaluate_pairs`)."""

from __future__ import annotations

import click

from voxreg.apps.evaluate import evaluate_pairs
from voxreg.cli.options import DEVICE, NORMALIZE, NORMALIZE_HELP, int_list

__all__ = ["eval_command"]


def _pair_line(row: dict) -> None:
    click.echo(f"pair {row['pair']}: dice {row['mean_dice']:.4f} "
               f"(before {row['mean_dice_before']:.4f}), "
               f"folding {row['folding_percent']:.3f}%, {row['seconds_per_pair']:.3f} s")


@click.command("eval")
@click.option("--model", "-m", "model_name", required=True, help="checkpoint file or shipped model name")
@click.option("--pairs", required=True, type=click.Path(),
              help="CSV with columns moving,fixed,moving_labels,fixed_labels (paths may be "
              "relative to the CSV's folder)")
@click.option("--out", "-o", type=click.Path(), default="eval.csv", show_default=True,
              help="per-pair CSV; the per-structure CSV goes next to it as <stem>_structures.csv")
@click.option("--labels", default=None,
              help="comma-separated labels to score (default: every non-zero label of either map)")
@click.option("--no-hd95", is_flag=True, help="skip the Hausdorff distances (faster)")
@click.option("--resample", is_flag=True,
              help="resample moving images and labels onto the fixed grid when the grids differ")
@click.option("--normalize", type=NORMALIZE, default=None,
              help=NORMALIZE_HELP + ". Default: the model's training setting, else 'percentile'")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
def eval_command(model_name, pairs, out, labels, no_hd95, resample, normalize, device):
    """Evaluate a model on labelled pairs.

    Per pair: Dice before and after registration (mean and per structure), HD95 in mm (voxel
    sizes from the fixed affine; mean over structures), % of folding voxels (det J <= 0), the SD
    of log det J, and the seconds per pair. Writes a per-pair CSV and a per-structure CSV and
    prints a summary (mean ± sd over pairs).
    """
    result = evaluate_pairs(model_name, pairs, out=out, labels=int_list(labels, "--labels"),
                            no_hd95=no_hd95, resample=resample, normalize=normalize,
                            device=device, on_pair=_pair_line)
    click.echo(f"{len(result.pairs)} pairs ({result.device})")
    for key, value in result.summary.items():
        click.echo(f"  {key}: {value}")
    click.echo(f"per-pair results: {result.out}")
    click.echo(f"per-structure results: {result.structures_out}")
