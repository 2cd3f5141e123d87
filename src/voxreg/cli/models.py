"""``voxreg models``: the shipped models (:func:`voxreg.apps.models.list_model_info`)."""

from __future__ import annotations

import click

from voxreg.apps.models import list_model_info

__all__ = ["models"]


@click.command()
def models():
    """List the models shipped with voxreg (usable as --model NAME)."""
    infos = list_model_info()
    if not infos:
        click.echo("no shipped models in this installation (give --model a checkpoint file)")
        return
    for info in infos:
        click.echo(info.name)
