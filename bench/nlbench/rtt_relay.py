"""A TCP relay that holds every chunk for a fixed delay each way: an injected round-trip time.

Run as a script (its own process, so its timers do not compete with the client's loop):
    python rtt_relay.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS
It prints "ready" once listening. Chunks keep their order: each direction is one queue
drained by one timer.
"""

from __future__ import annotations

import asyncio
import collections
import sys


class _Delayed:
    """Writes chunks into ``transport`` ``delay`` seconds after they were received."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes | None, extra: float = 0.0) -> None:
        """``None`` stands for "close after what came before"."""
        self.queue.append((self.loop.time() + self.delay + extra, data))
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _due, data = self.queue.popleft()
            if self.transport is None or self.transport.is_closing():
                continue
            if data is None:
                self.transport.close()
            else:
                self.transport.write(data)
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)


class _Side(asyncio.Protocol):
    """One connection of a pair; what it receives goes, delayed, to the other one."""

    def __init__(self, out: _Delayed) -> None:
        self.out = out

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.push(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.push(None)


class _ClientSide(_Side):
    """The accepted connection: opens the server connection, reading nothing until it is up."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(_Delayed(loop, delay))
        self.to_client = _Delayed(loop, delay)
        self.target = target
        self.task: asyncio.Task[None] | None = None
        self.first = True

    def data_received(self, data: bytes) -> None:
        # The kernel completed the client's TCP handshake with us at once; charge its round
        # trip to the first bytes instead, which a real client sends only after it.
        extra = 2 * self.out.delay if self.first else 0.0
        self.first = False
        self.out.push(data, extra)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.to_client.transport = transport
        transport.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._connect(transport))

    async def _connect(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            server_transport, _ = await loop.create_connection(
                lambda: _Side(self.to_client), *self.target
            )
        except OSError:
            transport.close()
            return
        if transport.is_closing():
            server_transport.close()
            return
        self.out.transport = server_transport
        transport.resume_reading()


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    """Relay connections to ``listen`` on to ``target``, ``delay`` seconds late each way.

    Every round trip is charged, the TCP handshake included (see ``_ClientSide``).
    """
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ClientSide(target, delay), *listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    listen_host, listen_port, target_host, target_port, delay_ms = argv
    asyncio.run(
        _serve(
            (listen_host, int(listen_port)),
            (target_host, int(target_port)),
            float(delay_ms) / 1000,
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
