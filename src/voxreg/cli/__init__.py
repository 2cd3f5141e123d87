"""The ``voxreg`` command line (``[project.scripts] voxreg = "voxreg.cli:main"``).

:mod:`voxreg.cli.main` holds the group and the error contract, :mod:`voxreg.cli.options` what
the commands share, and one module per command parses its options, calls one function of
:mod:`voxreg.apps` and prints. Nothing in voxreg imports this package.
"""

from voxreg.cli.main import cli, main

__all__ = ["cli", "main"]
