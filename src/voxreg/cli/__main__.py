"""``python -m voxreg.cli``: the ``voxreg`` command."""

from voxreg.cli import main

if __name__ == "__main__":
    main()
