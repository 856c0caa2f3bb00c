"""One side of a session (the client's socket or the upstream's) as an asyncio Protocol.

During the handshake an Endpoint buffers what arrives and the session awaits ``recv()``.
Once both sides are ready, ``Relay.start`` turns the pair into a relay: each chunk received
is written straight into the peer's transport, and the peer's flow control pauses our reading.
Using Protocols rather than streams keeps the relay to one callback and one write per chunk.

The upstream side is an ``UpstreamEndpoint``, which does its own TLS over the raw TCP
transport (an ``ssl.SSLObject`` between two memory BIOs) instead of ``loop.start_tls``: the
standard loop's TLS layer is pure Python and costs the relay more CPU per message than this
(bench/RESULTS.md has the figures), and owning the handshake is what lets direct TLS
negotiation fall back. The relay's CPU per message is what a small machine has left for
the client and the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Callable
from typing import Any, cast


class PeerClosed(Exception):
    """The other end closed the connection while we were waiting for its bytes."""


class NotTls(Exception):
    """The server answered our ClientHello with bytes that are not a TLS record."""


# The content types a TLS record may begin with (RFC 8446 5.1): ChangeCipherSpec, Alert,
# Handshake, ApplicationData.
_TLS_RECORD_TYPES = range(0x14, 0x18)


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

    async def _wait_until(self, has_bytes: Callable[[], object]) -> None:
        """Wait for bytes to arrive (``has_bytes`` says when); PeerClosed at end of stream."""
        while not has_bytes():
            if self.eof:
                raise PeerClosed
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                # A cancelled wait must not clear the waiter of a newer one.
                if self._waiter is waiter:
                    self._waiter = None

    async def recv(self) -> bytes:
        """Bytes received so far (waiting for some); raises PeerClosed at end of stream."""
        await self._wait_until(lambda: self._buf)
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def unread(self, data: bytes) -> None:
        """Put back bytes a parser read past what it needed: the next reader gets them first."""
        self._buf[:0] = data

    def take_buffered(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, data: bytes) -> None:
        """Relay hot path: ``write`` without its checks (the relay knows we are open)."""
        self.transport.write(data)  # type: ignore[union-attr]

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


# The largest TLS record's plaintext; the decrypt loop reads one record per call.
_RECORD = 16384
# One socket read's worth. Reads go into a buffer shared by every upstream of the thread's
# event loop: its contents are consumed before the callback returns, and a buffer per
# session would cost 1,000 idle sessions hundreds of megabytes.
_READ_SIZE = 256 * 1024
_TLS_OFF, _TLS_HANDSHAKE, _TLS_OPEN, _TLS_CLOSED = range(4)
# How long a closed TLS session waits for the server to close its side (asyncio's own TLS
# transport waits up to 30 s); then the socket is simply dropped.
CLOSE_TIMEOUT_S = 10.0
_buffers = threading.local()


def _shared_buffer() -> memoryview:
    """This thread's socket read buffer."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = memoryview(bytearray(_READ_SIZE))
        _buffers.view = view
    return view


