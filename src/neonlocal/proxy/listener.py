"""TCP listeners that look at each connection's first byte before anything reads it.

PostgreSQL 17 clients may skip the SSLRequest round trip (``sslnegotiation=direct``) and open
with a TLS ClientHello, whose first byte (0x16, a TLS handshake record) no PostgreSQL packet
starts with: every startup-phase packet begins with a length far below 16 MiB. The TLS layer
must then see the ClientHello itself, so the byte may only be peeked at, never consumed.

asyncio gives no way to do that with ``create_server``: uvloop starts reading as soon as
``connection_made`` returns, whatever the protocol asks, and ``start_tls`` cannot be handed
bytes already read. So these listeners accept connections themselves, peek (``MSG_PEEK``)
while no transport exists yet, and only then hand each socket to the event loop with
``connect_accepted_socket``, with TLS for a ClientHello and without it for everything else.
This works alike on the standard loop and on uvloop.

The same first byte tells HTTP (the serverless driver) from PostgreSQL: a request opens with
its method in ASCII capitals. Over TLS, a client that did not agree on ALPN "postgresql" is
told apart by its first plaintext byte the same way (``AfterTls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import ssl
from collections.abc import Callable
from typing import cast

from neonlocal.metrics import ErrorKind

# The first byte of a TLS record carrying a handshake message (RFC 8446, 5.1).
TLS_HANDSHAKE_RECORD = 0x16
# The first byte of an HTTP request: its method is ASCII capitals. A PostgreSQL startup packet
# starting so would claim over 1 GiB (its length's top byte), which no client sends.
HTTP_METHOD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
LISTEN_BACKLOG = 100
# What asyncio's own accept loop waits after running out of file descriptors.
ACCEPT_RETRY_DELAY_S = 1.0
# asyncio takes only a positive handshake timeout, even with no time left.
_LEAST_HANDSHAKE_TIMEOUT_S = 0.001
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

ProtocolFactory = Callable[[], asyncio.Protocol]
# Makes a PostgreSQL connection's protocol, told by when (loop time) the client must have sent
# its startup packet: PostgreSQL counts authentication_timeout from accept, TLS included.
PostgresFactory = Callable[[float], asyncio.Protocol]


def bind_tcp(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` names, as ``loop.create_server`` binds."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Each address family gets its own socket, as in create_server.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound


class TcpListener:
    """Accepts on one bound socket; a connection opening with TLS gets its handshake first.

    ``tls_context`` is asked per connection (None: direct TLS is not offered, and such a
    connection is handed over as it is, to be refused as a malformed startup packet).
    ``on_refused`` hears why a connection ended before it reached a protocol: one line, and
    the kind of error to count. ``startup_timeout`` bounds, from accept, the first byte, a
    direct TLS handshake and (in the session) the startup packet.
    """

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: PostgresFactory,
        *,
        tls_context: Callable[[], ssl.SSLContext | None],
        on_refused: Callable[[str, ErrorKind], None],
        startup_timeout: float,
        http_factory: ProtocolFactory | None = None,
    ) -> None:
        self.socket = sock
        # Serves connections that open with an HTTP request (the serverless driver).
        self._http_factory = http_factory
        self._factory = protocol_factory
        self._tls_context = tls_context
        self._on_refused = on_refused
        self._startup_timeout = startup_timeout
        self._accepting: asyncio.Task[None] | None = None
        self._reading = False
        # Connections accepted but not yet handed to the event loop.
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.socket.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        # Before the socket closes: its descriptor number may be reused at once.
        self._stop_reading()
        for task in self._pending:
            task.cancel()
        self.socket.close()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            asyncio.get_running_loop().remove_reader(self.socket.fileno())

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._accepting, *self._pending) if t is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def _accept_loop(self) -> None:
        # Our own reader, not loop.sock_accept: a sock_accept cancelled by close() may still
        # accept a connection it can no longer return (the standard loop then logs
        # InvalidStateError and the socket leaks). Accepting synchronously loses none.
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        try:
            while True:
                if not self._reading:
                    loop.add_reader(self.socket.fileno(), readable.set)
                    self._reading = True
                await readable.wait()
                readable.clear()
                if not self._accept_ready(loop):
                    self._stop_reading()
                    await asyncio.sleep(ACCEPT_RETRY_DELAY_S)
        finally:
            self._stop_reading()

    def _accept_ready(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Accept what is waiting (a backlog's worth at most); False when out of descriptors."""
        for _ in range(LISTEN_BACKLOG):
            try:
                conn, _peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._on_refused(
                        f"cannot accept connections: {exc.strerror or exc}", ErrorKind.TOO_MANY
                    )
                    return False
                continue  # the peer gave up before we accepted (ECONNABORTED and the like)
            task = loop.create_task(self._hand_over(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return True

    async def _hand_over(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        handed = False
        try:
            conn.setblocking(False)
            try:
                async with asyncio.timeout_at(deadline):
                    first = await _peek_first_byte(conn)
            except TimeoutError:
                self._on_refused(
                    "timeout while waiting for the startup packet", ErrorKind.STARTUP_TIMEOUT
                )
                return
            except OSError:
                return  # reset before it said anything
            if not first:
                return  # connected and closed without a word (a port probe)
            handed = await self._connect(conn, first[0], deadline)
        finally:
            if not handed:
                # On failure the loop may already have closed or detached it: harmless.
                with contextlib.suppress(OSError):
                    conn.close()

    async def _connect(self, conn: socket.socket, first: int, deadline: float) -> bool:
        """Hand ``conn`` to the event loop, with TLS when it opened with a ClientHello."""
        context = self._tls_context() if first == TLS_HANDSHAKE_RECORD else None
        factory: ProtocolFactory = functools.partial(self._factory, deadline)
        if self._http_factory is not None and first in HTTP_METHOD_START:
            factory = self._http_factory
        elif self._http_factory is not None and context is not None:
            factory = functools.partial(AfterTls, factory, self._http_factory, deadline)
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                factory,
                conn,
                ssl=context,
                ssl_handshake_timeout=(
                    max(deadline - loop.time(), _LEAST_HANDSHAKE_TIMEOUT_S) if context else None
                ),
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or _describe(exc)
            self._on_refused(f"direct TLS handshake failed: {reason}", ErrorKind.PROTOCOL)
            return False
        return True


class AfterTls(asyncio.Protocol):
    """Chooses, once TLS is up, between PostgreSQL and HTTP (``https``, ``wss``).

    A client that agreed on ALPN "postgresql" is a PostgreSQL client at once. Any other
    (browsers and Node.js offer "http/1.1", or nothing) is told by its first plaintext byte,
    as a plaintext connection is; one that sends nothing is dropped at ``deadline`` (loop
    time), the startup deadline set at accept.
    """

    def __init__(self, postgres: ProtocolFactory, http: ProtocolFactory, deadline: float) -> None:
        self._postgres, self._http, self._deadline = postgres, http, deadline
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() is not None:
            self._hand_to(self._postgres())
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self._deadline, self._transport.abort)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
        chosen = self._http() if data[:1] and data[0] in HTTP_METHOD_START else self._postgres()
        self._hand_to(chosen)
        chosen.data_received(data)

    def _hand_to(self, protocol: asyncio.Protocol) -> None:
        assert self._transport is not None
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def _peek_first_byte(conn: socket.socket) -> bytes:
    """The first byte the peer sent, left in the kernel's buffer; b"" if it closed."""
    loop = asyncio.get_running_loop()
    fd = conn.fileno()
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionError):
        return "the client hung up"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
