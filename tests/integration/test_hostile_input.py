"""Broken, hostile or just odd bytes from a client get a clear refusal and never hurt the daemon."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import rawpg
from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, write_config

pytestmark = [pytest.mark.pg, pytest.mark.usefixtures("no_unhandled_errors")]

HOST = "127.0.0.1"
_I32 = struct.Struct("!i")
LOGIN = {"user": "neondb_owner", "database": "neondb"}


async def still_serves(daemon: LocalDaemon) -> None:
    async with await psycopg.AsyncConnection.connect(daemon.url()) as conn:
        cur = await conn.execute("SELECT name FROM branch_info")
        assert await cur.fetchone() == ("main",)


# What PostgreSQL only logs ("invalid length of startup packet", a COMMERROR) and closes on
# without a reply: the peer may not speak the protocol at all.
UNANSWERED_STARTUPS = {
    "length below 8": _I32.pack(4),
    "length 7 with a body": _I32.pack(7) + b"\0\3\0",
    "oversized": _I32.pack(10_001) + b"\0\3\0\0",
    "huge": _I32.pack(2**31 - 1),
    "negative length": _I32.pack(-8) + b"\0" * 8,
    "Terminate": rawpg.terminate(),
    "CancelRequest too short": rawpg.packet(_I32.pack(rawpg.CANCEL_REQUEST_CODE) + b"\0\0"),
}

BAD_STARTUPS = {
    "unterminated parameters": (
        rawpg.packet(_I32.pack(rawpg.PROTOCOL_3_0) + b"user\0bob\0"),
        "08P01",
        "terminator",
    ),
    "parameter without a value": (
        rawpg.packet(_I32.pack(rawpg.PROTOCOL_3_0) + b"user\0bob\0database\0\0"),
        "08P01",
        "startup packet",
    ),
    "protocol 4.0": (rawpg.startup(LOGIN, major=4), "0A000", "unsupported frontend protocol"),
    "no user": (rawpg.startup({"database": "neondb"}), "28000", "no PostgreSQL user name"),
}


@pytest.mark.parametrize("case", list(BAD_STARTUPS))
async def test_malformed_startup_gets_an_error_and_a_close(daemon: LocalDaemon, case: str) -> None:
    """The client reads an ErrorResponse naming the problem, then EOF; others carry on."""
    data, code, text = BAD_STARTUPS[case]
    error, after = await rawpg.refusal(HOST, daemon.port, data)
    assert (error.sqlstate, error.severity) == (code, "FATAL")
    assert text in error.message
    assert after == b""
    await still_serves(daemon)


@pytest.mark.parametrize("case", list(UNANSWERED_STARTUPS))
async def test_an_impossible_startup_length_is_closed_without_a_reply(
    daemon: LocalDaemon, case: str
) -> None:
    """As PostgreSQL: no ErrorResponse for bytes that are no startup packet, just a close."""
    async with rawpg.raw_client(HOST, daemon.port) as client:
        await client.send(UNANSWERED_STARTUPS[case])
        assert await client.read_to_end() == b""
    await still_serves(daemon)


@pytest.fixture
async def plaintext_daemon(
    workdir: Path, branch_urls: dict[str, str]
) -> AsyncIterator[LocalDaemon]:
    """A daemon with local TLS turned off: it declines SSLRequest with 'N'."""
    config = write_config(
        workdir / "config.toml", branch_urls, branch="main", extra="[local]\ntls = false"
    )
    async with running_daemon(config, daemon_env(workdir)) as running:
        yield running


# PostgreSQL reads a request it no longer takes as a protocol version (test_same_as_direct.py).
UNSUPPORTED_SSL_REQUEST = "unsupported frontend protocol 1234.5679: server supports 3.0 to 3.0"


async def test_a_second_ssl_request_inside_tls_is_an_unsupported_protocol(
    daemon: LocalDaemon,
) -> None:
    async with rawpg.raw_client(HOST, daemon.port) as client:
        await client.send(rawpg.ssl_request())
        assert await client.read_byte() == b"S"
        await client.start_tls()
        await client.send(rawpg.ssl_request())
        error = await client.read_error()
        assert await client.read_to_end() == b""
    assert (error.sqlstate, error.message) == ("0A000", UNSUPPORTED_SSL_REQUEST)
    await still_serves(daemon)


async def test_a_second_ssl_request_after_n_is_an_unsupported_protocol(
    plaintext_daemon: LocalDaemon,
) -> None:
    async with rawpg.raw_client(HOST, plaintext_daemon.port) as client:
        await client.send(rawpg.ssl_request())
        assert await client.read_byte() == b"N"
        await client.send(rawpg.ssl_request())
        error = await client.read_error()
        assert await client.read_to_end() == b""
    assert (error.sqlstate, error.message) == ("0A000", UNSUPPORTED_SSL_REQUEST)
    await still_serves(plaintext_daemon)


async def test_plaintext_pipelined_behind_an_ssl_request_is_refused_over_tls(
    daemon: LocalDaemon,
) -> None:
    """CVE-2021-23214: what came with the SSLRequest unencrypted is never read as if it came
    over TLS; as PostgreSQL, the refusal follows the handshake."""
    async with rawpg.raw_client(HOST, daemon.port) as client:
        await client.send(rawpg.ssl_request() + rawpg.startup(LOGIN))
        assert await client.read_byte() == b"S"
        await client.start_tls()
        error = await client.read_error()
        assert await client.read_to_end() == b""
    assert (error.sqlstate, error.message) == (
        "08P01",
        "received unencrypted data after SSL request",
    )
    await still_serves(daemon)


async def test_plaintext_pipelined_behind_a_declined_ssl_request_is_refused(
    plaintext_daemon: LocalDaemon,
) -> None:
    error, after = await rawpg.refusal(
        HOST, plaintext_daemon.port, rawpg.ssl_request() + rawpg.startup(LOGIN)
    )
    assert (error.sqlstate, error.message) == (
        "08P01",
        "received unencrypted data after SSL request",
    )
    assert after == b""
    await still_serves(plaintext_daemon)


async def test_plaintext_where_a_tls_handshake_belongs_just_closes(daemon: LocalDaemon) -> None:
    """After 'S' no ErrorResponse can be understood; the daemon hangs up and carries on."""
    async with rawpg.raw_client(HOST, daemon.port) as client:
        await client.send(rawpg.ssl_request())
        assert await client.read_byte() == b"S"
        await client.send(rawpg.startup(LOGIN))
        reply = await client.read_to_end()
    assert reply[:1] in (b"", b"\x15")  # nothing, or a TLS alert record
    await still_serves(daemon)


async def test_gssenc_is_declined_then_ssl_is_accepted_then_login_works(
    daemon: LocalDaemon,
) -> None:
    """What libpq does with gssencmode=prefer: GSSENCRequest ('N'), then SSLRequest ('S')."""
    async with rawpg.raw_client(HOST, daemon.port) as client:
        await client.send(rawpg.gssenc_request())
        assert await client.read_byte() == b"N"
        await client.send(rawpg.ssl_request())
        assert await client.read_byte() == b"S"
        await client.start_tls()
        await client.send(rawpg.startup(LOGIN))
        login = await client.read_until(b"Z")
        await client.send(rawpg.terminate())
    assert login[0].kind == b"R"


async def test_cancel_request_with_an_unknown_key_is_dropped_silently(
    daemon: LocalDaemon,
) -> None:
    async with rawpg.raw_client(HOST, daemon.port) as client:
        await client.send(rawpg.cancel_request(123456, b"\x01\x02\x03\x04"))
        assert await client.read_to_end() == b""
    await still_serves(daemon)


async def test_cancel_with_a_wrong_key_does_not_touch_a_running_query(
    daemon: LocalDaemon,
) -> None:
    """Guessing only the process id of a live session cancels nothing."""
    async with await psycopg.AsyncConnection.connect(daemon.url()) as conn:
        pid = conn.info.backend_pid
        running = asyncio.ensure_future(conn.execute("SELECT pg_sleep(0.3), 'done'"))
        await asyncio.sleep(0.05)
        async with rawpg.raw_client(HOST, daemon.port) as client:
            await client.send(rawpg.cancel_request(pid, b"\0\0\0\0"))
            assert await client.read_to_end() == b""
        cur = await running
        assert await cur.fetchone() == ("", "done")


@pytest.mark.parametrize("sent", [b"", b"\0\0", rawpg.startup(LOGIN)[:11]])
async def test_client_that_closes_early_gets_no_reply_and_harms_nothing(
    daemon: LocalDaemon, sent: bytes
) -> None:
    """Nothing, or a truncated packet, then close: like PostgreSQL, no error is sent."""
    async with rawpg.raw_client(HOST, daemon.port) as client:
        await client.send(sent)
        client.writer.write_eof()
        assert await client.read_to_end() == b""
    await still_serves(daemon)


async def test_a_stalled_half_packet_does_not_block_other_clients(daemon: LocalDaemon) -> None:
    stalled = [await rawpg.RawClient.connect(HOST, daemon.port) for _ in range(3)]
    try:
        for client in stalled:
            await client.send(rawpg.startup(LOGIN)[:7])
        await still_serves(daemon)
        await still_serves(daemon)
    finally:
        for client in stalled:
            await client.close()


async def test_protocol_3_2_client_is_negotiated_down_and_logs_in(daemon: LocalDaemon) -> None:
    """A PostgreSQL 18 client hears "3.0, option unknown" and then runs queries."""
    params = {**LOGIN, "_pq_.test_option": "on", "application_name": "pg18"}
    async with rawpg.raw_client(HOST, daemon.port) as client:
        await client.send(rawpg.startup(params, minor=2))
        login = await client.read_until(b"Z")
        await client.send(rawpg.query("SELECT name FROM branch_info"))
        result = await client.read_until(b"Z")
        await client.send(rawpg.terminate())
    assert login[0].kind == b"v"
    assert rawpg.negotiate_protocol_version(login[0]) == (3, 0, ["_pq_.test_option"])
    assert login[1].kind == b"R"
    assert login[1].payload == _I32.pack(0)  # AuthenticationOk
    statuses = dict(rawpg.parameter_status(m) for m in login if m.kind == b"S")
    assert statuses["neonlocal.branch"] == "main"
    assert statuses["application_name"] == "pg18"
    rows = [m.payload for m in result if m.kind == b"D"]
    assert rows == [b"\0\x01" + _I32.pack(4) + b"main"]


# Byte strings that look a little like what clients send, so the fuzzing gets past the
# length check into the request and parameter parsers.
_codes = st.sampled_from(
    [rawpg.PROTOCOL_3_0, rawpg.SSL_REQUEST_CODE, rawpg.CANCEL_REQUEST_CODE, 0x00030002, 0x00020000]
)
_framed = st.builds(
    lambda code, body: rawpg.packet(_I32.pack(code) + body), _codes, st.binary(max_size=64)
)
_params = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda s: "\0" not in s),
    st.text(max_size=8).filter(lambda s: "\0" not in s),
    max_size=3,
)
# Some of them log in for real: odd parameters then reach the upstream, which may refuse them.
_logins = _params.map(lambda extra: {**extra, **LOGIN})
_startups = st.builds(
    lambda params, minor, cut: rawpg.startup(params, minor=minor)[:cut],
    st.one_of(_params, _logins),
    st.integers(0, 3),
    st.integers(0, 200),
)
_chunks = st.one_of(st.binary(max_size=96), _framed, _startups, st.just(rawpg.ssl_request()))
HOSTILE_BYTES = st.lists(_chunks, min_size=1, max_size=3).map(b"".join)


def _check_reply(reply: bytes) -> None:
    """Whatever the daemon said is well formed, and any error has a SQLSTATE.

    Bytes opening like an HTTP method reach the serverless side, which answers in HTTP.
    """
    if reply.startswith(b"HTTP/1.1 "):
        assert reply[9:12].isdigit(), reply[:40]
        return
    if rawpg.old_style_error(reply) is not None:
        return  # a startup below protocol 3.0, refused in its own format
    messages = rawpg.plaintext_messages(reply)
    for error in rawpg.iter_errors(messages):
        assert len(error.sqlstate) == 5, error
        assert error.message


async def test_random_bytes_never_crash_the_daemon(daemon: LocalDaemon) -> None:
    """Hundreds of random byte strings on the socket; afterwards a real query still works."""
    port = daemon.port

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(HOSTILE_BYTES)
    def throw(data: bytes) -> None:
        _check_reply(rawpg.exchange(HOST, port, data))

    await asyncio.to_thread(throw)
    await still_serves(daemon)
