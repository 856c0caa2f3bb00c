"""The daemon's control socket: JSON lines over a Unix socket owned by the user.

The CLI asks ``status``, ``can_use`` and ``reload`` here. The client half loads nothing but
``json`` and ``socket`` (not asyncio either), so that ``neonlocal use`` stays quick to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neonlocal.errors import StartupError, UserError
from neonlocal.paths import socket_answers

if TYPE_CHECKING:
    import asyncio

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

MAX_REQUEST = 64 * 1024


class DaemonNotRunning(UserError):
    """Nothing answers on the control socket."""


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        import asyncio

        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if socket_answers(self.path):
                raise StartupError(
                    f"neonlocal: another daemon already runs with this config (control socket "
                    f"{self.path})"
                )
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("request must be a JSON object")
                reply = await self._handler(request)
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "error": f"bad control request: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, payload: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon and wait for its answer (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(str(path)) from exc
        sock.sendall(json.dumps(payload).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf or b"{}")
    if not isinstance(reply, dict):
        raise ValueError("malformed reply from daemon")
    return reply
