"""The Unix socket libpq finds without a host: ``.s.PGSQL.<port>`` in its default directory.

The socket is its owner's alone (mode 0600, like our database credentials). A socket file
left behind by a daemon that died is replaced; one that still answers is left alone, so a
running PostgreSQL or another daemon keeps its socket.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

import structlog

from neonlocal.paths import socket_answers

log = structlog.get_logger("neonlocal.server")

# Where libpq looks for `.s.PGSQL.<port>` when no host is given: Debian and Ubuntu build it
# with /var/run/postgresql, upstream PostgreSQL (macOS, most others) with /tmp.
_LIBPQ_SOCKET_DIRS = ("/var/run/postgresql", "/tmp")  # noqa: S108 - libpq's own default

# How long a socket file may take to answer before it counts as left behind.
STALE_CHECK_TIMEOUT_S: Final = 0.5


def unix_socket_dir(setting: str) -> Path | None:
    """The directory ``[listen] unix_socket_dir`` names: none (""), libpq's ("auto"), a path."""
    if not setting:
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    for candidate in _LIBPQ_SOCKET_DIRS:
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return Path(candidate)
    return None


def where_libpq_looks() -> Path:
    """The directory this machine's libpq most likely looks in when no host is given."""
    for candidate in _LIBPQ_SOCKET_DIRS:
        if os.path.isdir(candidate):
            return Path(candidate)
    return Path(_LIBPQ_SOCKET_DIRS[-1])


def socket_hint(path: Path) -> str | None:
    """How to reach a socket that is not where libpq looks by itself; None when it is."""
    directory, default = path.parent, where_libpq_looks()
    if directory == default:
        return None
    return (
        f"libpq looks in {default}, which this user cannot write to; connect with "
        f"host={directory} (psql -h {directory}) or export PGHOST={directory}"
    )


async def listen_unix(
    protocol: Callable[[], asyncio.Protocol], setting: str, port: int
) -> tuple[asyncio.Server, Path] | None:
    """Listen on ``.s.PGSQL.<port>``; None (and a warning) when there is nowhere to."""
    directory = unix_socket_dir(setting)
    if directory is None:
        return None
    path = directory / f".s.PGSQL.{port}"
    if path.exists() or path.is_symlink():
        if socket_answers(path, timeout=STALE_CHECK_TIMEOUT_S):
            log.warning("unix_socket_in_use", path=str(path))
            return None
        path.unlink()
    old_umask = os.umask(0o177)
    try:
        srv = await asyncio.get_running_loop().create_unix_server(protocol, path=str(path))
    except OSError as exc:
        log.warning("unix_socket_skipped", path=str(path), reason=exc.strerror or str(exc))
        return None
    finally:
        os.umask(old_umask)
    return srv, path
