"""The ``voxreg`` command line: one entry point, one subcommand per job.

Every user error (missing or unreadable file, wrong shape or grid, unknown model, unwritable
output, output equal to an input) is reported as one line ``error: ...`` on stderr with a non-zero
exit status; ``voxreg --debug ...`` (or ``VOXREG_DEBUG=1``) shows the traceback instead.
Inputs are never overwritten and every output is written atomically (whole or not at all).
"""

from __future__ import annotations

import csv
import glob as globlib
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

import voxreg
from voxreg import io, metrics
from voxreg._atomic import atomic_path
from voxreg._runtime import apply_default_tuning
from voxreg.affine import affine_prealign, register_affine
from voxreg.checkpoint import CheckpointError, list_models, load_checkpoint, load_model
from voxreg.data import ScanToAtlasDataset, ScanToScanDataset, read_attributes
from voxreg.data.synthesis import LabelSynthesis, SynthPairDataset
from voxreg.evaluation import sharpness, templates_at
from voxreg.nn.networks import VxmDense
from voxreg.registration import finetune as run_finetune
from voxreg.registration import model_ndim
from voxreg.registration import register as run_register
from voxreg.training import train as run_train
from voxreg.training import train_template
from voxreg.training.engine import CHECKPOINT_NAME
from voxreg.transforms import compose, warp

NORMALIZE_HELP = (
    "intensity normalisation to [0, 1]: 'percentile' clips to the 0.5th-99.5th percentiles then "
    "min-max scales; 'minmax' scales min..max (uint8 data using 0..255, like IXI: x/255); "
    "'none' keeps the values"
)
_NORMALIZE = click.Choice(["percentile", "minmax", "none"])
_DEVICE = click.Choice(["auto", "cpu", "cuda"])


def _user_errors() -> tuple[type[BaseException], ...]:
    return (FileNotFoundError, ValueError, TypeError, OSError, CheckpointError, ImportError)


def _debug(args: list[str] | None) -> bool:
    argv = sys.argv[1:] if args is None else list(args)
    return "--debug" in argv or os.environ.get("VOXREG_DEBUG", "") not in ("", "0")


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {str(err.filename)!r}"
    return " ".join(text.split())


