"""The ``voxreg`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import click

import voxreg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(voxreg.__version__, prog_name="voxreg")
def cli() -> None:
    """voxreg: learning-based deformable image registration (VoxelMorph and beyond)."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
