"""The ``voxreg`` command group: one entry point, one subcommand per job.

Every user error (missing or unreadable file, wrong shape or grid, unknown model, unwritable
output, output equal to an input) is reported as one line ``error: ...`` on stderr with exit
status 1 (2 for a usage error, 130 when interrupted); ``voxreg --debug ...`` (or
``VOXREG_DEBUG=1``) shows the traceback instead. Inputs are never overwritten and every output
is written atomically (whole or not at all).
"""

from __future__ import annotations

import os
import sys

import click

from voxreg._runtime import apply_default_tuning
from voxreg._version import __version__
from voxreg.checkpoint import CheckpointError
from voxreg.cli.affine import affine_command
from voxreg.cli.demo import demo
from voxreg.cli.eval import eval_command
from voxreg.cli.models import models
from voxreg.cli.options import one_line
from voxreg.cli.register import register
from voxreg.cli.template import template_command
from voxreg.cli.train import train
from voxreg.cli.warp import warp_command

__all__ = ["cli", "main"]

#: What a user can cause: reported as one line, not a traceback.
USER_ERRORS = (FileNotFoundError, ValueError, TypeError, OSError, CheckpointError, ImportError)


def _debug(args: list[str] | None) -> bool:
    argv = sys.argv[1:] if args is None else list(args)
    return "--debug" in argv or os.environ.get("VOXREG_DEBUG", "") not in ("", "0")


def _error_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {str(err.filename)!r}"
    return one_line(text)


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
            message = one_line(exc.format_message())
            if isinstance(exc, click.NoSuchOption) and exc.option_name.lstrip("-")[:1].isdigit():
                # '--finetune -3': a negative number read as an option
                message = (f"{exc.option_name} is not an option; a number given to an option "
                           "must not be negative here (e.g. --finetune N takes N >= 0)")
            click.echo(f"error: {message}{hint}", err=True)
            code = exc.exit_code
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            code = 130
        except USER_ERRORS as exc:
            if _debug(args):
                raise
            click.echo(f"error: {_error_line(exc)}", err=True)
            code = 1
        sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="voxreg")
@click.option("--debug", is_flag=True, help="show tracebacks instead of one-line errors")
def cli(debug: bool) -> None:
    """voxreg: learning-based deformable image registration (VoxelMorph and beyond).

    Images: .nii.gz, .nii, .mgz, .npz (key 'vol'/'seg'), .npy. Displacements are in voxels of the
    fixed grid and pull back: moved(x) = moving(x + disp(x)).
    """


for _command in (register, warp_command, eval_command, train, affine_command, demo, models,
                 template_command):
    cli.add_command(_command)


def main() -> None:
    """The ``voxreg`` command: process tuning (``VOXREG_MALLOC_TUNING=0`` turns it off), then the
    command group."""
    apply_default_tuning()
    cli()
