"""Our own PostgreSQL client for ``/sql``, talking to a proxy session over a carried transport.

A ``Link`` is to the session what the driver's WebSocket is: a client endpoint on a
``CarriedTransport``. So HTTP queries get the branch selected when the link opened, the same
upstream login, errors and ``neonlocal.branch`` as every other client, and a switch ends the
link as it ends any idle session. The one rule: a link answers one exchange at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from neonlocal.pgwire import codec
from neonlocal.proxy.endpoint import Endpoint
from neonlocal.serverless.pgclient import Reply
from neonlocal.serverless.transport import CarriedTransport


class LinkClosed(Exception):
    """The session ended while we waited for its answer."""


class Link:
    def __init__(self, start_session: Callable[[Endpoint], None], extra: dict[str, Any]) -> None:
        self._incoming = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.status = codec.IDLE
        self._transport = CarriedTransport(self, extra)
        endpoint = Endpoint()
        endpoint.on_connect = start_session
        self._transport.attach(endpoint)

    async def exchange(self, request: bytes, reply: Reply) -> Reply:
        """Send ``request`` and read until ReadyForQuery; LinkClosed if the session ends."""
        self._transport.deliver(request)
        while True:
            if self._incoming:
                data = bytes(self._incoming)
                self._incoming.clear()
                self._incoming += reply.receive(data)
                if reply.done:
                    self.status = reply.status
                    return reply
            if self.closed:
                if reply.error is not None:
                    return reply  # the session's last word: a refusal
                raise LinkClosed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def end(self) -> None:
        """Say goodbye to the session (Terminate) and close."""
        if not self.closed:
            self._transport.deliver(codec.terminate())
            self._transport.close()

    # --- Carrier: what the session does to us --------------------------------------------------

    def send(self, data: bytes) -> None:
        self._incoming += data
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def pause_reading(self) -> None:
        pass  # we send one exchange at a time: nothing to hold back

    def resume_reading(self) -> None:
        pass

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