class UpstreamEndpoint(Endpoint, asyncio.BufferedProtocol):
    """The connection to a server: plain TCP until ``start_tls``, then TLS done here.

    Everything above sees plaintext: ``recv``, ``on_data`` and ``bytes_in`` deliver what the
    server sent, and ``write``/``send`` encrypt. ``transport`` stays the TCP transport, so
    pausing its reading (flow control) works as for a plain endpoint.
    """

    def __init__(self) -> None:
        super().__init__()
        self._read_view = _shared_buffer()
        self._tls_state = _TLS_OFF
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object: ssl.SSLObject | None = None
        # The same object, for the hot path (set by start_tls, used only after it).
        self._ssl: ssl.SSLObject
        self._eof_reported = False
        self._linger: asyncio.TimerHandle | None = None
        # A server that does not speak TLS here (an old one sent a ClientHello, a non-TLS
        # answer) gives itself away by its first byte: no need to wait for a whole record.
        self._server_first_byte: int | None = None

    # --- raw bytes from the TCP transport ---------------------------------------------------
    # The standard loop reads into our buffer (BufferedProtocol); uvloop only does that for
    # protocols that are not also an asyncio.Protocol, so it calls data_received instead.

    # Plaintext goes where a plain Endpoint's data goes: the session's recv() or the relay.
    _deliver = Endpoint.data_received

    def data_received(self, data: bytes) -> None:
        state = self._tls_state
        if state == _TLS_OPEN:
            self._incoming.write(data)
            self._decrypt()
        elif state == _TLS_OFF:
            self._deliver(data)
        elif state == _TLS_HANDSHAKE:
            self._handshake_bytes(data)
        # _TLS_CLOSED: we said goodbye; whatever still comes is dropped.

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        state = self._tls_state
        if state == _TLS_OPEN:
            self._incoming.write(self._read_view[:nbytes])
            self._decrypt()
        elif state == _TLS_OFF:
            self._deliver(bytes(self._read_view[:nbytes]))
        elif state == _TLS_HANDSHAKE:
            self._handshake_bytes(self._read_view[:nbytes])

    def _handshake_bytes(self, data: bytes | memoryview) -> None:
        if self._server_first_byte is None and data:
            self._server_first_byte = data[0]
        self._incoming.write(data)
        self._wake()

    def _decrypt(self) -> None:
        # The relay's hot path: usually one small record in, one bytes object out. Each
        # read() takes at most one record, and asking for a full record's worth (the most
        # plaintext a TLS record holds) leaves nothing behind in the SSL object, so
        # ``incoming.pending`` alone says whether another record is waiting.
        read, incoming = self._ssl.read, self._incoming
        parts: list[bytes] = []
        size = 0
        closed = False
        try:
            while True:
                chunk = read(_RECORD)
                if not chunk:
                    closed = True  # the server's close_notify
                    break
                parts.append(chunk)
                if not incoming.pending:
                    break
                size += len(chunk)
                if size > _READ_SIZE:
                    self._deliver(b"".join(parts))
                    parts, size = [], 0
        except ssl.SSLWantReadError:
            pass  # the rest of a record is still on its way
        except ssl.SSLZeroReturnError:
            closed = True
        except ssl.SSLError:
            # A forged or corrupt record, or an alert: nothing more can be trusted.
            if parts:
                self._deliver(b"".join(parts))
            self.abort()
            return
        if parts:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            on_data = self.on_data
            if on_data is not None:
                self.bytes_in += len(data)
                on_data(data)
            else:
                self._deliver(data)
        if closed:
            self._received_close_notify()
            return
        if self._outgoing.pending:
            # A post-handshake message (TLS 1.3 KeyUpdate) wants an answer.
            self.transport.write(self._outgoing.read())  # type: ignore[union-attr]

    def _received_close_notify(self) -> None:
        if not self._eof_reported:
            self._eof_reported = True
            if not super().eof_received():
                self.close()

    def eof_received(self) -> bool | None:
        if self._eof_reported or self._tls_state == _TLS_CLOSED:
            # The TCP FIN after a close_notify already reported, or after our own close.
            self.eof = True
            return False
        self._eof_reported = True
        return super().eof_received()

    # --- TLS ---------------------------------------------------------------------------------

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """Run the TLS handshake as the client; raises ssl.SSLError, PeerClosed or NotTls."""
        assert self.transport is not None
        assert not self._buf
        ssl_object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )
        self.ssl_object = self._ssl = ssl_object
        self._tls_state = _TLS_HANDSHAKE
        while True:
            try:
                ssl_object.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if self._outgoing.pending:
                self.transport.write(self._outgoing.read())
            await self._wait_until(lambda: self._incoming.pending)
            first = self._server_first_byte
            if first is not None and first not in _TLS_RECORD_TYPES:
                raise NotTls
        if self._outgoing.pending:
            self.transport.write(self._outgoing.read())  # our Finished
        self._tls_state = _TLS_OPEN
        if self._incoming.pending:
            self._decrypt()  # the server spoke right after its Finished

    def write(self, data: bytes) -> None:
        if self._tls_state == _TLS_OFF:
            super().write(data)
        elif (
            self._tls_state == _TLS_OPEN
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.send(data)

    def send(self, data: bytes) -> None:
        if self._tls_state == _TLS_OFF:
            self.transport.write(data)  # type: ignore[union-attr]
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError:
            self.abort()
            return
        self.transport.write(self._outgoing.read())  # type: ignore[union-attr]

    def close(self) -> None:
        """End the session in TLS (close_notify), then in TCP once the server has.

        As asyncio's own TLS transport does: half-close and wait for the server's side to
        close, reading and dropping what it still sends, so that it gets everything we wrote
        (closing with unread data would reset the connection instead). The session sees
        nothing more but ``connection_lost``.
        """
        state = self._tls_state
        if state == _TLS_CLOSED:
            return
        if state == _TLS_OPEN:
            self._tls_state = _TLS_CLOSED
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()
            transport = self.transport
            if transport is not None and not transport.is_closing():
                if self._outgoing.pending:
                    transport.write(self._outgoing.read())
                if transport.can_write_eof():
                    try:
                        transport.write_eof()
                    except OSError:
                        # The server reset the connection and the transport has not been
                        # told yet (the standard loop's shutdown() then raises ENOTCONN):
                        # there is nobody left to say goodbye to.
                        transport.abort()
                        return
                    self._linger = asyncio.get_running_loop().call_later(
                        CLOSE_TIMEOUT_S, transport.abort
                    )
                    return
        super().close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)

    def extra(self, name: str) -> Any:
        if name == "ssl_object":
            return self.ssl_object
        return super().extra(name)  # noqa: S610 - a transport's, not Django's
