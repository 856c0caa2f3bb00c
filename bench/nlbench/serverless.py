"""One-shot queries on the daemon's port: as ``neon()`` sends them over HTTP, and over the
PostgreSQL protocol, each through a minimal asyncio client in this process.

The rule: the three ways ask the same query with the same parameter, and each client does
no more work than its protocol needs, so the client's own cost is small and alike for all.

- ``POST /sql``: the request @neondatabase/serverless 1.2 on Node.js's fetch sends for
  ``sql.query(text, [value])``, byte for byte (recorded from the driver in tests/node), on
  one kept-alive connection per client, as fetch keeps one;
- new connection per query: startup, the query, Terminate on a new connection each time
  (what a one-shot is over the PostgreSQL protocol);
- kept connection: the same query on one open session.

The PostgreSQL clients send the messages the daemon's ``/sql`` side sends upstream (Parse,
Bind with text parameters, Describe, Execute, Sync), so the server's work is the same.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import time
import urllib.parse
from dataclasses import dataclass

from neonlocal.serverless.pgclient import extended_query
from nlbench.workloads import WorkloadError, read_until_ready, startup_packet

QUERY = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
# What the driver appends to the connection string it sends (URL-encoded by URLSearchParams).
DRIVER_APPLICATION_NAME = "pkg:npm/%40neondatabase/serverless@1.2.0"
HTTP_OK = 200
TERMINATE = b"X\x00\x00\x00\x04"


class Way(enum.StrEnum):
    HTTP = "POST /sql"
    CONNECT = "new connection per query"
    KEPT = "kept connection"


@dataclass(frozen=True)
class Target:
    """Where the clients go, and who they are."""

    port: int
    user: str
    database: str
    accounts: int  # rows in pgbench_accounts: the parameter is drawn from 1..accounts


def sql_request(target: Target, aid: int) -> bytes:
    """The driver's request for ``sql.query(QUERY, [aid])`` as Node.js's fetch sends it."""
    query = urllib.parse.urlencode({"application_name": DRIVER_APPLICATION_NAME})
    url = f"postgresql://{target.user}:local@localhost:{target.port}/{target.database}?{query}"
    # The driver sends every parameter as text (its prepareValue), in compact JSON.
    body = json.dumps({"query": QUERY, "params": [str(aid)]}, separators=(",", ":")).encode()
    head = (
        "POST /sql HTTP/1.1\r\n"
        f"host: localhost:{target.port}\r\n"
        "connection: keep-alive\r\n"
        f"Neon-Connection-String: {url}\r\n"
        "Neon-Raw-Text-Output: true\r\n"
        "Neon-Array-Mode: true\r\n"
        "content-type: text/plain;charset=UTF-8\r\n"
        "accept: */*\r\n"
        "accept-language: *\r\n"
        "sec-fetch-mode: cors\r\n"
        "user-agent: node\r\n"
        "accept-encoding: gzip, deflate\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_http_answer(reader: asyncio.StreamReader) -> None:
    """Read one answer (headers, then Content-Length bytes); anything but 200 is an error."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length)
    status = int(lines[0].split(" ")[1])
    if status != HTTP_OK:
        raise WorkloadError(f"POST /sql answered {status}: {body[:300]!r}")


def _query_message(aid: int) -> bytes:
    return extended_query(QUERY, (str(aid),))


class Client:
    """One client of one way: ``ask(aid)`` runs the query once; ``close`` hangs up."""

    def __init__(self, way: Way, target: Target) -> None:
        self.way = way
        self.target = target
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.target.port)
        if self.way is not Way.HTTP:
            writer.write(startup_packet(self.target.user, self.target.database))
            await read_until_ready(reader, "session")
        return reader, writer

    async def ask(self, aid: int) -> None:
        if self.way is Way.CONNECT:
            reader, writer = await self._connect()
            writer.write(_query_message(aid) + TERMINATE)
            await read_until_ready(reader, "query")
            writer.close()
            return
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await self._connect()
        if self.way is Way.HTTP:
            self._writer.write(sql_request(self.target, aid))
            await read_http_answer(self._reader)
        else:
            self._writer.write(_query_message(aid))
            await read_until_ready(self._reader, "query")

    async def close(self) -> None:
        if self._writer is not None:
            if self.way is Way.KEPT:
                self._writer.write(TERMINATE)
            self._writer.close()
            self._reader = self._writer = None


async def _latencies(client: Client, count: int, warm_up: int) -> list[float]:
    accounts = client.target.accounts
    for _ in range(warm_up):
        await client.ask(random.randint(1, accounts))  # noqa: S311 (a benchmark's parameter)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(count):
        aid = random.randint(1, accounts)  # noqa: S311
        began = clock()
        await client.ask(aid)
        samples.append((clock() - began) / 1e6)
    return samples


def latencies(way: Way, target: Target, count: int) -> list[float]:
    """ms per query, one client asking ``count`` times in a row (after a short warm-up)."""

    async def run() -> list[float]:
        client = Client(way, target)
        try:
            return await _latencies(client, count, warm_up=min(20, count))
        finally:
            await client.close()

    return asyncio.run(run())


def throughput(way: Way, target: Target, clients: int, seconds: float) -> tuple[int, float]:
    """Queries answered by ``clients`` clients asking as fast as they can for about
    ``seconds``, and the seconds it took (until the last answer)."""

    async def one(until: float) -> int:
        client = Client(way, target)
        done = 0
        try:
            while time.monotonic() < until:
                await client.ask(random.randint(1, target.accounts))  # noqa: S311
                done += 1
        finally:
            await client.close()
        return done

    async def run() -> tuple[int, float]:
        began = time.monotonic()
        done = await asyncio.gather(*(one(began + seconds) for _ in range(clients)))
        return sum(done), time.monotonic() - began

    return asyncio.run(run())


def first_request(target: Target) -> None:
    """One ``POST /sql`` on a connection of its own, closed after the answer."""

    async def run() -> None:
        client = Client(Way.HTTP, target)
        try:
            await client.ask(1)
        finally:
            await client.close()

    asyncio.run(run())
