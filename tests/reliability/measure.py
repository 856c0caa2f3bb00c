"""Measurements of a daemon process: open file descriptors, resident memory, waiting for a state;
and the environment for a daemon run as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from fixtures.daemon import daemon_env

# `neonlocal up` runs on uvloop when installed; set this to "asyncio" to run the process
# tests on the standard loop (both are supported; a release run tries both).
LOOP_ENV = "NEONLOCAL_RELIABILITY_LOOP"


def proc_fds(pid: int | str = "self") -> int:
    """Open file descriptors of a process (the daemon's, when it runs in its own)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def eventually(
    check: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Wait until ``check()`` is true; the daemon has no change notifications to wait on."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not check():  # noqa: ASYNC110 - nothing to await but time
                await asyncio.sleep(0.02)
            return
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


def process_env(runtime_dir: Path) -> dict[str, str]:
    """The environment for a `neonlocal up` subprocess, on the loop LOOP_ENV asks for."""
    env = daemon_env(runtime_dir)
    loop = os.environ.get(LOOP_ENV)
    if loop:
        env["NEONLOCAL_LOOP"] = loop
    return env
