"""TCP connections to a branch host, with its DNS lookup taken off the critical path.

Every new session looks the host name up again, so a changed answer (a Neon endpoint moved,
a VPN came up) is followed by the very next session and nothing stale is ever used. But the
lookup need not be waited for before connecting: the address the name had last time is
connected to while the name is looked up. When the fresh answer still contains it (almost
always), that connection is used and the lookup cost no time; otherwise it is dropped and
the session connects to the fresh answer, as it would have without the head start.

The book also remembers the hosts that would not take direct TLS (``proxy/upstream.py``),
so that only the first session to such a host pays for finding out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable

Connection = tuple[asyncio.Transport, asyncio.Protocol]


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AddressBook:
    """What one server has learned about each (host, port) it connects to: the address it
    was last reached at, and whether it hung up on direct TLS."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int], str] = {}
        self._no_direct_tls: set[tuple[str, int]] = set()

    def refused_direct_tls(self, host: str, port: int) -> bool:
        return (host, port) in self._no_direct_tls

    def note_refused_direct_tls(self, host: str, port: int) -> None:
        self._no_direct_tls.add((host, port))

    async def connect(
        self, host: str, port: int, protocol: Callable[[], asyncio.Protocol]
    ) -> Connection:
        """Connect to ``host``; raises socket.gaierror or OSError as create_connection does."""
        loop = asyncio.get_running_loop()
        if _is_ip_literal(host):
            return await _connect_to(loop, host, port, protocol)
        remembered = self._last.get((host, port))
        early: asyncio.Task[Connection] | None = None
        if remembered is not None:
            early = asyncio.ensure_future(_connect_to(loop, remembered, port, protocol))
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            fresh = list(dict.fromkeys(str(info[4][0]) for info in infos))
            if early is not None and remembered in fresh:
                try:
                    connection = await early
                except OSError:
                    fresh.remove(remembered)  # the others in the answer may still work
                else:
                    early = None
                    return connection
            connection, address = await _connect_first(loop, fresh, port, protocol)
            self._last[(host, port)] = address
            return connection
        finally:
            if early is not None:
                _abandon(early)


async def _connect_to(
    loop: asyncio.AbstractEventLoop,
    address: str,
    port: int,
    protocol: Callable[[], asyncio.Protocol],
) -> Connection:
    transport, endpoint = await loop.create_connection(protocol, host=address, port=port)
    return transport, endpoint


async def _connect_first(
    loop: asyncio.AbstractEventLoop,
    addresses: list[str],
    port: int,
    protocol: Callable[[], asyncio.Protocol],
) -> tuple[Connection, str]:
    """The first of ``addresses`` that accepts, in the resolver's order."""
    failure: OSError = OSError("the host name has no address")
    for address in addresses:
        try:
            return await _connect_to(loop, address, port, protocol), address
        except OSError as exc:
            failure = exc
    raise failure


def _abandon(task: asyncio.Task[Connection]) -> None:
    """Drop a head-start connection that lost to a changed DNS answer."""

    def close(done: asyncio.Task[Connection]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        transport, _ = done.result()
        transport.abort()

    task.add_done_callback(close)
    with contextlib.suppress(Exception):
        task.cancel()
