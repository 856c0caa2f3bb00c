"""One side of a session (the client's socket or the upstream's) as an asyncio Protocol.

During the handshake an Endpoint buffers what arrives and the session awaits ``recv()``.
Once both sides are ready, ``relay.link`` turns the pair into a relay: each chunk received is
written straight into the peer's transport, and the peer's flow control pauses our reading.
Using Protocols rather than streams keeps the relay to one callback and one write per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast


class PeerClosed(Exception):
    """The other end closed the connection while we were waiting for its bytes."""


class Endpoint(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self.eof = False
        self.lost = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.bytes_in = 0
        # Relay mode: called with each chunk instead of buffering it.
        self.on_data: Callable[[bytes], None] | None = None
        self.on_eof: Callable[[], bool] | None = None
        self.on_lost: Callable[[], None] | None = None
        # Listeners: called once the connection is up (the server starts a session).
        self.on_connect: Callable[[Endpoint], None] | None = None
        # The transport whose reading we pause while our own write buffer is full.
        self.backpressure_source: asyncio.Transport | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's TCPTransport does not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        if self.on_connect is not None:
            self.on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        on_data = self.on_data
        if on_data is not None:
            on_data(data)
            return
        self._buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        if self.on_eof is not None:
            return self.on_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = True
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        if self.backpressure_source is not None and not self.backpressure_source.is_closing():
            self.backpressure_source.pause_reading()

    def resume_writing(self) -> None:
        if self.backpressure_source is not None and not self.backpressure_source.is_closing():
            self.backpressure_source.resume_reading()

    # --- handshake-time API -----------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> bytes:
        """Bytes received so far (waiting for some); raises PeerClosed at end of stream."""
        while not self._buf:
            if self.eof:
                raise PeerClosed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def take_buffered(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def extra(self, name: str) -> Any:
        return None if self.transport is None else self.transport.get_extra_info(name)

    def set_transport(self, transport: asyncio.Transport) -> None:
        """After start_tls: the TLS transport replaces the raw one."""
        self.transport = transport
