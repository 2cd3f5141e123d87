"""``voxreg demo``: the MNIST tutorial (:func:`voxreg.apps.demo.run_demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from voxreg.apps.demo import run_demo

__all__ = ["demo"]


@click.command()
@click.option("--out", "-o", "out_dir", default="voxreg-demo", show_default=True, type=click.Path(),
              help="output folder")
@click.option("--quick", is_flag=True, help="a short training run (2 epochs of 10 steps) instead of "
              "the full tutorial (minutes on a CPU)")
def demo(out_dir, quick):
    """Run the MNIST tutorial: train a small 2D model and save its pictures to OUT."""
    result = run_demo(out_dir, quick=quick)
    click.echo(f"demo written to {Path(out_dir)}")
    if isinstance(result, dict):
        for key, value in result.items():
            click.echo(f"  {key}: {value}")
