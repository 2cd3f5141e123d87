"""What the commands share: option types (device, normalisation), the parsers of
comma-separated lists, and the one-line form of a message.

The parsers raise :class:`ValueError` naming the option, which the group prints as one
``error:`` line (exit status 1), like any other user error.
"""

from __future__ import annotations

import math

import click

from voxreg.apps.files import NORMALIZE_METHODS

__all__ = ["DEVICE", "NORMALIZE", "NORMALIZE_HELP", "float_list", "int_list", "one_line"]

NORMALIZE_HELP = (
    "intensity normalisation to [0, 1]: 'percentile' clips to the 0.5th-99.5th percentiles then "
    "min-max scales; 'minmax' scales min..max (uint8 data using 0..255, like IXI: x/255); "
    "'none' keeps the values"
)
NORMALIZE = click.Choice(list(NORMALIZE_METHODS))
DEVICE = click.Choice(["auto", "cpu", "cuda"])


def int_list(text: str | None, option: str) -> list[int] | None:
    """``"16,32, 32"`` -> ``[16, 32, 32]``; ``None`` for no text.

    >>> int_list("4,2,1", "--levels")
    [4, 2, 1]
    """
    if text is None or text.strip() == "":
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} must hold at least one integer")
    return values


def float_list(text: str | None, option: str) -> list[float]:
    """``"30, 60.5"`` -> ``[30.0, 60.5]`` (finite numbers); ``[]`` for no text."""
    if text is None or text.strip() == "":
        return []
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{option} must hold finite numbers, got {text!r}")
    return values


def one_line(text: object) -> str:
    """``text`` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())
