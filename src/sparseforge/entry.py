"""The ``sparseforge`` console script.

Signal handling starts before anything heavy is imported, so a Ctrl-C while torch and transformers load ends with
one ``interrupted`` line and status 130, like one at any later moment, instead of a ``KeyboardInterrupt`` traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    from .interrupts import Interrupted, install_handlers

    install_handlers()
    try:
        from .cli import main as run_command_line
    except Interrupted as exc:
        print(f"interrupted ({exc}) while starting; nothing was done", file=sys.stderr)
        sys.exit(exc.exit_code)
    run_command_line()
