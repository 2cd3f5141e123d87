"""Helpers shared by the command-line tests: invoke ``voxreg`` in-process and check the outcome."""

from __future__ import annotations

from click.testing import CliRunner

from voxreg.cli import cli


def run(*args):
    """Invoke ``voxreg ARGS...`` in-process; returns click's ``Result``."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_ok(result):
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)


def assert_user_error(result, *fragments):
    """A user error: non-zero exit, one ``error: ...`` line naming ``fragments``, no traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
