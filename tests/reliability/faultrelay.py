"""A TCP relay between the daemon and PostgreSQL that injects the faults networks make.

The branch URL keeps its Neon-like ``host`` (for SNI and the certificate check) and points
``hostaddr``/port at the relay, which forwards to the real compute. The relay sees only TLS
bytes; it never decrypts anything. What it can do to a connection:

- ``DROP``: close it as soon as it is accepted (a FIN, before any byte);
- ``STALL``: accept it, swallow what arrives, never connect onwards (a black hole);
- ``SLOW_ACCEPT``: wait ``delay`` seconds before connecting onwards and forwarding;
- ``HALF_OPEN``: forward one direction only, silently dropping the other, from the start;
- ``HALF_OPEN_AFTER_HANDSHAKE``: forward until the daemon has finished its TLS handshake,
  then silently stop forwarding the server's bytes (the server hangs during login);
- on live connections: ``arm_reset_all(n)`` sends an RST to the daemon after ``n`` more
  bytes from the server (mid-query), ``half_open_all(direction)`` stops one direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field

# TLS record content type of application data; in TLS 1.3 the client's Finished is the first
# such record it sends, in TLS 1.2 the first is the StartupMessage. Either way the daemon has
# completed its handshake once it sent one.
_TLS_APPLICATION_DATA = 23
_SSL_REQUEST_LEN = 8
_CHUNK = 65536


class Fault(enum.Enum):
    NONE = "none"
    DROP = "drop"
    STALL = "stall"
    SLOW_ACCEPT = "slow accept"
    HALF_OPEN = "half-open"
    HALF_OPEN_AFTER_HANDSHAKE = "half-open after handshake"


class Direction(enum.Enum):
    TO_SERVER = "daemon to server"
    TO_CLIENT = "server to daemon"


@dataclass(frozen=True)
class FaultSpec:
    """What happens to each new connection."""

    kind: Fault = Fault.NONE
    delay: float = 0.0
    # For HALF_OPEN: the direction that is silently dropped.
    direction: Direction = Direction.TO_CLIENT


@dataclass(eq=False)
class Relayed:
    """One connection through the relay: the daemon's side and the server's side."""

    down: asyncio.StreamWriter
    up: asyncio.StreamWriter | None = None
    blocked: set[Direction] = field(default_factory=set)
    # Bytes from the server still forwarded before the daemon's side is reset; None: never.
    reset_budget: int | None = None
    # Daemon-to-server bytes not yet parsed into TLS records (HALF_OPEN_AFTER_HANDSHAKE).
    scan: bytearray | None = None
    ended: bool = False

    def reset_daemon_side(self) -> None:
        """An RST to the daemon (SO_LINGER 0, then close), and the server side dropped."""
        self.ended = True
        sock = self.down.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.down.transport.abort()
        if self.up is not None:
            self.up.transport.abort()

    def close(self) -> None:
        self.ended = True
        self.down.transport.abort()
        if self.up is not None:
            self.up.transport.abort()


class FaultRelay:
    """``async with FaultRelay(host, port) as relay``: listens on ``relay.host:relay.port``."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = listen_host
        self.fault = FaultSpec()
        self.live: set[Relayed] = set()
        self.accepted = 0
        # Faults injected, by kind: the figures RESULTS.md reports.
        self.injected: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> FaultRelay:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self.live):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        await self._server.wait_closed()

    # --- faults on live connections -----------------------------------------------------------

    def arm_reset_all(self, after_bytes: int) -> int:
        """Reset every live connection after ``after_bytes`` more bytes from the server."""
        for conn in self.live:
            conn.reset_budget = after_bytes
        return len(self.live)

    def half_open_all(self, direction: Direction) -> int:
        """Silently stop forwarding ``direction`` on every live connection."""
        for conn in self.live:
            conn.blocked.add(direction)
            self.injected[f"{Fault.HALF_OPEN.value} ({direction.value})"] += 1
        return len(self.live)

    def reset_all(self) -> int:
        """RST every live connection now: what the kernel reports once keepalive gives up."""
        count = 0
        for conn in list(self.live):
            conn.reset_daemon_side()
            self.injected["reset"] += 1
            count += 1
        return count

    # --- per connection -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        conn = Relayed(writer)
        self.live.add(conn)
        spec = self.fault
        try:
            await self._serve(conn, reader, spec)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # Closing the relay: end quietly (asyncio's stream server logs a handler task
            # that ends cancelled as an error).
            pass
        finally:
            self.live.discard(conn)
            self._tasks.discard(task)
            conn.close()

    async def _serve(self, conn: Relayed, reader: asyncio.StreamReader, spec: FaultSpec) -> None:
        kind = spec.kind
        if kind is not Fault.NONE:
            label = kind.value
            if kind is Fault.HALF_OPEN:
                label += f" ({spec.direction.value})"
            self.injected[label] += 1
        if kind is Fault.DROP:
            conn.down.close()
            return
        if kind is Fault.STALL:
            while await reader.read(_CHUNK):
                pass
            return
        if kind is Fault.SLOW_ACCEPT:
            await asyncio.sleep(spec.delay)
        if kind is Fault.HALF_OPEN:
            conn.blocked.add(spec.direction)
        if kind is Fault.HALF_OPEN_AFTER_HANDSHAKE:
            conn.scan = bytearray()
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        conn.up = up_writer
        if conn.ended:
            up_writer.transport.abort()
            return
        await asyncio.gather(
            self._pump(conn, reader, up_writer, Direction.TO_SERVER),
            self._pump(conn, up_reader, conn.down, Direction.TO_CLIENT),
        )

    async def _pump(
        self,
        conn: Relayed,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        try:
            while data := await src.read(_CHUNK):
                if conn.ended:
                    return
                if direction is Direction.TO_SERVER and conn.scan is not None:
                    self._scan_handshake(conn, data)
                if direction in conn.blocked:
                    continue  # silently gone: read, never forwarded, never closed
                if direction is Direction.TO_CLIENT and conn.reset_budget is not None:
                    if len(data) >= conn.reset_budget:
                        dst.write(data[: conn.reset_budget])
                        with contextlib.suppress(ConnectionError):
                            await dst.drain()
                        self.injected["reset mid-query"] += 1
                        conn.reset_daemon_side()
                        return
                    conn.reset_budget -= len(data)
                dst.write(data)
                await dst.drain()
            if direction not in conn.blocked and not conn.ended and dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError):
            conn.close()

    def _scan_handshake(self, conn: Relayed, data: bytes) -> None:
        """Block the server's bytes once the daemon sent its first TLS application record."""
        assert conn.scan is not None
        conn.scan += data
        buf = conn.scan
        # Skip the plaintext SSLRequest, then walk whole TLS records.
        pos = _SSL_REQUEST_LEN
        while len(buf) >= pos + 5:
            content_type = buf[pos]
            (length,) = struct.unpack_from("!H", buf, pos + 3)
            if len(buf) < pos + 5 + length:
                return
            if content_type == _TLS_APPLICATION_DATA:
                conn.blocked.add(Direction.TO_CLIENT)
                conn.scan = None
                return
            pos += 5 + length
