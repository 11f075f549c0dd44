"""``python -m diffeqbridge``: see :mod:`diffeqbridge.cli`."""

from __future__ import annotations

import sys


def main() -> int:
    from diffeqbridge.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
