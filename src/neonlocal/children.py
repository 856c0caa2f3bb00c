"""Starting this very neonlocal as a short-lived child process.

The daemon hands work that needs heavy libraries (making certificates with
``cryptography``, checking the config with pydantic) to a child, so that those libraries
never enter the daemon (README, "The daemon's memory").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["child_argv", "child_env"]


def child_argv(module: str, *args: str) -> list[str] | None:
    """``python -m module args...`` with this interpreter; None when there is none to start."""
    if not sys.executable:  # embedded without an interpreter: the caller works in-process
        return None
    return [sys.executable, "-m", module, *args]


def child_env() -> dict[str, str]:
    """The environment for a child that must import this very neonlocal package."""
    env = dict(os.environ)
    package_root = Path(__file__).resolve().parent.parent
    # The child shares everything on sys.path except the first entry (this process's cwd or
    # script directory); only a package found there, or by an import hook, needs help. The
    # site directories are not added: ahead of the standard library they could shadow it.
    shared = {Path(entry).resolve() for entry in sys.path[1:] if entry}
    if package_root not in shared:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(package_root), env.get("PYTHONPATH", "")) if p
        )
    return env
