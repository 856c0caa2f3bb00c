"""A WebSocket carrying one PostgreSQL session, as Neon's edge serves ``/v2``.

wsproto parses and builds the frames; the session behind it is the proxy's own
(serverless/session.py) on a ``CarriedTransport``. Each binary message's bytes go to the
session as they arrive and each write of the session's becomes one binary message: PostgreSQL
messages may span frames, as over TCP they span segments. The one rule: the raw connection
closes only after our Close frame is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from neonlocal.serverless.transport import CarriedTransport

# RFC 6455 7.4.1 close codes.
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003


class WebSocketCarrier:
    """The raw connection's side of a WebSocket session: frames in, bytes out, both ways."""

    def __init__(self, raw: asyncio.Transport) -> None:
        self._raw = raw
        self._ws = WSConnection(ConnectionType.SERVER)
        self.session: CarriedTransport | None = None

    def accept(self, headers: Iterable[tuple[bytes, bytes]], path: str) -> bool:
        """Answer the Upgrade request (already parsed by h11); False if it is not one."""
        try:
            self._ws.initiate_upgrade_connection(list(headers), path)
            upgrade = [e for e in self._ws.events() if isinstance(e, Request)]
            if not upgrade:
                return False
            self._raw.write(self._ws.send(AcceptConnection()))
        except (LocalProtocolError, RemoteProtocolError):
            self._raw.write(self._ws.send(RejectConnection(status_code=400)))
            return False
        return True

    def receive(self, data: bytes) -> None:
        try:
            self._ws.receive_data(data)
            for event in self._ws.events():
                self._on_event(event)
        except RemoteProtocolError:
            self._raw.close()

    def _on_event(self, event: object) -> None:
        session = self.session
        if isinstance(event, BytesMessage):
            if session is not None:
                session.deliver(bytes(event.data))
        elif isinstance(event, Ping):
            self._raw.write(self._ws.send(event.response()))
        elif isinstance(event, TextMessage):
            self._close(CLOSE_UNSUPPORTED_DATA, "binary frames only")
        elif isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                self._raw.write(self._ws.send(event.response()))
            if session is not None:
                session.deliver_eof()
            self._raw.close()

    def lost(self) -> None:
        if self.session is not None:
            self.session.carrier_lost()

    # --- Carrier, for the session's transport ---------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._ws.state is ConnectionState.OPEN and not self._raw.is_closing():
            self._raw.write(self._ws.send(BytesMessage(data=data)))

    def close(self) -> None:
        self._close(CLOSE_NORMAL, "")

    def _close(self, code: int, reason: str) -> None:
        if self._ws.state is ConnectionState.OPEN and not self._raw.is_closing():
            self._raw.write(self._ws.send(CloseConnection(code=code, reason=reason)))
        self._raw.close()

    def pause_reading(self) -> None:
        if not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._raw.is_closing():
            self._raw.resume_reading()
