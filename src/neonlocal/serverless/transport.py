"""A session's client side whose bytes travel inside another protocol.

A WebSocket carries the PostgreSQL protocol in binary frames, and an HTTP ``/sql`` request
is served by a PostgreSQL client of our own: either way the proxy's ``Session`` (and its
relay) must see an ordinary client ``Endpoint``. ``CarriedTransport`` is the asyncio
transport that endpoint is given: what the session writes goes to the carrier, what the
carrier receives goes to the endpoint. The one rule: the endpoint hears ``connection_lost``
exactly once, after whichever side closed first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from neonlocal.proxy.endpoint import Endpoint


class Carrier(Protocol):
    """What carries a session's bytes: a WebSocket, or our own client for HTTP."""

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class CarriedTransport(asyncio.Transport):
    def __init__(self, carrier: Carrier, extra: Mapping[str, Any]) -> None:
        super().__init__(dict(extra))
        self._carrier = carrier
        self._endpoint: Endpoint | None = None
        self._closing = False
        self._lost = False

    def attach(self, endpoint: Endpoint) -> None:
        """Hand the transport to ``endpoint`` (its ``on_connect`` starts the session)."""
        self._endpoint = endpoint
        endpoint.connection_made(self)

    # --- from the carrier ---------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        if self._endpoint is not None and not self._lost:
            self._endpoint.data_received(data)

    def deliver_eof(self) -> None:
        if self._endpoint is not None and not self._lost:
            self._endpoint.eof_received()

    def carrier_lost(self) -> None:
        if self._lost:
            return
        self._lost = self._closing = True
        if self._endpoint is not None:
            self._endpoint.connection_lost(None)

    # --- asyncio.Transport, as the session uses it ---------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing and data:
            self._carrier.send(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._carrier.close()
        # As a socket transport does: connection_lost comes on a later turn of the loop.
        asyncio.get_running_loop().call_soon(self.carrier_lost)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self._carrier.pause_reading()

    def resume_reading(self) -> None:
        self._carrier.resume_reading()

    def is_reading(self) -> bool:
        return not self._closing

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_writing(self) -> None:
        """The carrier's own connection is full: the relay pauses the upstream."""
        if self._endpoint is not None:
            self._endpoint.pause_writing()

    def resume_writing(self) -> None:
        if self._endpoint is not None:
            self._endpoint.resume_writing()
