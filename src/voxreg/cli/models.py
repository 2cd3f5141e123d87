"""``voxreg models``: the shipped models (:func:`voxreg.apps.models.list_model_info`)."""

from __future__ import annotations

import click

from voxreg.apps.models import list_model_info

__all__ = ["models"]


@click.command()
@click.option("--names", is_flag=True, help="print the names only")
def models(names):
    """List the models shipped with voxreg (usable as --model NAME): what each is for and the
    domain it was trained in (grid, voxel size, space, skull-stripped or not, contrast,
    intensity scaling). 3D registration models with a reference take scans on any grid:
    'voxreg register' brings them into the model's domain and back."""
    infos = list_model_info()
    if not infos:
        click.echo("no shipped models in this installation (give --model a checkpoint file)")
        return
    for info in infos:
        if names:
            click.echo(info.name)
            continue
        kind = "registration" if info.registration else (
            "template" if info.domain is not None and info.domain.purpose == "template"
            else info.model_class)
        ndim = f"{info.domain.ndim}D " if info.domain is not None else ""
        click.echo(f"{info.name}: {ndim}{kind} model ({info.model_class})")
        if info.description:
            click.echo(f"    {info.description}")
        if info.domain is not None:
            click.echo(f"    domain: {info.domain.describe()}")
            if info.registration and info.domain.reference and info.domain.ndim == 3:
                click.echo("    takes scans on any grid, whole head or stripped (native pipeline)")
