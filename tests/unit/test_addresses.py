"""AddressBook: where a branch host's name becomes a TCP connection, with a DNS head start.

Real sockets on loopback addresses; only the name lookup is scripted (FakeDns).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from fixtures.dns import faked_dns, recorded_connects
from neonlocal.proxy.addresses import AddressBook

HOST = "ep-book-700007.us-east-2.aws.neon.tech"


class Listener:
    """A TCP listener on ``address``:``port`` that accepts and holds connections."""

    def __init__(self, server: asyncio.Server) -> None:
        self.server = server
        self.accepted = 0

    @classmethod
    async def open(cls, address: str, port: int) -> Listener:
        listener: Listener

        def accepted(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            listener.accepted += 1
            writer.close()

        listener = cls(await asyncio.start_server(accepted, address, port))
        return listener

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def free_port_on(*addresses: str) -> int:
    """A port nobody listens on at any of ``addresses`` (a refused connect there)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        if all(_free(address, port) for address in addresses[1:]):
            return port
    raise RuntimeError("no common free port")


def _free(address: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


@pytest.fixture
def port() -> int:
    return free_port_on("127.0.0.4", "127.0.0.5")


async def connect(book: AddressBook, port: int) -> str:
    transport, _ = await book.connect(HOST, port, asyncio.Protocol)
    peer = str(transport.get_extra_info("peername")[0])
    transport.close()
    return peer


async def test_the_first_address_that_accepts_is_used_and_remembered(port: int) -> None:
    """A refused address in the answer is skipped; the next session starts from the one
    that worked."""
    good = await Listener.open("127.0.0.4", port)
    try:
        async with faked_dns(HOST) as dns:
            dns.answers = ["127.0.0.5", "127.0.0.4"]  # .5 refuses
            book = AddressBook()
            async with recorded_connects({port}, dns) as connects:
                assert await connect(book, port) == "127.0.0.4"
                dns.delay = 0.2
                assert await connect(book, port) == "127.0.0.4"
        assert [address for address, _ in connects] == ["127.0.0.5", "127.0.0.4", "127.0.0.4"]
        assert connects[-1] == ("127.0.0.4", True)  # the head start, during the lookup
    finally:
        await good.close()


async def test_a_remembered_address_that_now_refuses_falls_to_the_rest_of_the_answer(
    port: int,
) -> None:
    first = await Listener.open("127.0.0.4", port)
    second = await Listener.open("127.0.0.5", port)
    try:
        async with faked_dns(HOST) as dns:
            dns.answers = ["127.0.0.4", "127.0.0.5"]
            book = AddressBook()
            assert await connect(book, port) == "127.0.0.4"
            await first.close()
            assert await connect(book, port) == "127.0.0.5"
            assert await connect(book, port) == "127.0.0.5"
    finally:
        await second.close()


async def test_nobody_accepting_raises_the_last_refusal(port: int) -> None:
    async with faked_dns(HOST) as dns:
        dns.answers = ["127.0.0.4", "127.0.0.5"]
        with pytest.raises(ConnectionRefusedError):
            await AddressBook().connect(HOST, port, asyncio.Protocol)


async def test_ip_literals_are_not_looked_up(port: int) -> None:
    listener = await Listener.open("127.0.0.4", port)
    try:
        async with faked_dns(HOST) as dns:
            transport, _ = await AddressBook().connect("127.0.0.4", port, asyncio.Protocol)
            transport.close()
            assert dns.lookups == 0
    finally:
        await listener.close()
