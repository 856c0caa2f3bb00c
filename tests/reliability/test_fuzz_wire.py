"""Thousands of hostile byte strings against the live daemon's startup, SSL and cancel paths.

Three fuzzers share one daemon: Hypothesis-built packet sequences (shrinkable), a byte-level
mutator of real client packets sent in random chunks, and the same inside a real local TLS
session. Meanwhile a victim session runs queries whose cancel key the fuzzers aim at with
random secrets. Afterwards: no case hung, no reply was malformed, no query was cancelled, no
task died unhandled, no session or cancel key is left, and a real query still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
import struct
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import rawpg
from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, write_config
from neonlocal.localpg import LocalCompute
from reliability import mutate
from reliability.conftest import Figures
from reliability.measure import eventually

pytestmark = [pytest.mark.reliability, pytest.mark.pg]

HOST = "127.0.0.1"
LOGIN = {"user": "neondb_owner", "database": "neondb"}
HYPOTHESIS_CASES = int(os.environ.get("NEONLOCAL_FUZZ_HYPOTHESIS_CASES", "1000"))
MUTATION_CASES = int(os.environ.get("NEONLOCAL_FUZZ_MUTATION_CASES", "2500"))
TLS_CASES = int(os.environ.get("NEONLOCAL_FUZZ_TLS_CASES", "300"))
SEED = int(os.environ.get("NEONLOCAL_FUZZ_SEED", "20240611"))
IN_FLIGHT = 16
# A case that takes longer than this has hung (every read in rawpg waits at most as long).
CASE_TIMEOUT_S = rawpg.READ_TIMEOUT_S
# Inside TLS: how long a quiet daemon is waited for before the client closes.
TLS_QUIET_S = 0.3
_I32 = struct.Struct("!i")
_READY_IDLE = b"Z\x00\x00\x00\x05I"


@pytest.fixture
async def daemon(
    workdir: Path, compute_main: LocalCompute, ca_file: Path, no_unhandled_errors: list[object]
) -> AsyncIterator[LocalDaemon]:
    """A daemon with local TLS (the generated certificate) in front of "main"."""
    config = write_config(
        workdir / "config.toml",
        {"main": compute_main.url(ca_file=ca_file)},
        branch="main",
        extra='unix_socket_dir = ""\n\n[upstream]\nconnect_timeout = 5',
    )
    async with running_daemon(config, daemon_env(workdir)) as running:
        yield running


def client_hello() -> bytes:
    """The first flight of a real TLS client, to mutate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def seed_packets(victim_pid: int) -> list[bytes]:
    hello = client_hello()
    return [
        rawpg.startup(LOGIN),
        rawpg.startup({**LOGIN, "application_name": "fuzz", "options": "-c work_mem=64kB"}),
        rawpg.startup({**LOGIN, "_pq_.extension": "on"}, minor=2),
        rawpg.ssl_request(),
        rawpg.ssl_request() + hello,
        rawpg.gssenc_request(),
        rawpg.gssenc_request() + rawpg.ssl_request() + rawpg.startup(LOGIN),
        rawpg.cancel_request(victim_pid, b"\0\0\0\0"),
        rawpg.cancel_request(victim_pid, os.urandom(4)),
        rawpg.startup(LOGIN) + rawpg.query("SELECT 1") + rawpg.terminate(),
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ]


def check_reply(reply: bytes) -> None:
    """Whatever came back in plaintext is well-formed backend messages; errors carry a SQLSTATE.

    Bytes opening like an HTTP method reach the serverless side, which answers in HTTP.
    """
    if reply.startswith(b"HTTP/1.1 "):
        assert reply[9:12].isdigit(), reply[:40]
        return
    if rawpg.old_style_error(reply) is not None:
        return  # a startup below protocol 3.0, refused in its own format
    # After an 'S' the daemon speaks TLS: plaintext_messages returns nothing to check then.
    for error in rawpg.iter_errors(rawpg.plaintext_messages(reply)):
        assert len(error.sqlstate) == 5, error
        assert error.message, error


