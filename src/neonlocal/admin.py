"""The optional admin listener: ``/healthz``, ``/readyz`` and ``/metrics`` over plain HTTP.

Off by default and loopback only (``[admin] listen``, checked in config). A tiny HTTP/1.1
handler on the daemon's own event loop is enough for probes and a Prometheus scraper: one
GET per connection, answered and closed. No endpoint ever talks to a branch, so neither a
health check nor a scrape can wake a suspended compute or keep one awake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final
from urllib.parse import urlsplit

import structlog

from neonlocal.errors import StartupError
from neonlocal.metrics import CONTENT_TYPE, Metrics

log = structlog.get_logger("neonlocal.admin")

# A probe sends a few hundred bytes at once; anything slower or larger is not one of ours.
_REQUEST_TIMEOUT_S: Final = 5.0
_MAX_HEAD_BYTES: Final = 8192
_TEXT: Final = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = _TEXT

    def encode(self, *, head_only: bool = False) -> bytes:
        head = (
            f"HTTP/1.1 {self.status.value} {self.status.phrase}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        return head if head_only else head + self.body


def _text(status: HTTPStatus, text: str) -> Response:
    return Response(status, (text + "\n").encode())


class AdminServer:
    """Serves the three endpoints for one daemon.

    ``not_ready`` returns None when the daemon is ready for clients (listening, a branch
    selected), else the reason, which ``/readyz`` shows with a 503.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Metrics,
        not_ready: Callable[[], str | None],
    ) -> None:
        self.host = host
        self.requested_port = port
        self.metrics = metrics
        self.not_ready = not_ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._handle, self.host, self.requested_port, limit=_MAX_HEAD_BYTES
            )
        except OSError as exc:
            raise StartupError(
                f"neonlocal: cannot start the admin listener on {self.address}: "
                f"{exc.strerror or exc}; change [admin] listen in the config"
            ) from None
        log.info("admin_listening", address=self.address)

    @property
    def port(self) -> int:
        """The bound port (the OS's choice when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def respond(self, method: str, path: str) -> Response:
        """The answer to ``method path``, without any I/O."""
        if path not in ("/healthz", "/readyz", "/metrics"):
            return _text(HTTPStatus.NOT_FOUND, "not found: try /healthz, /readyz or /metrics")
        if method not in ("GET", "HEAD"):
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD")
        if path == "/healthz":
            # Answering at all is the proof: the event loop that serves sessions runs.
            return _text(HTTPStatus.OK, "ok")
        if path == "/readyz":
            problem = self.not_ready()
            if problem is None:
                return _text(HTTPStatus.OK, "ready")
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {problem}")
        return Response(HTTPStatus.OK, self.metrics.exposition(), CONTENT_TYPE)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            method, path = _request_line(head)
            if method is None:
                response = _text(HTTPStatus.BAD_REQUEST, "bad request")
            else:
                response = self.respond(method, path)
            writer.write(response.encode(head_only=method == "HEAD"))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _request_line(head: bytes) -> tuple[str | None, str]:
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None, ""
    return parts[0], urlsplit(parts[1]).path
