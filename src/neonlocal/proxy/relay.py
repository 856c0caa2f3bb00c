"""Bytes both ways between a client and its upstream, after the first ReadyForQuery.

No message is parsed here: each chunk is written to the peer as it arrives. Only the last six
bytes of each server chunk are looked at, to know whether the server just said
ReadyForQuery, i.e. the stream sits on a message boundary and the session is idle. That is
what lets a cancel be dropped for an idle session and an ErrorResponse be injected cleanly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from neonlocal.pgwire import codec
from neonlocal.proxy.endpoint import Endpoint

# Type byte and length of a ReadyForQuery message; the status byte follows.
_READY = b"Z\x00\x00\x00\x05"


class Relay:
    def __init__(self, client: Endpoint, upstream: Endpoint) -> None:
        self.client = client
        self.upstream = upstream
        # The server's output ended with ReadyForQuery: we are between its messages.
        self.at_boundary = True
        # ...and the client has sent nothing since: no query is running.
        self.idle = True
        self.close_reason = "client closed"
        self._client_eof = False
        self._pending_error: bytes | None = None
        self._on_boundary: Callable[[], None] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self, leftover_client: bytes = b"") -> None:
        client, upstream = self.client, self.upstream
        assert client.transport is not None
        assert upstream.transport is not None
        client.backpressure_source = upstream.transport
        upstream.backpressure_source = client.transport
        client.on_data = self._from_client
        upstream.on_data = self._from_upstream
        client.on_eof = self._client_eof_received
        upstream.on_eof = self._upstream_eof_received
        client.on_lost = self._lost
        upstream.on_lost = self._lost
        early = client.take_buffered() + leftover_client
        if early:
            self._from_client(early)
        if client.lost or upstream.lost:
            self._lost()

    # --- hot path --------------------------------------------------------------------------

    def _from_client(self, data: bytes) -> None:
        self.idle = False
        self.upstream.transport.write(data)  # type: ignore[union-attr]

    def _from_upstream(self, data: bytes) -> None:
        self.client.transport.write(data)  # type: ignore[union-attr]
        at_boundary = data[-6:-1] == _READY
        self.at_boundary = at_boundary
        if at_boundary and self._on_boundary is not None:
            self._on_boundary()

    # --- ends ------------------------------------------------------------------------------

    def _client_eof_received(self) -> bool:
        # The client may half-close after its last query: let the answer come back, then
        # end the upstream session (TLS cannot carry a half-close).
        self._client_eof = True
        if self.at_boundary:
            self._close_upstream()
        else:
            self._on_boundary = self._close_upstream
        return True

    def _upstream_eof_received(self) -> bool:
        self.close_reason = "server closed"
        self.client.close()
        return False

    def _close_upstream(self) -> None:
        self._on_boundary = None
        self.upstream.write(codec.terminate())
        self.upstream.close()

    def _lost(self) -> None:
        if self.client.lost and not self.upstream.lost:
            self.upstream.close()
        elif self.upstream.lost and not self.client.lost:
            if self.close_reason == "client closed":
                self.close_reason = "server closed"
            self.client.close()
        if self.client.lost and self.upstream.lost and not self.done.done():
            self.done.set_result(None)

    # --- ending a session from our side ------------------------------------------------------

    def terminate(self, error: bytes, reason: str) -> None:
        """Send ``error`` to the client at the next message boundary, then end both sides."""
        self.close_reason = reason
        if self.at_boundary:
            self._finish(error)
        else:
            self._on_boundary = lambda: self._finish(error)

    def _finish(self, error: bytes) -> None:
        self._on_boundary = None
        self.upstream.on_data = _discard
        self.client.write(error)
        self.client.close()
        if self.idle:
            # Both streams sit between messages: say goodbye properly.
            self.upstream.write(codec.terminate())
        self.upstream.close()

    def abort(self, reason: str) -> None:
        self.close_reason = reason
        self.client.abort()
        self.upstream.abort()


def _discard(data: bytes) -> None:
    pass