async def send_and_drain(port: int, data: bytes, rng: random.Random) -> bytes:
    """Send ``data`` in random chunks, then half-close (or close) and read to the end."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        pos = 0
        while pos < len(data) and not writer.transport.is_closing():
            step = rng.choice((1, 3, 8, 64, len(data)))
            writer.write(data[pos : pos + step])
            pos += step
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if rng.random() < 0.1:
                await asyncio.sleep(0.001)
        if rng.random() < 0.9:
            with contextlib.suppress(OSError):
                writer.write_eof()
        else:
            writer.transport.abort()  # vanish without a goodbye
            return b""
        chunks = []
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def tls_case(port: int, data: bytes) -> None:
    """A real local TLS session, then hostile bytes inside it."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(rawpg.ssl_request())
        assert await reader.readexactly(1) == b"S"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the daemon's generated certificate
        context.set_alpn_protocols(["postgresql"])
        await writer.start_tls(context, server_hostname="localhost")
        writer.write(data)
        await writer.drain()
        # TLS has no half-close: read until the daemon answers, closes, or waits for more
        # of a packet; then our close must end the session (checked after the run).
        reply = b""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while not reply.endswith(_READY_IDLE):
                try:
                    async with asyncio.timeout(TLS_QUIET_S):
                        chunk = await reader.read(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                reply += chunk
        check_reply(reply)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


class Victim:
    """A session running short queries all along; none of them may be cancelled."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.queries = 0
        self.cancelled = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.conn.fetchval("SELECT pg_sleep(0.02)")
            except asyncpg.QueryCanceledError:
                self.cancelled += 1
            self.queries += 1


_codes = st.sampled_from(
    [
        rawpg.PROTOCOL_3_0,
        0x00030002,
        0x00020000,
        rawpg.SSL_REQUEST_CODE,
        rawpg.GSSENC_REQUEST_CODE,
        rawpg.CANCEL_REQUEST_CODE,
        0,
        -1,
    ]
)
_words = st.text(max_size=10).filter(lambda s: "\0" not in s)
_params = st.dictionaries(
    st.one_of(st.sampled_from(["user", "database", "options", "replication", "_pq_.x"]), _words),
    _words,
    max_size=4,
)
_packets = st.one_of(
    st.builds(
        lambda code, body: rawpg.packet(_I32.pack(code) + body), _codes, st.binary(max_size=40)
    ),
    st.builds(lambda p: rawpg.startup({**LOGIN, **p}), _params),
    st.builds(lambda p: rawpg.startup(p), _params),
    st.builds(
        lambda pid, secret: rawpg.cancel_request(pid, secret),
        st.integers(-(2**31), 2**31 - 1),
        st.binary(min_size=0, max_size=8),
    ),
    st.builds(
        lambda n, body: _I32.pack(n) + body,
        st.sampled_from(mutate.INTERESTING_INTS),
        st.binary(max_size=16),
    ),
    st.just(rawpg.ssl_request()),
    st.just(rawpg.gssenc_request()),
)
HYPOTHESIS_BYTES = st.lists(_packets, min_size=1, max_size=3).map(b"".join)


@pytest.mark.timeout(600)
async def test_thousands_of_hostile_inputs_never_crash_hang_or_cancel(
    daemon: LocalDaemon, figures: Figures
) -> None:
    port = daemon.port
    server = daemon.daemon.server
    assert server is not None
    victim_conn = await asyncpg.connect(daemon.url(sslmode="disable"))
    victim = Victim(victim_conn)
    stop = asyncio.Event()
    running = asyncio.ensure_future(victim.run(stop))
    outcomes: Counter[str] = Counter()
    try:
        # 1. Hypothesis, in a worker thread with blocking sockets (it cannot drive coroutines).
        @settings(
            max_examples=HYPOTHESIS_CASES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(HYPOTHESIS_BYTES)
        def hypothesis_case(data: bytes) -> None:
            check_reply(rawpg.exchange(HOST, port, data, timeout=CASE_TIMEOUT_S))
            outcomes["hypothesis"] += 1

        await asyncio.to_thread(hypothesis_case)

        # 2. Byte-level mutations of real packets, many connections in flight.
        rng = random.Random(SEED)
        seeds = seed_packets(victim_conn.get_server_pid())
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def mutation_case(number: int) -> None:
            case_rng = random.Random(rng.random())
            data = mutate.mutate_packet(case_rng, seeds)
            async with gate:
                try:
                    async with asyncio.timeout(CASE_TIMEOUT_S):
                        reply = await send_and_drain(port, data, case_rng)
                except TimeoutError:
                    raise AssertionError(f"mutation case {number} hung: {data!r}") from None
            check_reply(reply)
            outcomes["mutation"] += 1

        await asyncio.gather(*(mutation_case(n) for n in range(MUTATION_CASES)))

        # 3. The same inside local TLS: hostile startup packets after a real handshake.
        async def tls_fuzz_case(number: int) -> None:
            case_rng = random.Random(rng.random())
            data = mutate.mutate_packet(case_rng, seeds[:3] + seeds[7:])
            async with gate:
                try:
                    async with asyncio.timeout(CASE_TIMEOUT_S):
                        await tls_case(port, data)
                except TimeoutError:
                    raise AssertionError(f"TLS case {number} hung: {data!r}") from None
            outcomes["tls"] += 1

        await asyncio.gather(*(tls_fuzz_case(n) for n in range(TLS_CASES)))
    finally:
        stop.set()
        await running
        await victim_conn.close()

    assert victim.cancelled == 0
    assert victim.queries > 0
    await eventually(lambda: not server.sessions and not server._tasks, what="sessions to end")
    assert len(server.cancels) == 0
    conn = await asyncpg.connect(daemon.url(sslmode="disable"))
    try:
        assert await conn.fetchval("SELECT name FROM branch_info") == "main"
    finally:
        await conn.close()
    figures.record(
        cases=sum(outcomes.values()),
        **{f"{kind}_cases": count for kind, count in outcomes.items()},
        seed=SEED,
        hangs=0,
        crashes=0,
        victim_queries=victim.queries,
        victim_cancelled=victim.cancelled,
        sessions_total=server.sessions_total,
    )