class _Group(click.Group):
    """A click group that turns user errors into one ``error:`` line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        code = 0
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            if isinstance(result, int) and not isinstance(result, bool):
                code = result
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except click.Abort:
            click.echo("error: aborted", err=True)
            code = 1
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            message = _one_line_text(exc.format_message())
            if isinstance(exc, click.NoSuchOption) and exc.option_name.lstrip("-")[:1].isdigit():
                # '--finetune -3': a negative number read as an option
                message = (f"{exc.option_name} is not an option; a number given to an option "
                           "must not be negative here (e.g. --finetune N takes N >= 0)")
            click.echo(f"error: {message}{hint}", err=True)
            code = exc.exit_code
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            code = 130
        except _user_errors() as exc:
            if _debug(args):
                raise
            click.echo(f"error: {_one_line(exc)}", err=True)
            code = 1
        sys.exit(code)


def _one_line_text(text: str) -> str:
    return " ".join(str(text).split())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(voxreg.__version__, prog_name="voxreg")
@click.option("--debug", is_flag=True, help="show tracebacks instead of one-line errors")
def cli(debug: bool) -> None:
    """voxreg: learning-based deformable image registration (VoxelMorph and beyond).

    Images: .nii.gz, .nii, .mgz, .npz (key 'vol'/'seg'), .npy. Displacements are in voxels of the
    fixed grid and pull back: moved(x) = moving(x + disp(x)).
    """


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available (use cpu or auto)")
    return name


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None or text.strip() == "":
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} must hold at least one integer")
    return values


def _load_model(name: str, device: str):
    return load_model(name, device=device)


def _model_normalize(model: Any, chosen: str | None) -> str:
    if chosen is not None:
        return chosen
    meta = getattr(model, "metadata", None) or {}
    value = meta.get("normalize") if isinstance(meta, dict) else None
    return value if value in ("percentile", "minmax", "none") else "percentile"


def _fit_rank(image, model_ndim: int, what: str):
    """A 2D model reads a 3D file whose last axis has size 1 as 2D."""
    if image.ndim == 3 and model_ndim == 2 and image.shape[-1] == 1:
        image.data = image.data[..., 0]
    if image.ndim != model_ndim:
        raise ValueError(
            f"{what} {str(image.path)!r} is {image.ndim}D (shape {image.shape}) but the model is "
            f"{model_ndim}D"
        )
    return image


def _grid_error(a, b, a_name: str, b_name: str) -> str:
    if a.shape != b.shape:
        what = f"shapes {a.shape} and {b.shape} differ"
    else:
        what = f"affines differ by up to {float(np.abs(a.affine - b.affine).max()):.3g} mm"
    return f"{a_name} {str(a.path)!r} and {b_name} {str(b.path)!r} are on different grids ({what})"


def _onto_grid(image, fixed, name: str, fixed_name: str, resample: bool, interp: str):
    """``image`` on ``fixed``'s grid: as it is when the grids match, resampled with ``--resample``,
    else a clear error."""
    if io.same_grid(image, fixed):
        return image
    if not resample:
        raise ValueError(
            _grid_error(image, fixed, name, fixed_name)
            + f"; pass --resample to resample the {name} onto the {fixed_name} grid"
        )
    return io.resample_to(image, fixed, interp)


def _prepare_pair(moving_path, fixed_path, resample: bool, normalize: str, model_ndim: int):
    fixed = io.load_image(fixed_path)
    moving = _onto_grid(io.load_image(moving_path), fixed, "moving", "fixed", resample, "linear")
    moving.data = io.normalize(moving.data, normalize)
    fixed.data = io.normalize(fixed.data, normalize)
    _fit_rank(moving, model_ndim, "moving image")
    _fit_rank(fixed, model_ndim, "fixed image")
    return moving, fixed


# --------------------------------------------------------------------------------------------
# register / warp
# --------------------------------------------------------------------------------------------


def _affine_step(moving_path, fixed_path, normalize: str, model_ndim: int, loss: str):
    """``register --affine``: ``(moved_affine, fixed, base, result)``, the first three normalised
    on the fixed grid (``base``: the moving image resampled through the headers only, which the
    composed field pulls back)."""
    fixed = io.load_image(fixed_path)
    moving = io.load_image(moving_path)
    _fit_rank(moving, model_ndim, "moving image")
    _fit_rank(fixed, model_ndim, "fixed image")
    result, moved_affine = affine_prealign(moving, fixed, loss=loss)
    base = moving if io.same_grid(moving, fixed) else io.resample_to(moving, fixed, "linear")
    for image in (moved_affine, fixed, base):
        image.data = io.normalize(image.data, normalize)
    return moved_affine, fixed, base, result


@cli.command()
@click.argument("moving", type=click.Path())
@click.argument("fixed", type=click.Path())
@click.option("--model", "-m", "model_name", required=True,
              help="checkpoint file or shipped model name (see 'voxreg models')")
@click.option("--moved", "-o", "moved_out", required=True, type=click.Path(),
              help="output: the moving image warped onto the fixed grid")
@click.option("--warp", "warp_out", type=click.Path(),
              help="output: the displacement field (NIfTI vector image on the fixed grid)")
@click.option("--inverse-warp", "inverse_out", type=click.Path(),
              help="output: the inverse displacement (moving -> fixed), written like --warp (same "
              "--warp-units/--warp-format) on the shared grid; it pulls the fixed image onto the "
              "moving one. Exact for a diffeomorphic model (exp of the negated velocity); for a "
              "plain model (int_steps=0) a fixed-point approximation, with a warning giving its "
              "residual")
@click.option("--moved-fixed", "moved_fixed_out", type=click.Path(),
              help="output: the fixed image warped onto the moving image by the inverse "
              "(what a bidirectional model's second output is)")
@click.option("--warp-units", type=click.Choice(["voxel", "mm"]), default="voxel", show_default=True,
              help="units of the saved field: voxels of the fixed grid, or RAS mm")
@click.option("--warp-format", type=click.Choice(["voxreg", "ants"]), default="voxreg",
              show_default=True,
              help="'ants': LPS mm displacement readable by antsApplyTransforms (ignores --warp-units)")
@click.option("--finetune", "finetune_steps", type=click.IntRange(min=0), default=0,
              is_flag=False, flag_value=voxreg.registration.DEFAULT_FINETUNE_STEPS, metavar="[N]",
              help="instance-specific optimisation: refine the network's field on this pair alone "
              "for at most N Adam steps of image loss + smoothness, stopping early once the loss "
              "stops improving (progress bar on stderr). '--finetune' alone means "
              f"N={voxreg.registration.DEFAULT_FINETUNE_STEPS}, chosen from "
              "benchmarks/bench_finetune.py (1 CPU thread): on 20 2D IXI validation pairs Dice "
              "0.603 (network) -> 0.626 / 0.628 / 0.628 / 0.628 after 25 / 50 / 100 / 200 steps "
              "(the early stop ends at about 80), on 3 3D pairs 0.602 -> 0.634 / 0.638 / 0.643 / "
              "0.648, at about 3 ms (2D) and 0.2 s (3D, 96x112x96) per step: 100 steps take most "
              "of the gain in 3D and all of it in 2D. Default 0: the network alone")
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
@click.option("--normalize", type=_NORMALIZE, default=None,
              help=NORMALIZE_HELP + ". Default: what the model was trained with if it says, else "
              "'percentile'")
@click.option("--device", type=_DEVICE, default="auto", show_default=True)
def register(moving, fixed, model_name, moved_out, warp_out, inverse_out, moved_fixed_out,
             warp_units, warp_format, finetune_steps, finetune_lr, finetune_lambda, image_loss,
             progress, resample, affine_first, affine_loss, transform_out, normalize, device):
    """Register MOVING to FIXED with a trained model.

    Writes the moved image (and with --warp the displacement) on the fixed grid with the fixed
    image's affine, and prints the seconds per pair. MOVING and FIXED must share a grid (shape and
    affine) unless --resample is given (the moving image is then resampled onto the fixed grid,
    and --inverse-warp / --moved-fixed refer to that resampled image). With --finetune the
    network's field is refined on this pair (voxreg.registration.finetune).
    """
    inputs = (moving, fixed) + ((model_name,) if Path(model_name).is_file() else ())
    for path, what in ((moving, "moving image"), (fixed, "fixed image")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} {path!r} does not exist")
    named = [("--moved", moved_out), ("--warp", warp_out), ("--inverse-warp", inverse_out),
             ("--moved-fixed", moved_fixed_out), ("--transform", transform_out)]
    named = [(option, value) for option, value in named if value is not None]
    if transform_out is not None and not affine_first:
        raise ValueError("--transform needs --affine (it is the affine step's transform)")
    if affine_first and (inverse_out is not None or moved_fixed_out is not None):
        raise ValueError("--inverse-warp and --moved-fixed are not available with --affine yet")
    if transform_out is not None and not str(transform_out).lower().endswith((".txt", ".tfm")):
        raise ValueError(f"--transform must be a .txt or .tfm file (ITK text), got {transform_out!r}")
    checked = {option: (io.check_output_file if option == "--transform" else
                        io.check_output_path)(value, inputs) for option, value in named}
    for k, (option, _) in enumerate(named):
        for other, _ in named[:k]:
            if checked[option].resolve() == checked[other].resolve():
                raise ValueError(f"{other} and {option} must be different files")
    if warp_format == "ants" or warp_units == "mm":
        for option, value in named:
            if option in ("--warp", "--inverse-warp") and io.format_of(value) not in (".nii.gz", ".nii"):
                raise ValueError(f"{option}: a warp in mm or for ANTs must be a .nii.gz or .nii file")
    dev = _device(device)
    model = _load_model(model_name, dev)
    ndim = model_ndim(model)
    norm = _model_normalize(model, normalize)
    affine_result = None
    if affine_first:
        mov, fix, base, affine_result = _affine_step(moving, fixed, norm, ndim, affine_loss)
    else:
        mov, fix = _prepare_pair(moving, fixed, resample, norm, ndim)
    want_inverse = inverse_out is not None
    want_moved_fixed = moved_fixed_out is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if finetune_steps > 0:
            result = run_finetune(model, mov.data, fix.data, steps=finetune_steps, lr=finetune_lr,
                                  image_loss=image_loss, lambda_=finetune_lambda, device=dev,
                                  progress=progress, inverse=want_inverse,
                                  moved_fixed=want_moved_fixed)
        else:
            result = run_register(model, mov.data, fix.data, device=dev, return_time=True,
                                  inverse=want_inverse, moved_fixed=want_moved_fixed)
    for warning in caught:
        click.echo(f"warning: {_one_line_text(warning.message)}", err=True)
    moved, disp, seconds = result
    if affine_result is not None:
        deformable = torch.as_tensor(disp, dtype=torch.float32).cpu()
        deformable = deformable.reshape(1, ndim, *deformable.shape[-ndim:])
        disp = compose(affine_result.disp(), deformable)
        base_t = torch.as_tensor(base.data, dtype=torch.float32)
        base_t = base_t.reshape(1, -1, *base_t.shape[-ndim:])
        moved = warp(base_t, disp).numpy().reshape(tuple(moved.shape))
        seconds += affine_result.seconds
        if transform_out is not None:
            affine_result.save_itk(transform_out)
    if warp_out is not None:
        io.save_warp(warp_out, disp, fix.affine, convention=warp_format, units=warp_units)
    if inverse_out is not None:
        io.save_warp(inverse_out, result.inverse_disp, fix.affine, convention=warp_format,
                     units=warp_units)
    if moved_fixed_out is not None:
        io.save_image(moved_fixed_out, result.moved_fixed, affine=fix.affine, header=fix.header,
                      channels=fix.channels)
    io.save_image(moved_out, moved, affine=fix.affine, header=fix.header, channels=mov.channels)
    click.echo(f"moved image: {moved_out}")
    if affine_result is not None:
        click.echo(f"affine: {affine_result.seconds:.3f} s ({affine_loss})"
                   + (f", transform {transform_out}" if transform_out else ""))
    units = "ANTs LPS mm" if warp_format == "ants" else warp_units
    if warp_out is not None:
        click.echo(f"warp: {warp_out} ({units})")
    if inverse_out is not None:
        kind = "exact: exp(-velocity)" if result.inverse_exact else "fixed-point approximation"
        click.echo(f"inverse warp: {inverse_out} ({units}; {kind}, mean residual "
                   f"{result.inverse_residual:.3g} voxels)")
    if moved_fixed_out is not None:
        click.echo(f"moved fixed image: {moved_fixed_out}")
    if finetune_steps > 0:
        stop = ", stopped early" if result.stopped_early else ""
        click.echo(f"finetune: {result.steps} steps{stop}, {result.image_loss} + "
                   f"{result.lambda_:g} * grad loss {result.initial_loss:.6g} -> "
                   f"{result.final_loss:.6g}")
    click.echo(f"seconds per pair: {seconds:.4f} ({dev})")


@cli.command("warp")
@click.argument("image", type=click.Path())
@click.option("--warp", "warp_path", required=True, type=click.Path(),
              help="a field written by 'voxreg register --warp' (any units or format)")
@click.option("--out", "-o", "out", required=True, type=click.Path(), help="output image")
@click.option("--interp", type=click.Choice(["linear", "nearest", "label"]), default="linear",
              show_default=True, help="for label maps 'label' (the label whose linearly "
              "interpolated indicator is largest, as ANTs' genericLabel) or 'nearest': both keep "
              "label values and dtype")
@click.option("--normalize", type=_NORMALIZE, default="none", show_default=True, help=NORMALIZE_HELP)
@click.option("--resample", is_flag=True,
              help="first resample IMAGE onto the warp's grid via the affines if the grids differ")
def warp_command(image, warp_path, out, interp, normalize, resample):
    """Apply a saved displacement to IMAGE (pull-back: out(x) = image(x + disp(x))).

    The output lies on the warp's (fixed) grid with its affine. IMAGE must be on that grid (as the
    moving image was when it was registered) unless --resample is given.
    """
    for path, what in ((image, "image"), (warp_path, "warp")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} {path!r} does not exist")
    io.check_output_path(out, (image, warp_path))
    disp, affine = io.load_warp(warp_path)
    grid = io.Image(np.zeros(disp.shape[1:], np.uint8), affine, None, Path(warp_path))
    img = io.load_image(image)
    if img.ndim == 3 and disp.shape[0] == 2 and img.shape[-1] == 1:
        img.data = img.data[..., 0]
    img = _onto_grid(img, grid, "image", "warp", resample, interp)
    data = img.data if interp in ("nearest", "label") else io.normalize(img.data, normalize)
    tensor = torch.from_numpy(np.ascontiguousarray(data))
    tensor = tensor[None] if img.channels else tensor[None, None]
    moved = warp(tensor, torch.from_numpy(disp)[None], interp=interp)[0]
    moved = moved if img.channels else moved[0]
    io.save_image(out, moved.numpy(), affine=affine, header=img.header, channels=img.channels)
    click.echo(f"warped image: {out}")


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def _read_pairs(pairs: Path) -> list[dict[str, str]]:
    if not pairs.exists():
        raise FileNotFoundError(f"pairs file {str(pairs)!r} does not exist")
    with open(pairs, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        need = ["moving", "fixed", "moving_labels", "fixed_labels"]
        missing = [c for c in need if c not in columns]
        if missing:
            raise ValueError(
                f"{str(pairs)!r} must have the columns {', '.join(need)}; missing: {', '.join(missing)}"
            )
        rows = []
        for number, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not any(row.get(c) for c in need):
                continue
            entry = {}
            for column in need:
                if not row.get(column):
                    raise ValueError(f"{str(pairs)!r} line {number}: empty {column!r}")
                path = Path(row[column]).expanduser()
                entry[column] = str(path if path.is_absolute() else pairs.parent / path)
                if not Path(entry[column]).exists():
                    raise FileNotFoundError(
                        f"{str(pairs)!r} line {number}: {column} {entry[column]!r} does not exist"
                    )
            rows.append(entry)
    if not rows:
        raise ValueError(f"{str(pairs)!r} lists no pairs")
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in columns})


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def _mean_sd(values: list[float]) -> str:
    finite = np.array([v for v in values if isinstance(v, float) and math.isfinite(v)])
    if finite.size == 0:
        return "nan"
    sd = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return f"{float(finite.mean()):.4g} ± {sd:.3g}"


@cli.command("eval")
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
@click.option("--normalize", type=_NORMALIZE, default=None,
              help=NORMALIZE_HELP + ". Default: the model's training setting, else 'percentile'")
@click.option("--device", type=_DEVICE, default="auto", show_default=True)
def eval_command(model_name, pairs, out, labels, no_hd95, resample, normalize, device):
    """Evaluate a model on labelled pairs.

    Per pair: Dice before and after registration (mean and per structure), HD95 in mm (voxel
    sizes from the fixed affine; mean over structures), % of folding voxels (det J <= 0), the SD
    of log det J, and the seconds per pair. Writes a per-pair CSV and a per-structure CSV and
    prints a summary (mean ± sd over pairs).
    """
    pairs_path = Path(pairs)
    rows = _read_pairs(pairs_path)
    wanted = _int_list(labels, "--labels")
    out_path = Path(out)
    if not out_path.name.lower().endswith(".csv"):
        raise ValueError(f"--out must be a .csv file, got {out!r}")
    struct_path = out_path.with_name(out_path.stem + "_structures.csv")
    all_inputs = tuple([pairs] + [r[c] for r in rows for c in r])
    for path in (out_path, struct_path):
        io.check_output_file(path, all_inputs)
    dev = _device(device)
    model = _load_model(model_name, dev)
    ndim = model_ndim(model)
    method = _model_normalize(model, normalize)

    pair_rows: list[dict[str, Any]] = []
    struct_rows: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        mov, fix = _prepare_pair(row["moving"], row["fixed"], resample, method, ndim)
        mov_seg = io.load_labels(row["moving_labels"])
        fix_seg = io.load_labels(row["fixed_labels"])
        _fit_rank(mov_seg, ndim, "moving labels")
        _fit_rank(fix_seg, ndim, "fixed labels")
        if not io.same_grid(fix_seg, fix):
            raise ValueError(_grid_error(fix_seg, fix, "fixed labels", "fixed image"))
        mov_seg = _onto_grid(mov_seg, fix, "moving labels", "fixed image", resample, "nearest")
        _, disp, seconds = run_register(model, mov.data, fix.data, device=dev, return_time=True)
        disp_np = np.asarray(disp, dtype=np.float32)
        seg_t = torch.from_numpy(np.ascontiguousarray(mov_seg.data))[None, None]
        warped = warp(seg_t, torch.from_numpy(disp_np)[None], interp="nearest")[0, 0].numpy()
        scored = wanted if wanted is not None else [
            int(v) for v in np.union1d(np.unique(mov_seg.data), np.unique(fix_seg.data)) if v != 0]
        before = metrics.dice(mov_seg.data, fix_seg.data, scored)
        after = metrics.dice(warped, fix_seg.data, scored)
        spacing = fix.spacing
        hd = {}
        for label in scored:
            hd[label] = float("nan") if no_hd95 else metrics.hausdorff95(
                warped, fix_seg.data, label, spacing)
            struct_rows.append({"pair": index, "moving": row["moving"], "fixed": row["fixed"],
                                "label": label, "dice_before": before[label],
                                "dice": after[label], "hd95_mm": hd[label]})
        jac = metrics.jacobian_stats(disp_np)

        def nanmean(values):
            values = [v for v in values if math.isfinite(v)]
            return float(np.mean(values)) if values else float("nan")

        pair_rows.append({
            "pair": index, "moving": row["moving"], "fixed": row["fixed"],
            "mean_dice_before": nanmean(before.values()), "mean_dice": nanmean(after.values()),
            "mean_hd95_mm": nanmean(hd.values()), "folding_percent": jac["folding_percent"],
            "sd_log_jac": jac["sd_log_jac"], "seconds_per_pair": seconds, "labels": len(scored),
        })
        click.echo(f"pair {index}: dice {pair_rows[-1]['mean_dice']:.4f} "
                   f"(before {pair_rows[-1]['mean_dice_before']:.4f}), "
                   f"folding {jac['folding_percent']:.3f}%, {seconds:.3f} s")

    pair_columns = ["pair", "moving", "fixed", "mean_dice_before", "mean_dice", "mean_hd95_mm",
                    "folding_percent", "sd_log_jac", "seconds_per_pair", "labels"]
    struct_columns = ["pair", "moving", "fixed", "label", "dice_before", "dice", "hd95_mm"]
    _write_csv(out_path, pair_rows, pair_columns)
    _write_csv(struct_path, struct_rows, struct_columns)
    click.echo(f"{len(pair_rows)} pairs ({dev})")
    for key in ("mean_dice_before", "mean_dice", "mean_hd95_mm", "folding_percent", "sd_log_jac",
                "seconds_per_pair"):
        click.echo(f"  {key}: {_mean_sd([r[key] for r in pair_rows])}")
    click.echo(f"per-pair results: {out_path}")
    click.echo(f"per-structure results: {struct_path}")


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def _gather_images(images: tuple[str, ...], list_file: str | None, pattern: str | None) -> list[str]:
    paths = list(images)
    if list_file is not None:
        listing = Path(list_file)
        if not listing.exists():
            raise FileNotFoundError(f"list file {list_file!r} does not exist")
        for line in listing.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line).expanduser()
                paths.append(str(path if path.is_absolute() else listing.parent / path))
    if pattern is not None:
        found = sorted(globlib.glob(os.path.expanduser(pattern), recursive=True))
        if not found:
            raise FileNotFoundError(f"--glob {pattern!r} matches no file")
        paths += found
    if not paths:
        raise ValueError("no training images: give IMAGES, --list FILE or --glob PATTERN")
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"training image {path!r} does not exist")
    return paths


@cli.command()
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
@click.option("--device", type=_DEVICE, default="auto", show_default=True)
@click.option("--normalize", type=_NORMALIZE, default="percentile", show_default=True,
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
    def gather_segs() -> list[str]:
        found = list(seg_paths)
        if seg_list is not None:
            listing = Path(seg_list)
            if not listing.exists():
                raise FileNotFoundError(f"--seg-list {seg_list!r} does not exist")
            for line in listing.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    path = Path(line).expanduser()
                    found.append(str(path if path.is_absolute() else listing.parent / path))
        if seg_glob is not None:
            matched = sorted(globlib.glob(os.path.expanduser(seg_glob), recursive=True))
            if not matched:
                raise FileNotFoundError(f"--seg-glob {seg_glob!r} matches no file")
            found += matched
        for path in found:
            if not Path(path).exists():
                raise FileNotFoundError(f"label map {path!r} does not exist")
        return found

    def same_grid(path: str, ref_shape, ref_affine, ref_name: str, what: str) -> None:
        other_shape, other_affine = io.read_grid(path)
        if other_shape != ref_shape or not np.allclose(other_affine, ref_affine, atol=1e-3, rtol=0):
            detail = (f"shape {other_shape} vs {ref_shape}" if other_shape != ref_shape
                      else "same shape, different affine")
            raise ValueError(
                f"{what} {path!r} is not on the grid of {ref_name} ({detail}); resample it first "
                "(e.g. 'voxreg warp' or 'voxreg register --resample')"
            )

    def load_labels(path: str) -> np.ndarray:
        data = np.asarray(io.load_image(path).data)
        if data.dtype.kind == "f":
            if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
                raise ValueError(f"label map {path!r} holds non-integer values")
        elif data.dtype.kind not in "iub":
            raise ValueError(f"label map {path!r} must hold integer labels, got {data.dtype}")
        return data.astype(np.int64)

    for name, value in (("--epochs", epochs), ("--batch-size", batch_size),
                        ("--seg-downsize", seg_downsize)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"--steps-per-epoch must be a positive integer, got {steps_per_epoch}")
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"--lr must be positive, got {lr}")
    if lambda_ < 0 or not math.isfinite(lambda_):
        raise ValueError(f"--lambda must be >= 0, got {lambda_}")
    if seg_weight is not None and not (seg_weight > 0 and math.isfinite(seg_weight)):
        raise ValueError(f"--seg-weight must be a positive number, got {seg_weight}")
    features = [_int_list(enc, "--enc"), _int_list(dec, "--dec")]
    dice_labels = _int_list(seg_labels, "--seg-labels")
    segs = gather_segs()
    if atlas_seg is not None and not Path(atlas_seg).exists():
        raise FileNotFoundError(f"--atlas-seg {atlas_seg!r} does not exist")

    if synth:
        if atlas is not None or atlas_seg is not None:
            raise ValueError("--synth trains on synthetic pairs: --atlas/--atlas-seg do not apply")
        for name, value in (("--synth-blob", synth_blob), ("--synth-warp", synth_warp)):
            if not (value >= 0 and math.isfinite(value)) or (name == "--synth-blob" and value == 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if synth_labels < 2:
            raise ValueError(f"--synth-labels must be at least 2, got {synth_labels}")
        paths = _gather_images(images, list_file, pattern) if (images or list_file or pattern) else []
        grid_from = segs[0] if segs else (paths[0] if paths else None)
        affine = np.eye(4)
        if grid_from is not None:
            grid_shape, affine = io.read_grid(grid_from)
            for path in segs[1:]:
                same_grid(path, grid_shape, affine, repr(grid_from), "label map")
        requested = _int_list(shape, "--shape")
        if requested is not None:
            if len(requested) not in (2, 3) or min(requested) < 2:
                raise ValueError(f"--shape must be 2 or 3 sizes >= 2, e.g. 96,112; got {shape!r}")
            if grid_from is not None and tuple(requested) != tuple(grid_shape):
                raise ValueError(f"--shape {tuple(requested)} differs from the grid of {grid_from!r} "
                                 f"{tuple(grid_shape)}")
            grid_shape = tuple(requested)
        elif grid_from is None:
            raise ValueError("--synth needs the shape of the pairs: give --shape (e.g. --shape "
                             "96,112), IMAGES, or label maps (--seg...)")
        grid_shape = tuple(int(s) for s in grid_shape)
        if len(grid_shape) not in (2, 3):
            raise ValueError(f"--synth trains 2D or 3D models, got shape {grid_shape}")
    else:
        paths = _gather_images(images, list_file, pattern)
        if atlas is None and len(paths) < 2:
            raise ValueError("scan-to-scan training needs at least 2 images (or give --atlas)")
        if atlas is not None and not Path(atlas).exists():
            raise FileNotFoundError(f"atlas {atlas!r} does not exist")
        if seg_weight is None and (segs or atlas_seg is not None):
            raise ValueError("label maps (--seg/--seg-list/--seg-glob/--atlas-seg) are used only "
                             "with --seg-weight W (semi-supervised) or --synth")
        if seg_weight is not None:
            if not segs:
                raise ValueError("--seg-weight needs one label map per image: give --seg, "
                                 "--seg-list or --seg-glob")
            if len(segs) != len(paths):
                raise ValueError(f"--seg-weight needs one label map per image: {len(segs)} label "
                                 f"maps for {len(paths)} images")
            if atlas is not None and atlas_seg is None:
                raise ValueError("--seg-weight with --atlas needs the atlas's label map: --atlas-seg")
        grid_shape, affine = io.read_grid(paths[0])
        for path in paths[1:] + ([atlas] if atlas else []):
            other_shape, other_affine = io.read_grid(path)
            if other_shape != grid_shape or not np.allclose(other_affine, affine, atol=1e-3, rtol=0):
                what = (f"shape {other_shape} vs {grid_shape}" if other_shape != grid_shape
                        else "same shape, different affine")
                raise ValueError(
                    f"all training images must share one grid: {path!r} differs from {paths[0]!r} "
                    f"({what}); resample them first (e.g. 'voxreg warp' or 'voxreg register --resample')"
                )
        for path in segs + ([atlas_seg] if atlas_seg else []):
            same_grid(path, grid_shape, affine, f"the images ({paths[0]!r})", "label map")
        if len(grid_shape) not in (2, 3):
            raise ValueError(f"training images must be 2D or 3D, got shape {grid_shape}")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out_dir!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {out_dir!r} is not writable")
    checkpoint = out / CHECKPOINT_NAME
    dev = _device(device)

    def loader(item) -> np.ndarray:
        if isinstance(item, tuple):  # ("seg", path): a label map
            return load_labels(item[1])
        image = io.load_image(item)
        if image.channels:
            raise ValueError(f"{item!r} has several channels; voxreg train reads one-channel images")
        return io.normalize(image.data, normalize)

    if resume and checkpoint.exists():
        model = load_checkpoint(checkpoint, device="cpu").model
        if tuple(model.config.get("inshape", ())) != tuple(grid_shape):
            raise ValueError(
                f"{str(checkpoint)!r} was trained on shape {tuple(model.config.get('inshape', ()))}, "
                f"the {'pairs' if synth else 'images'} are {tuple(grid_shape)}"
            )
        click.echo(f"resuming from {checkpoint}")
    else:
        if resume:
            click.echo(f"no {checkpoint} yet: starting a new run")
        model = VxmDense(grid_shape, nb_features=features, int_steps=int_steps,
                         int_downsize=int_downsize, bidir=bidir)
    bidir_model = bool(getattr(model, "bidir", False))
    image_terms = 2 if bidir_model else 1
    metadata: dict[str, Any] = {
        "normalize": normalize, "lambda": lambda_, "grid_affine": np.asarray(affine).tolist(),
        "created_by": "voxreg train",
    }
    if synth:
        steps_per_epoch = steps_per_epoch or 100
        dataset = SynthPairDataset(
            grid_shape, pairs_per_epoch=steps_per_epoch * batch_size, seed=seed,
            label_options=LabelSynthesis(num_labels=synth_labels, label_spacing=synth_blob,
                                         warp_std=synth_warp),
            label_maps=[load_labels(p) for p in segs] if segs else None,
        )
        seg_weight = 1.0 if seg_weight is None else seg_weight
        losses = [None] * image_terms + ["grad", "dice"]
        weights = [0.0] * image_terms + [lambda_, seg_weight]
        metadata.update({"synth": dataset.settings(), "seg_weight": seg_weight,
                         "training_images": 0,
                         "data": ("synthetic label maps and images only" if not segs else
                                  f"synthetic images of {len(segs)} real label maps")})
    else:
        if atlas is not None:
            dataset = ScanToAtlasDataset(
                paths, loader(atlas), pairs_per_epoch=None, seed=seed, loader=loader,
                segs=[("seg", p) for p in segs] if seg_weight else None,
                atlas_seg=load_labels(atlas_seg) if seg_weight else None)
        else:
            dataset = ScanToScanDataset(paths, seed=seed, loader=loader,
                                        segs=[("seg", p) for p in segs] if seg_weight else None)
        losses = [image_loss] * image_terms + ["grad"]
        weights = ([0.5, 0.5] if bidir_model else [1.0]) + [lambda_]
        if seg_weight is not None:
            losses.append("dice")
            weights.append(seg_weight)
        metadata.update({"image_loss": image_loss, "training_images": len(paths),
                         "atlas": str(atlas) if atlas else None})
        if seg_weight is not None:
            metadata.update({"seg_weight": seg_weight, "training_label_maps": len(segs)})
    if seg_weight is not None:
        metadata.update({"seg_labels": dice_labels, "seg_downsize": seg_downsize})
    history = run_train(
        model, dataset, losses=losses, loss_weights=weights, epochs=epochs,
        steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr, device=dev, seed=seed,
        out_dir=out, resume=bool(resume), progress=progress, metadata=metadata,
        seg_labels=dice_labels, seg_downsize=seg_downsize,
    )
    if history:
        click.echo(f"epoch {history[-1].get('epoch')}: loss {history[-1].get('loss', float('nan')):.6g}")
    click.echo(f"model: {out / 'model.safetensors'}")
    click.echo(f"checkpoint: {checkpoint}")


# --------------------------------------------------------------------------------------------
# affine
# --------------------------------------------------------------------------------------------


@cli.command("affine")
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
    inputs = [moving, fixed]
    for path, what in ((moving, "moving image"), (fixed, "fixed image"), (labels_in, "--labels")):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{what} {path!r} does not exist")
    if (labels_in is None) != (moved_labels_out is None):
        raise ValueError("--labels and --moved-labels go together: give both or neither")
    if labels_in is not None:
        inputs.append(labels_in)
    outputs = [io.check_output_path(moved_out, tuple(inputs))]
    if moved_labels_out is not None:
        outputs.append(io.check_output_path(moved_labels_out, tuple(inputs)))
    if transform_out is not None:
        if not str(transform_out).lower().endswith((".txt", ".tfm")):
            raise ValueError(f"--transform must be a .txt or .tfm file (ITK text), got {transform_out!r}")
        outputs.append(io.check_output_file(transform_out, tuple(inputs)))
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise ValueError("--moved, --moved-labels and --transform must be different files")
    options: dict[str, Any] = {"loss": loss, "init": init}
    if levels is not None:
        options["levels"] = _int_list(levels, "--levels")
    if iterations is not None:
        options["iterations"] = _int_list(iterations, "--iterations")

    mov, fix = io.load_image(moving), io.load_image(fixed)
    for image, what in ((mov, "moving image"), (fix, "fixed image")):
        if image.channels:
            raise ValueError(f"{what} {str(image.path)!r} has several channels; 'voxreg affine' "
                             "reads one-channel images")
    labels = None
    if labels_in is not None:
        labels = io.load_labels(labels_in)
        if not io.same_grid(labels, mov):
            raise ValueError(_grid_error(labels, mov, "--labels", "moving image")
                             + "; the labels must lie on the moving image's grid")
    result = register_affine(mov, fix, **options)
    moved = result.resample(mov, interp="linear")
    if transform_out is not None:
        result.save_itk(transform_out)
    io.save_image(moved_out, moved.data, affine=fix.affine, header=fix.header)
    if labels is not None:
        moved_labels = result.resample(labels, interp=label_interp)
        io.save_image(moved_labels_out, moved_labels.data, affine=fix.affine, header=fix.header)
    click.echo(f"moved image: {moved_out}")
    if labels is not None:
        click.echo(f"moved labels: {moved_labels_out}")
    if transform_out is not None:
        click.echo(f"transform: {transform_out} (ITK affine, fixed -> moving, LPS mm)")
    click.echo(f"loss ({loss}): {result.initial_loss:.4f} -> {result.loss:.4f}")
    click.echo(f"seconds: {result.seconds:.3f}")


# --------------------------------------------------------------------------------------------
# demo / models
# --------------------------------------------------------------------------------------------


QUICK_DEMO = {"epochs": 2, "steps_per_epoch": 10, "examples": 2}


@cli.command()
@click.option("--out", "-o", "out_dir", default="voxreg-demo", show_default=True, type=click.Path(),
              help="output folder")
@click.option("--quick", is_flag=True, help="a short training run (2 epochs of 10 steps) instead of "
              "the full tutorial (minutes on a CPU)")
def demo(out_dir, quick):
    """Run the MNIST tutorial: train a small 2D model and save its pictures to OUT."""
    import importlib
    import inspect

    try:
        tutorials = importlib.import_module("voxreg.apps.tutorial")
    except ModuleNotFoundError as err:
        if err.name not in ("voxreg.apps.tutorial",):
            raise
        raise ValueError(
            "the demo needs voxreg.apps.tutorial (the MNIST tutorial), which this installation "
            "does not have yet"
        ) from None
    tutorial = getattr(tutorials, "mnist_tutorial", None)
    if tutorial is None:
        raise ValueError("voxreg.apps.tutorial has no mnist_tutorial(); this installation is incomplete")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out_dir!r} is a file, not a folder")
    kwargs = {}
    try:
        params = inspect.signature(tutorial).parameters
    except (TypeError, ValueError):
        params = {}
    if quick:
        if "quick" in params:
            kwargs["quick"] = True
        else:  # a short run: a few small epochs
            kwargs.update({k: v for k, v in QUICK_DEMO.items() if k in params})
    result = tutorial(out, **kwargs)
    click.echo(f"demo written to {out}")
    if isinstance(result, dict):
        for key, value in result.items():
            click.echo(f"  {key}: {value}")


@cli.command()
def models():
    """List the models shipped with voxreg (usable as --model NAME)."""
    names = list_models()
    if not names:
        click.echo("no shipped models in this installation (give --model a checkpoint file)")
        return
    for name in names:
        click.echo(name)


# --------------------------------------------------------------------------------------------
# template
# --------------------------------------------------------------------------------------------


def _float_list(text: str | None, option: str) -> list[float]:
    if text is None or text.strip() == "":
        return []
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{option} must hold finite numbers, got {text!r}")
    return values


@cli.command("template")
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
@click.option("--device", type=_DEVICE, default="auto", show_default=True)
@click.option("--normalize", type=_NORMALIZE, default="percentile", show_default=True,
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
    paths = _gather_images(images, list_file, pattern)
    if len(paths) < 2:
        raise ValueError("a template needs at least 2 images")
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size),
                        ("--int-steps", int_steps), ("--int-downsize", int_downsize)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"--steps-per-epoch must be a positive integer, got {steps_per_epoch}")
    if snapshot_every < 0:
        raise ValueError(f"--snapshot-every must be >= 0, got {snapshot_every}")
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"--lr must be positive, got {lr}")
    for name, value in (("--lambda", lambda_), ("--mean-weight", mean_weight)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be >= 0, got {value}")
    if (attributes_csv is None) != (attribute is None):
        raise ValueError("a conditional template needs both --attributes CSV and --attribute NAME")
    columns = [c.strip() for c in attribute.split(",") if c.strip()] if attribute else []
    if attribute is not None and not columns:
        raise ValueError("--attribute must name at least one column")
    at = _float_list(at_values, "--at")
    if at and not columns:
        raise ValueError("--at needs a conditional template (--attributes and --attribute)")
    if at and len(columns) != 1:
        raise ValueError("--at works with one attribute; give a single --attribute column")
    features = [_int_list(enc, "--enc"), _int_list(dec, "--dec")]

    out_path = io.check_output_path(out, tuple(paths) + ((attributes_csv,) if attributes_csv
                                                          else ()))
    ext = io.format_of(out_path)
    stem = out_path.name[: -len(ext)]
    extra_outputs = [out_path.with_name(f"{stem}_{columns[0]}{v:g}{ext}") for v in at]
    for path in extra_outputs:
        io.check_output_path(path, tuple(paths))
    run = Path(run_dir) if run_dir is not None else out_path.with_name(f"{stem}-run")
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"--run {str(run)!r} is a file, not a folder")

    first = io.load_image(paths[0])
    shape = first.shape
    for path in paths[1:]:
        other_shape, other_affine = io.read_grid(path)
        if other_shape != shape or not np.allclose(other_affine, first.affine, atol=1e-3, rtol=0):
            what = (f"shape {other_shape} vs {shape}" if other_shape != shape
                    else "same shape, different affine")
            raise ValueError(
                f"all template images must share one grid: {path!r} differs from {paths[0]!r} "
                f"({what}); resample them first (e.g. 'voxreg register --resample')")
    flat = len(shape) == 3 and shape[-1] == 1  # a 2D slice stored as a 3D file
    if len(shape) not in (2, 3):
        raise ValueError(f"template images must be 2D or 3D, got shape {shape}")

    def loader(path: str) -> np.ndarray:
        image = first if path == paths[0] else io.load_image(path)
        if image.channels:
            raise ValueError(f"{path!r} has several channels; voxreg template reads one-channel "
                             "images")
        data = io.normalize(image.data, normalize)
        return data[..., 0] if flat else data

    stack = np.stack([loader(p) for p in paths])
    attrs = read_attributes(attributes_csv, columns, paths) if columns else None
    dev = _device(device)
    checkpoint = run / CHECKPOINT_NAME
    if resume:
        click.echo(f"resuming from {checkpoint}" if checkpoint.exists()
                   else f"no {checkpoint} yet: starting a new run")
    metadata = {
        "normalize": normalize, "image_loss": image_loss, "lambda": lambda_,
        "mean_weight": mean_weight, "training_images": len(paths),
        "attributes": columns or None, "grid_affine": np.asarray(first.affine).tolist(),
        "created_by": "voxreg template",
    }
    model, history = train_template(
        stack, attrs, attribute_names=columns or None, nb_features=features,
        int_steps=int_steps, int_downsize=int_downsize, out_dir=run, resume=bool(resume),
        init_seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
        lr=lr, image_loss=image_loss, lambda_=lambda_, mean_weight=mean_weight, device=dev,
        seed=seed, snapshot_every=snapshot_every or None, affine=first.affine,
        snapshot_format=ext, progress=progress, metadata=metadata,
    )

    def write(path: Path, image: np.ndarray) -> None:
        io.save_image(path, image[..., None] if flat else image, affine=first.affine,
                      header=first.header)

    if columns:
        write(out_path, templates_at(model, [model.attribute_center])[0])
        for path, value in zip(extra_outputs, at):
            write(path, templates_at(model, [value])[0])
    else:
        write(out_path, model.template_image())
    if history:
        last = history[-1]
        click.echo(f"epoch {last['epoch']}: loss {last.get('loss', float('nan')):.6g}, "
                   f"mean displacement {last.get('mean_disp_rms', float('nan')):.3g} voxels (RMS)")
    mean_image = stack.mean(0)
    if not columns:
        click.echo(f"sharpness (RMS gradient): template {sharpness(model.template_image()):.4g},"
                   f" voxel-wise mean {sharpness(mean_image):.4g}")
    click.echo(f"template: {out_path}")
    for path in extra_outputs:
        click.echo(f"template: {path}")
    click.echo(f"run: {run}")


def main() -> None:
    """The ``voxreg`` command: process tuning (``VOXREG_MALLOC_TUNING=0`` turns it off), then the
    command group."""
    apply_default_tuning()
    cli()


if __name__ == "__main__":
    main()
