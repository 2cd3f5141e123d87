"""Find the project's shared data on disk (voxreg downloads nothing).

Data sets live in a ``shared/data`` folder beside the checkout (``../shared/data`` from the
repository root). :func:`shared_data` looks for ``<relative>`` under, in order, the folder named by
``$VOXREG_DATA``, then ``shared/data`` beside the current directory or any of its parents, then
beside the voxreg package or any of its parents.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV", "shared_data", "shared_data_candidates"]

ENV = "VOXREG_DATA"


def shared_data_candidates(relative: str | os.PathLike) -> list[Path]:
    """Every place :func:`shared_data` looks for ``relative``, in order, without duplicates."""
    relative = Path(relative)
    places: list[Path] = []
    env = os.environ.get(ENV)
    if env:
        places.append(Path(env).expanduser() / relative)
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        start = start.resolve()
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data" / relative
            if candidate not in places:
                places.append(candidate)
    return places


def shared_data(relative: str | os.PathLike) -> Path | None:
    """The first existing ``<data folder>/<relative>`` (a file or a folder), or None."""
    for candidate in shared_data_candidates(relative):
        if candidate.exists():
            return candidate
    return None
