"""What ``neonlocal use`` says and asks about a protected branch (neonlocal/protect.py).

Selecting one takes a yes: asked on a terminal, ``--yes`` anywhere else, so a script that
switches to production by mistake stops instead.
"""

from __future__ import annotations

import sys

import click

from neonlocal.cli.context import EXIT_USAGE, fail

__all__ = ["confirm_protected", "protection_note"]


def confirm_protected(name: str, protection: str, *, write: bool, yes: bool) -> None:
    """Return when ``use NAME`` may go ahead; end the command when it may not."""
    if protection == "none" or yes:
        return
    if protection == "confirm" or write:
        what = f"Branch {name} is protected, and its sessions will be able to write."
    else:
        what = f"Branch {name} is protected; its sessions will be read-only."
    if not sys.stdin.isatty():
        fail(
            f"branch {name} is protected: pass --yes to select it"
            + ("" if protection == "confirm" or write else " (read-only; --write allows writes)"),
            EXIT_USAGE,
        )
    if not click.confirm(f"{what} Select it?", err=True):
        fail("nothing was switched")


def protection_note(name: str, protection: str, *, write: bool) -> str:
    """The end of ``use``'s line for a protected branch ("" for another)."""
    if protection == "read_only" and not write:
        return f"; read-only (protected: `neonlocal use {name} --write` allows writes)"
    if protection != "none":
        return "; protected, writes allowed"
    return ""
