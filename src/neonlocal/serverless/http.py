"""One HTTP connection on the daemon's port: ``POST /sql``, or a WebSocket for a session.

h11 parses the requests (sans-IO); this protocol owns the transport and the one task that
answers the request in hand. Requests on a kept-alive connection are answered in order, one
at a time. A request with ``Upgrade: websocket`` (on ``/v2`` or any path, as the edge
accepts) turns the connection into a WebSocket session (serverless/websocket.py) for good.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, cast

import h11
import structlog

from neonlocal.proxy.endpoint import Endpoint
from neonlocal.serverless import answer
from neonlocal.serverless.gateway import MAX_REQUEST_BYTES, Answer, problem_answer
from neonlocal.serverless.request import HttpProblem
from neonlocal.serverless.session import CARRIED_TLS
from neonlocal.serverless.transport import CarriedTransport
from neonlocal.serverless.websocket import WebSocketCarrier

if TYPE_CHECKING:
    from neonlocal.serverless.gateway import Gateway

# Request line and headers together (the body has its own limit).
MAX_HEADER_BYTES = 64 * 1024
# The longest request method we wait for (the standard ones have at most 7 letters).
MAX_METHOD_BYTES = 16
_METHOD_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# A connection with no request in hand for this long is closed (fetch's own keep-alive is
# shorter, so it is the client that normally closes first).
IDLE_TIMEOUT_S = 30.0
HTTP_NO_CONTENT = 204
HTTP_NOT_FOUND = 404
HTTP_PAYLOAD_TOO_LARGE = 413
HTTP_INTERNAL_ERROR = 500

log = structlog.get_logger("neonlocal.serverless")

_CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"POST, OPTIONS"),
    (
        b"access-control-allow-headers",
        b"Authorization, Content-Type, Neon-Connection-String, Neon-Raw-Text-Output, "
        b"Neon-Array-Mode, Neon-Batch-Isolation-Level, Neon-Batch-Read-Only, "
        b"Neon-Batch-Deferrable",
    ),
    (b"access-control-max-age", b"86400"),
]


class HttpConnection(asyncio.Protocol):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._transport: asyncio.Transport | None = None
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._ws: WebSocketCarrier | None = None
        self._idle: asyncio.TimerHandle | None = None
        # The first bytes, until they show a method and a space (None once they have).
        self._opening: bytes | None = b""
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._wait_for_request()

    def _wait_for_request(self) -> None:
        self._stop_waiting()
        self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT_S, self._close)

    def _stop_waiting(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def data_received(self, data: bytes) -> None:
        if self._ws is not None:
            self._ws.receive(data)
            return
        if self._opening is not None and not self._opens_like_http(data):
            return
        self._h11.receive_data(data)
        if self._task is not None and self._buffered_too_much():
            # A client sending its next requests while one is answered: hold it to one
            # request's worth, then stop reading until the answer is out.
            assert self._transport is not None
            self._transport.pause_reading()
            self._paused = True
        self._advance()

    def _buffered_too_much(self) -> bool:
        return len(self._h11.trailing_data[0]) > MAX_REQUEST_BYTES + MAX_HEADER_BYTES

    def _opens_like_http(self, data: bytes) -> bool:
        """Whether the connection may still be HTTP. Bytes that only began with a capital
        (a PostgreSQL Terminate, line noise) are closed without a word, as PostgreSQL closes
        on what is no startup packet."""
        assert self._opening is not None
        self._opening += data[: MAX_METHOD_BYTES + 1]
        for index, byte in enumerate(self._opening[: MAX_METHOD_BYTES + 1]):
            if byte == ord(" ") and index > 0:
                self._opening = None
                return True
            if byte not in _METHOD_BYTES:
                break
        else:
            if len(self._opening) <= MAX_METHOD_BYTES:
                return True  # wait for the rest of the method
        self._opening = None
        if self._transport is not None:
            self._transport.abort()
        return False

    def eof_received(self) -> bool | None:
        if self._ws is None:
            self._h11.receive_data(b"")
            self._advance()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        if self._ws is not None:
            self._ws.lost()
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        if self._ws is not None and self._ws.session is not None:
            self._ws.session.pause_writing()

    def resume_writing(self) -> None:
        if self._ws is not None and self._ws.session is not None:
            self._ws.session.resume_writing()

    # --- requests ----------------------------------------------------------------------------

    def _advance(self) -> None:
        """Take h11's events until a request is complete (then answer it) or more is needed."""
        while self._task is None and self._ws is None and self._transport is not None:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint, f"malformed HTTP request: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if _is_upgrade(event):
                    self._upgrade(event)
                    return
                self._request, self._body = event, bytearray()
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_REQUEST_BYTES:
                    message = f"request is too large (max is {MAX_REQUEST_BYTES} bytes)"
                    self._refuse(HTTP_PAYLOAD_TOO_LARGE, message)
                    return
            elif isinstance(event, h11.EndOfMessage) and self._request is not None:
                request, body = self._request, bytes(self._body)
                self._request, self._body = None, bytearray()
                self._stop_waiting()
                self._task = asyncio.get_running_loop().create_task(self._answer(request, body))
            elif isinstance(event, h11.ConnectionClosed):
                self._transport.close()
                return

    async def _answer(self, request: h11.Request, body: bytes) -> None:
        try:
            status, payload = await self._route(request, body)
        except Exception:
            log.exception("http_request_failed", target=request.target.decode("latin-1"))
            status = HTTP_INTERNAL_ERROR
            payload = answer.encode(answer.error("neonlocal: internal error (see its log)"))
        finally:
            self._task = None
        self._send(status, payload)
        if self._h11.our_state is h11.MUST_CLOSE or self._transport is None:
            self._close()
            return
        with contextlib.suppress(h11.LocalProtocolError):
            self._h11.start_next_cycle()
        if self._paused and not self._transport.is_closing():
            self._paused = False
            self._transport.resume_reading()
        self._wait_for_request()
        self._advance()

    async def _route(self, request: h11.Request, body: bytes) -> Answer:
        path = request.target.split(b"?", 1)[0]
        if request.method == b"OPTIONS":
            return HTTP_NO_CONTENT, b""
        if path == b"/sql" and request.method == b"POST":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
            return await self._gateway.sql(headers, body, self._carried_extra())
        return problem_answer(
            HttpProblem(
                "neonlocal serves POST /sql and WebSocket sessions (/v2) here",
                status=HTTP_NOT_FOUND,
            )
        )

    def _send(self, status: int, payload: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        headers = [*_CORS, (b"content-length", str(len(payload)).encode())]
        if payload:
            headers.append((b"content-type", b"application/json"))
        try:
            data = self._h11.send(h11.Response(status_code=status, headers=headers))
            data = (data or b"") + (self._h11.send(h11.Data(data=payload)) or b"")
            data += self._h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            self._close()
            return
        self._transport.write(data)

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request we will not read any further, then close."""
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._send(status, answer.encode(answer.error(message)))
        self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    # --- WebSocket ---------------------------------------------------------------------------

    def _upgrade(self, request: h11.Request) -> None:
        assert self._transport is not None
        self._stop_waiting()  # the session has its own timeouts from here
        early, _closed = self._h11.trailing_data
        carrier = WebSocketCarrier(self._transport)
        self._ws = carrier
        transport = CarriedTransport(carrier, self._carried_extra())
        carrier.session = transport
        if not carrier.accept(request.headers, request.target.decode("latin-1")):
            self._close()
            return
        endpoint = Endpoint()
        endpoint.on_connect = self._gateway.start_session
        transport.attach(endpoint)
        if early:
            carrier.receive(early)

    def _carried_extra(self) -> dict[str, object]:
        """What a session carried by this connection knows of it (its transport's extra)."""
        assert self._transport is not None
        return {
            "peername": self._transport.get_extra_info("peername"),
            "sockname": self._transport.get_extra_info("sockname"),
            CARRIED_TLS: self._transport.get_extra_info("ssl_object") is not None,
        }


def _is_upgrade(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"upgrade" and value.lower() == b"websocket":
            return True
    return False
