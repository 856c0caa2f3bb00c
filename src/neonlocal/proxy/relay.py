"""Bytes both ways between a client and its upstream, after the first ReadyForQuery.

Each chunk is written to the peer as it arrives, unchanged. Both streams are also shown to
an InFlight (pgwire/inflight.py), which reads their message headers to know whether any
request still awaits its answer: that is what lets a cancel be dropped for an idle session
and our own ErrorResponse go in between two of the server's messages, never inside one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from neonlocal.pgwire import codec
from neonlocal.pgwire.inflight import InFlight
from neonlocal.proxy.endpoint import Endpoint

# After the query in flight of a session being ended has its answer, how long we wait for
# the client's next request to answer it with the error, before sending it unasked.
END_WHEN_IDLE_S = 1.0

_IDLE_STATUS = codec.IDLE[0]
_TERMINATE = codec.terminate()


class Relay:
    def __init__(self, client: Endpoint, upstream: Endpoint) -> None:
        self.client = client
        self.upstream = upstream
        self._flight = InFlight()
        # Bound once: the hot path is one call per chunk each way.
        self._client_sent = self._flight.client_sent
        self._server_sent = self._flight.server_sent
        self.close_reason = "client closed"
        # We are ending the session ourselves; keep the reason we gave.
        self._ending = False
        self._finished = False
        self._client_eof = False
        self._pending_error: bytes | None = None
        # What to do once every request has its answer.
        self._on_idle: Callable[[], None] | None = None
        # Session reuse: called instead of closing the upstream when the client leaves an
        # idle session outside a transaction; the upstream then belongs to the caller.
        self.release: Callable[[], None] | None = None
        self.released = False
        self._client_tls = False
        self._to_upstream: Callable[[bytes], None] = _discard
        self._to_client: Callable[[bytes], None] = _discard
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        client, upstream = self.client, self.upstream
        assert client.transport is not None
        assert upstream.transport is not None
        # Asked now: a TLS transport that has since closed cannot be asked any more.
        self._client_tls = client.extra("ssl_object") is not None  # noqa: S610 - not Django's
        client.backpressure_source = upstream.transport
        upstream.backpressure_source = client.transport
        # Bound once: the hot path is one call per chunk each way.
        self._to_upstream = upstream.send
        self._to_client = client.transport.write
        client.on_data = self._from_client if self.release is None else self._from_client_reusable
        upstream.on_data = self._from_upstream
        client.on_eof = self._client_eof_received
        upstream.on_eof = self._upstream_eof_received
        client.on_lost = self._lost
        upstream.on_lost = self._lost
        early = client.take_buffered()
        if early:
            self._from_client(early)
        if client.lost or upstream.lost:
            self._lost()

    @property
    def idle(self) -> bool:
        """No request is running or awaits its answer."""
        return self._flight.idle

    # --- hot path --------------------------------------------------------------------------

    def _from_client(self, data: bytes) -> None:
        self._to_upstream(data)
        self._client_sent(data)

    def _from_client_reusable(self, data: bytes) -> None:
        # A client's Terminate would end the server session we want to keep: hold it back,
        # and close the client's side as the server would (asyncpg's close() waits for that).
        if data == _TERMINATE and self._flight.idle:
            self.client.close()
            return
        self._from_client(data)

    def _from_upstream(self, data: bytes) -> None:
        self._to_client(data)
        if self._server_sent(data) and self._on_idle is not None:
            self._on_idle()

    # --- ends ------------------------------------------------------------------------------

    def _client_eof_received(self) -> bool:
        # The client may half-close after its last query: let the answer come back, then
        # end the upstream session (TLS cannot carry a half-close).
        self._client_eof = True
        if self._reusable():
            return False  # the client is gone; _lost hands the idle upstream back
        if self._flight.idle:
            self._close_upstream()
        else:
            self._on_idle = self._close_upstream
        # Keeping our sending half open only works on plain TCP; a TLS client closes whole.
        return not self._client_tls

    def _upstream_eof_received(self) -> bool:
        if not self._ending:
            self.close_reason = "server closed"
        self.client.close()
        return False

    def _close_upstream(self) -> None:
        self._on_idle = None
        self.upstream.write(codec.terminate())
        self.upstream.close()

    def _reusable(self) -> bool:
        return (
            self.release is not None
            and self._flight.idle
            and self._flight.status == _IDLE_STATUS
            and not self._ending
            and not self.upstream.eof
        )

    def _lost(self) -> None:
        if self.client.lost and not self.upstream.lost:
            if self._reusable() and self.release is not None:
                release, self.release = self.release, None
                self.released = True
                self.upstream.on_data = None
                self.upstream.on_eof = self.upstream.on_lost = None
                self.upstream.backpressure_source = None
                release()
                if not self.done.done():
                    self.done.set_result(None)
                return
            self.upstream.close()
        elif self.upstream.lost and not self.client.lost:
            if not self._ending:
                self.close_reason = "server closed"
            self.client.close()
        if self.client.lost and self.upstream.lost and not self.done.done():
            self.done.set_result(None)

    # --- ending a session from our side ------------------------------------------------------

    @property
    def finished(self) -> bool:
        """The client has had its error and both sides are closing: nothing to cancel."""
        return self._finished

    def terminate(self, error: bytes, reason: str) -> None:
        """Send ``error`` to the client once no query runs, then end both sides.

        An idle session ends now. A busy one ends right after its next ReadyForQuery, so a
        query in flight is answered rather than lost; ``force_terminate`` ends it sooner.
        """
        self.close_reason = reason
        self._ending = True
        if self._flight.idle:
            self._finish(error)
        else:
            self._on_idle = lambda: self._end_at_next_request(error)

    def end_when_idle(self, error: bytes, reason: str) -> None:
        """Send ``error`` once the session is idle outside a transaction, then end both sides.

        What a switch does to sessions left on the old branch: a transaction or a query in
        flight runs to its end, and the client is told at its next request (pools ping
        then, and reconnect), so no work is cut off.
        """
        self.close_reason = reason
        self._ending = True
        if self._flight.idle and self._flight.status == _IDLE_STATUS:
            self._finish(error)
        else:
            self._on_idle = lambda: self._end_outside_transaction(error)

    def _end_outside_transaction(self, error: bytes) -> None:
        if self._flight.status == _IDLE_STATUS:
            self._end_at_next_request(error)

    def _end_at_next_request(self, error: bytes) -> None:
        # The query in flight has its answer. Answer the client's next request with the
        # error rather than racing it onto the wire right behind that answer, where a
        # client would read it as "server closed the connection unexpectedly".
        self._on_idle = None
        self.client.on_data = lambda _data: self._finish(error)
        asyncio.get_running_loop().call_later(END_WHEN_IDLE_S, self._finish, error)

    def force_terminate(self, error: bytes) -> None:
        """End now if the server stream sits between messages, else drop both sockets."""
        if self.done.done():
            return
        if self._flight.server_at_boundary:
            self._finish(error)
        else:
            self.abort(self.close_reason)

    def _finish(self, error: bytes) -> None:
        if self._finished:
            return
        self._finished = True
        self._on_idle = None
        self.upstream.on_data = _discard
        self.client.write(error)
        self.client.close()
        if self._flight.client_at_boundary:
            # Our Terminate cannot land inside a message of the client's: say goodbye properly.
            self.upstream.write(codec.terminate())
        self.upstream.close()

    def abort(self, reason: str) -> None:
        self.close_reason = reason
        self._ending = True
        self.client.abort()
        self.upstream.abort()


def _discard(data: bytes) -> None:
    pass
