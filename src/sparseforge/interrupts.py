"""Interruption by SIGINT or SIGTERM as an exception that nothing but the command line catches.

Python turns Ctrl-C into ``KeyboardInterrupt``, which libraries catch for their own purposes (typer turns it into
a successful-looking return value, so ``sparseforge ... && next-step`` carried on after a kill). While a command
runs, both signals raise :class:`Interrupted` instead: a ``BaseException`` that ``except Exception`` clauses let
through, so temporary output is removed on the way up and the process exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import signal


class Interrupted(BaseException):
    """The run was stopped by a signal; ``resume`` says where a rerun of the same command continues from."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.resume: str | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def install_handlers() -> None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` (command-line use only; a library leaves signals alone)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
