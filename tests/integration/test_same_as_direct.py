"""Same as direct: a driver cannot tell neonlocal from the server it stands in front of.

Every scenario runs the same code three ways — straight to a test compute, through a daemon
that logs in with the branch URL's credentials, and through one that relays the client's own
SCRAM login — and the outcomes (what the driver observes) must be equal. Each scenario also
asserts the outcome PostgreSQL itself gives, so that a bug on both sides cannot pass.

The one difference a driver may see is the ``neonlocal.branch`` ParameterStatus; scenarios
that look at ParameterStatus messages leave it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import pq
from psycopg.pq.abc import PGconn

from fixtures import libpq, rawpg
from fixtures.daemon import LocalDaemon, daemon_env, private_dir, running_daemon, write_config
from fixtures.pg import TEST_PASSWORD, MakeCompute
from neonlocal.localpg import LocalCompute

pytestmark = pytest.mark.pg

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
JAVA_SOURCE = Path(__file__).resolve().parents[1] / "java" / "SameAsDirect.java"
PGJDBC_JAR = Path("/usr/share/java/postgresql.jar")

BRANCH_STATUS = "neonlocal.branch"


@dataclass(frozen=True)
class Way:
    """One way to reach the same server: straight, or through one of the daemons."""

    name: str
    host: str
    port: int
    password: str | None
    sslmode: str
    sslrootcert: str | None = None
    user: str = "neondb_owner"
    database: str = "neondb"
    # The way straight to the server, for the second connection a scenario may need.
    extra: dict[str, str] = field(default_factory=dict)

    def conninfo(self, **params: str) -> str:
        parts = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": self.database,
            "sslmode": self.sslmode,
        }
        if self.password is not None:
            parts["password"] = self.password
        if self.sslrootcert is not None:
            parts["sslrootcert"] = self.sslrootcert
        parts.update(params)
        return " ".join(f"{k}={_quote(v)}" for k, v in parts.items())

    def jdbc_url(self) -> str:
        query = {"user": self.user, "sslmode": self.sslmode}
        if self.password is not None:
            query["password"] = self.password
        if self.sslrootcert is not None:
            query["sslrootcert"] = self.sslrootcert
        args = "&".join(f"{k}={v}" for k, v in query.items())
        return f"jdbc:postgresql://{self.host}:{self.port}/{self.database}?{args}"

    def node_options(self) -> dict[str, Any]:
        client: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "database": self.database,
        }
        if self.password is not None:
            client["password"] = self.password
        options: dict[str, Any] = {"client": client}
        if self.sslmode != "disable":
            # verify-ca: the certificate names the Neon host, not the address used here.
            client["ssl"] = {"checkServerIdentity": None}
            options["caFile"] = self.sslrootcert
        return options

    async def asyncpg_connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(dsn=self._asyncpg_dsn())

    def _asyncpg_dsn(self) -> str:
        password = f":{self.password}" if self.password is not None else ""
        query = f"sslmode={self.sslmode}"
        if self.sslrootcert is not None:
            query += f"&sslrootcert={self.sslrootcert}"
        return f"postgresql://{self.user}{password}@{self.host}:{self.port}/{self.database}?{query}"


def _quote(value: str) -> str:
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


Scenario = Callable[[Way], Awaitable[Any]]


@dataclass
class Ways:
    direct: Way
    through: list[Way]
    daemons: dict[str, LocalDaemon]

    async def compare(self, scenario: Scenario) -> Any:
        """Run ``scenario`` every way; every outcome must equal the direct one, returned."""
        expected = await scenario(self.direct)
        for way in self.through:
            assert await scenario(way) == expected, f"{way.name} differs from direct"
        return expected


@contextlib.asynccontextmanager
async def _daemon(branches: dict[str, str], extra: str = "") -> AsyncIterator[LocalDaemon]:
    workdir = private_dir("neonlocal-test-direct-")
    try:
        config = write_config(workdir / "config.toml", branches, branch="main", extra=extra)
        async with running_daemon(config, daemon_env(workdir)) as running:
            yield running
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _direct(compute: LocalCompute, ca_file: Path) -> Way:
    return Way(
        "direct",
        compute.spec.listen_addr,
        compute.spec.port,
        TEST_PASSWORD,
        "verify-ca",
        str(ca_file),
    )


@contextlib.asynccontextmanager
async def _ways(compute: LocalCompute, ca_file: Path, extra: str = "") -> AsyncIterator[Ways]:
    with_password = {"main": compute.url(ca_file=ca_file)}
    without = {"main": compute.url(ca_file=ca_file, password=False)}
    async with _daemon(with_password, extra) as creds, _daemon(without, extra) as relayed:
        yield Ways(
            _direct(compute, ca_file),
            [
                Way("neonlocal (credentials)", "127.0.0.1", creds.port, None, "disable"),
                Way("neonlocal (relayed)", "127.0.0.1", relayed.port, TEST_PASSWORD, "disable"),
            ],
            {"credentials": creds, "relayed": relayed},
        )


@pytest.fixture
async def ways(compute_main: LocalCompute, ca_file: Path) -> AsyncIterator[Ways]:
    async with _ways(compute_main, ca_file) as made:
        yield made


@pytest.fixture
async def reuse_ways(compute_main: LocalCompute, ca_file: Path) -> AsyncIterator[Ways]:
    async with _ways(compute_main, ca_file, "[upstream]\nreuse_sessions = true") as made:
        yield made


# --- the backend pid ------------------------------------------------------------------------


async def test_the_drivers_pid_is_the_servers(ways: Ways) -> None:
    """psycopg's backend_pid and asyncpg's server pid are what pg_backend_pid() says."""

    async def pids_agree(way: Way) -> tuple[bool, bool]:
        async with await psycopg.AsyncConnection.connect(way.conninfo()) as conn:
            row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
            psycopg_agrees = row is not None and row[0] == conn.info.backend_pid
        conn2 = await way.asyncpg_connect()
        try:
            asyncpg_agrees = await conn2.fetchval("SELECT pg_backend_pid()") == (
                conn2.get_server_pid()
            )
        finally:
            await conn2.close()
        return psycopg_agrees, asyncpg_agrees

    assert await ways.compare(pids_agree) == (True, True)


async def test_an_own_notify_carries_the_own_pid(ways: Ways) -> None:
    """Apps skip NOTIFYs their own connection sent by comparing pids."""

    async def own_notify(way: Way) -> tuple[str, bool]:
        async with await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as conn:
            await conn.execute("LISTEN same_as_direct")
            await conn.execute("NOTIFY same_as_direct, 'mine'")
            async with asyncio.timeout(5):
                async for note in conn.notifies():
                    return note.payload, note.pid == conn.info.backend_pid
        raise AssertionError("no notification")

    assert await ways.compare(own_notify) == ("mine", True)


async def test_notify_from_another_session_names_that_sessions_pid(ways: Ways) -> None:
    async def across(way: Way) -> tuple[str, bool]:
        async with (
            await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as listener,
            await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as sender,
        ):
            await listener.execute("LISTEN same_as_direct")
            await sender.execute("NOTIFY same_as_direct, 'theirs'")
            async with asyncio.timeout(5):
                async for note in listener.notifies():
                    return note.payload, note.pid == sender.info.backend_pid
        raise AssertionError("no notification")

    assert await ways.compare(across) == ("theirs", True)


async def test_terminating_the_drivers_pid_ends_that_connection(ways: Ways) -> None:
    """pg_terminate_backend(<the driver's pid>) ends it with 57P01, as pools expect."""

    async def terminate_own(way: Way) -> tuple[bool, str | None]:
        async with (
            await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as victim,
            await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as admin,
        ):
            cur = await admin.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
            row = await cur.fetchone()
            try:
                await victim.execute("SELECT 1")
            except psycopg.Error as exc:
                return bool(row and row[0]), exc.sqlstate
            return bool(row and row[0]), None

    assert await ways.compare(terminate_own) == (True, "57P01")


async def test_a_reused_session_shows_the_pid_that_serves_it(reuse_ways: Ways) -> None:
    """With session reuse, the second client gets the pid of the server session it reuses."""

    async def twice(way: Way) -> tuple[bool, bool, str]:
        agreements = []
        for _ in range(2):
            async with await psycopg.AsyncConnection.connect(way.conninfo()) as conn:
                row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
                agreements.append(row is not None and row[0] == conn.info.backend_pid)
                await conn.execute("SET application_name = 'left behind'")
                show = await (await conn.execute("SHOW application_name")).fetchone()
        assert show is not None
        return agreements[0], agreements[1], "closed"

    assert await reuse_ways.compare(twice) == (True, True, "closed")


async def test_a_closed_connection_leaves_nothing_behind_with_reuse(reuse_ways: Ways) -> None:
    """A setting made before close() is gone for the next client, as with a new session."""

    async def settings_after_close(way: Way) -> str:
        async with await psycopg.AsyncConnection.connect(way.conninfo()) as conn:
            await conn.execute("SET search_path = 'left_behind'")
            await conn.commit()
        async with await psycopg.AsyncConnection.connect(way.conninfo()) as conn:
            row = await (await conn.execute("SHOW search_path")).fetchone()
            assert row is not None
            return str(row[0])

    assert await reuse_ways.compare(settings_after_close) == '"$user", public'


async def test_asyncpg_close_returns_with_session_reuse(reuse_ways: Ways) -> None:
    """close() sends Terminate and waits for the server to hang up: with reuse on, the
    daemon keeps the upstream session but must still hang up on the client."""

    async def close(way: Way) -> str:
        conn = await way.asyncpg_connect()
        await conn.fetchval("SELECT 1")
        async with asyncio.timeout(5):
            await conn.close()
        return "closed"

    assert await reuse_ways.compare(close) == "closed"


# --- startup behaviour ----------------------------------------------------------------------


async def test_terminate_before_the_startup_packet_gets_no_reply(ways: Ways) -> None:
    """PostgreSQL closes without a word on an invalid startup length (a COMMERROR)."""

    async def terminate_first(way: Way) -> bytes:
        async with rawpg.raw_client(way.host, way.port) as client:
            await client.send(rawpg.terminate())
            return await client.read_to_end()

    assert await ways.compare(terminate_first) == b""


async def test_an_unfinished_startup_packet_gets_no_reply(ways: Ways) -> None:
    async def half_a_packet(way: Way) -> bytes:
        async with rawpg.raw_client(way.host, way.port) as client:
            await client.send(rawpg.startup({"user": "neondb_owner"})[:10])
            client.writer.write_eof()
            return await client.read_to_end()

    assert await ways.compare(half_a_packet) == b""


async def test_a_query_pipelined_behind_the_startup_packet_is_answered(
    ways: Ways, compute_main: LocalCompute
) -> None:
    """StartupMessage + Query in one write: AuthenticationOk ... ReadyForQuery, then rows.

    Straight to a server that trusts the client (its Unix socket), and through the daemon that
    logs in with the URL's credentials (which trusts local clients by default).
    """

    async def pipelined(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[str]:
        client = rawpg.RawClient(reader, writer)
        try:
            await client.send(
                rawpg.startup({"user": "neondb_owner", "database": "neondb"})
                + rawpg.query("SELECT 41 + 1")
            )
            messages = await client.read_until(b"Z")  # the login's ReadyForQuery
            messages += await client.read_until(b"Z")  # the query's
        finally:
            await client.close()
        return [_describe(m) for m in messages if not _is_branch_status(m)]

    socket_path = compute_main.socket_dir / f".s.PGSQL.{compute_main.spec.port}"
    direct = await pipelined(*await asyncio.open_unix_connection(str(socket_path)))
    creds = ways.daemons["credentials"]
    through = await pipelined(*await asyncio.open_connection("127.0.0.1", creds.port))
    assert _kinds(direct) == _kinds(through)
    assert "D:42" in through
    assert direct[0] == through[0] == "R:ok"


async def test_a_relayed_login_that_never_finishes_ends_when_the_server_ends_it(
    make_compute: MakeCompute, ca_file: Path
) -> None:
    """A client that never answers the password request is closed by the server's
    authentication_timeout (PostgreSQL says why in its log only), through neonlocal too."""
    compute = make_compute("authtimeout")
    compute.psql("ALTER SYSTEM SET authentication_timeout = '1s'", dbname="postgres")
    compute.psql("SELECT pg_reload_conf()", dbname="postgres")

    async def abandoned_login(way: Way) -> tuple[str, bytes]:
        async with rawpg.raw_client(way.host, way.port) as client:
            if way.sslmode != "disable":
                await client.send(rawpg.ssl_request())
                assert await client.read_byte() == b"S"
                await client.start_tls()
            await client.send(rawpg.startup({"user": "neondb_owner", "database": "neondb"}))
            request = await client.read_message()
            assert request is not None
            return _describe(request), await client.read_to_end()

    async with _ways(compute, ca_file) as made:
        relayed = next(way for way in made.through if "relayed" in way.name)
        expected = await abandoned_login(made.direct)
        assert expected == ("R:other", b"")
        assert await abandoned_login(relayed) == expected


# --- encryption requests: each is special once ------------------------------------------------


async def _negotiation(client: rawpg.RawClient, requests: list[bytes]) -> list[str]:
    """Send each request in turn (b"": send nothing) and note its answer ('S' starts TLS); an
    ErrorResponse ends it, noted with what followed before the close."""
    seen: list[str] = []
    for request in requests:
        await client.send(request)
        answer = await client.read_byte()
        if answer == b"E":
            error, *after = rawpg.split_messages(b"E" + await client.read_to_end())
            parsed = rawpg.parse_error(error.payload)
            seen.append(f"{parsed.severity} {parsed.sqlstate} {parsed.message}")
            if "D" in parsed.fields:
                seen.append(f"DETAIL: {parsed.fields['D']}")
            seen += [m.kind.decode() for m in after]
            break
        seen.append(answer.decode())
        if answer == b"S":
            await client.start_tls()
    return seen


UNSUPPORTED_SSL = "FATAL 0A000 unsupported frontend protocol 1234.5679: server supports 3.0 to 3.0"
UNSUPPORTED_GSS = "FATAL 0A000 unsupported frontend protocol 1234.5680: server supports 3.0 to 3.0"


@pytest.mark.parametrize(
    ("second", "refused"),
    [(rawpg.ssl_request(), UNSUPPORTED_SSL), (rawpg.gssenc_request(), UNSUPPORTED_GSS)],
    ids=["SSLRequest", "GSSENCRequest"],
)
async def test_a_request_inside_tls_fails_as_an_unsupported_protocol(
    ways: Ways, second: bytes, refused: str
) -> None:
    """Once TLS is up PostgreSQL takes neither request again: its code is read as protocol
    version 1234.5679 (or .5680) and refused with 0A000."""

    async def again_inside_tls(way: Way) -> list[str]:
        async with rawpg.raw_client(way.host, way.port) as client:
            return await _negotiation(client, [rawpg.ssl_request(), second])

    assert await ways.compare(again_inside_tls) == ["S", refused]


@pytest.mark.parametrize(
    ("requests", "refused"),
    [
        ([rawpg.ssl_request()] * 2, ["N", UNSUPPORTED_SSL]),
        ([rawpg.gssenc_request()] * 2, ["N", UNSUPPORTED_GSS]),
        (
            [rawpg.gssenc_request(), rawpg.ssl_request(), rawpg.gssenc_request()],
            ["N", "N", UNSUPPORTED_GSS],
        ),
        (
            [rawpg.ssl_request(), rawpg.gssenc_request(), rawpg.ssl_request()],
            ["N", "N", UNSUPPORTED_SSL],
        ),
    ],
    ids=["SSL twice", "GSSENC twice", "GSSENC SSL GSSENC", "SSL GSSENC SSL"],
)
async def test_a_declined_request_repeated_fails_as_an_unsupported_protocol(
    compute_main: LocalCompute, ca_file: Path, requests: list[bytes], refused: list[str]
) -> None:
    """A request declined with 'N' is not taken again, nor made special again by declining
    the other. Straight to the server's Unix socket (where it declines both) and through a
    daemon without local TLS."""
    await _compare_in_plaintext(compute_main, ca_file, requests, refused)


async def _compare_in_plaintext(
    compute: LocalCompute, ca_file: Path, requests: list[bytes], expected: list[str]
) -> None:
    """Send ``requests`` straight to the server's Unix socket, where it declines both
    encryption requests, and through a daemon without local TLS: both must end as
    ``expected``."""

    async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[str]:
        client = rawpg.RawClient(reader, writer)
        try:
            return await _negotiation(client, requests)
        finally:
            await client.close()

    socket_path = compute.socket_dir / f".s.PGSQL.{compute.spec.port}"
    direct = await negotiate(*await asyncio.open_unix_connection(str(socket_path)))
    assert direct == expected
    branches = {"main": compute.url(ca_file=ca_file)}
    async with _daemon(branches, "[local]\ntls = false") as plaintext:
        assert (
            await negotiate(*await asyncio.open_connection("127.0.0.1", plaintext.port)) == direct
        )


STARTUP = rawpg.startup({"user": "neondb_owner", "database": "neondb"})


MALFORMED_STARTUPS = {
    "unterminated parameters": (
        rawpg.packet(struct.pack("!i", rawpg.PROTOCOL_3_0) + b"user\0bob\0"),
        "FATAL 08P01 invalid startup packet layout: expected terminator as last byte",
    ),
    "a parameter without a value": (
        rawpg.packet(struct.pack("!i", rawpg.PROTOCOL_3_0) + b"user\0bob\0database\0\0"),
        "FATAL 08P01 invalid startup packet layout: expected terminator as last byte",
    ),
    "no parameters at all": (
        rawpg.packet(struct.pack("!i", rawpg.PROTOCOL_3_0)),
        "FATAL 08P01 invalid startup packet layout: expected terminator as last byte",
    ),
    "no user": (
        rawpg.startup({"database": "neondb"}),
        "FATAL 28000 no PostgreSQL user name specified in startup packet",
    ),
    "protocol 4.0": (
        rawpg.startup({"user": "neondb_owner"}, major=4),
        "FATAL 0A000 unsupported frontend protocol 4.0: server supports 3.0 to 3.0",
    ),
    # PostgreSQL never looks at the terminator's value, only at where it is.
    "a terminator that is not NUL": (STARTUP[:-1] + b"\x01", "R"),
}


@pytest.mark.parametrize("case", list(MALFORMED_STARTUPS))
async def test_a_malformed_startup_packet_gets_postgresqls_answer(
    compute_main: LocalCompute, ca_file: Path, case: str
) -> None:
    packet, answer = MALFORMED_STARTUPS[case]
    await _compare_in_plaintext(compute_main, ca_file, [packet], [answer])


@pytest.mark.parametrize("major", [1, 2])
async def test_an_old_protocol_is_refused_in_its_own_format(
    compute_main: LocalCompute, ca_file: Path, major: int
) -> None:
    """PostgreSQL answers a protocol 1.x or 2.x startup in that protocol's error format."""
    old = rawpg.startup({"user": "neondb_owner", "database": "neondb"}, major=major)

    async def refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        client = rawpg.RawClient(reader, writer)
        try:
            await client.send(old)
            return await client.read_to_end()
        finally:
            await client.close()

    socket_path = compute_main.socket_dir / f".s.PGSQL.{compute_main.spec.port}"
    direct = await refused(*await asyncio.open_unix_connection(str(socket_path)))
    text = f"unsupported frontend protocol {major}.0: server supports 3.0 to 3.0"
    assert rawpg.old_style_error(direct) == f"FATAL:  {text}\n"
    async with _daemon({"main": compute_main.url(ca_file=ca_file)}) as daemon:
        assert await refused(*await asyncio.open_connection("127.0.0.1", daemon.port)) == direct


async def test_a_request_with_a_body_is_taken_for_the_request(
    compute_main: LocalCompute, ca_file: Path
) -> None:
    """PostgreSQL reads only the code of an SSLRequest or GSSENCRequest: a longer packet is
    declined like the plain request, and the login goes on ('R')."""
    requests = [
        rawpg.packet(struct.pack("!i", rawpg.SSL_REQUEST_CODE) + b"xxxx"),
        rawpg.packet(struct.pack("!i", rawpg.GSSENC_REQUEST_CODE) + b"\0" * 12),
        STARTUP,
    ]
    await _compare_in_plaintext(compute_main, ca_file, requests, ["N", "N", "R"])


INJECTED_AFTER_SSL = "FATAL 08P01 received unencrypted data after SSL request"
INJECTED_AFTER_GSS = "FATAL 08P01 received unencrypted data after GSSAPI encryption request"
INJECTION_DETAIL = (
    "DETAIL: This could be either a client-software bug or evidence of an attempted "
    "man-in-the-middle attack."
)


@pytest.mark.parametrize(
    ("request_", "refused"),
    [(rawpg.ssl_request(), INJECTED_AFTER_SSL), (rawpg.gssenc_request(), INJECTED_AFTER_GSS)],
    ids=["SSLRequest", "GSSENCRequest"],
)
async def test_plaintext_behind_a_declined_request_is_refused_after_the_answer(
    compute_main: LocalCompute, ca_file: Path, request_: bytes, refused: str
) -> None:
    """CVE-2021-23214: PostgreSQL answers 'N', then refuses what came with the request."""
    expected = ["N", refused, INJECTION_DETAIL]
    await _compare_in_plaintext(compute_main, ca_file, [request_ + STARTUP, b""], expected)


async def test_plaintext_behind_an_accepted_ssl_request_is_refused_over_tls(ways: Ways) -> None:
    """PostgreSQL answers 'S', completes the handshake, then refuses the plaintext over TLS."""

    async def injected(way: Way) -> list[str]:
        async with rawpg.raw_client(way.host, way.port) as client:
            return await _negotiation(client, [rawpg.ssl_request() + STARTUP, b""])

    assert await ways.compare(injected) == ["S", INJECTED_AFTER_SSL, INJECTION_DETAIL]


async def _nothing(client: rawpg.RawClient) -> None:
    pass


async def _half_a_startup_packet(client: rawpg.RawClient) -> None:
    await client.send(rawpg.startup({"user": "neondb_owner", "database": "neondb"})[:10])


async def _tls_then_nothing(client: rawpg.RawClient) -> None:
    await client.send(rawpg.ssl_request())
    assert await client.read_byte() == b"S"
    await client.start_tls()


async def _no_handshake_after_s(client: rawpg.RawClient) -> None:
    await client.send(rawpg.ssl_request())
    assert await client.read_byte() == b"S"


SLOW_STARTS = {
    "nothing": _nothing,
    "half a startup packet": _half_a_startup_packet,
    "TLS, then nothing": _tls_then_nothing,
    "'S', then no TLS handshake": _no_handshake_after_s,
}
# The test server's authentication_timeout and the daemon's STARTUP_TIMEOUT_S in this test.
SHORT_STARTUP_TIMEOUT_S = 1.0


async def test_a_client_slow_to_start_up_is_dropped_without_a_word(
    make_compute: MakeCompute, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL gives a client authentication_timeout from accept to send its startup
    packet, TLS handshake included, then exits without a reply: through neonlocal too."""
    compute = make_compute("slowstart")
    compute.psql(
        f"ALTER SYSTEM SET authentication_timeout = '{SHORT_STARTUP_TIMEOUT_S:g}s'",
        dbname="postgres",
    )
    compute.psql("SELECT pg_reload_conf()", dbname="postgres")
    monkeypatch.setattr("neonlocal.proxy.server.STARTUP_TIMEOUT_S", SHORT_STARTUP_TIMEOUT_S)

    async def stall(way: Way, start: Callable[[rawpg.RawClient], Awaitable[None]]) -> str:
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with rawpg.raw_client(way.host, way.port) as client:
            await start(client)
            reply = await client.read_to_end()
        waited = loop.time() - began
        bound = SHORT_STARTUP_TIMEOUT_S / 2 < waited < SHORT_STARTUP_TIMEOUT_S * 3
        return f"{reply!r} after {'about' if bound else 'not'} the bound"

    async def slow_starts(way: Way) -> dict[str, str]:
        outcomes = await asyncio.gather(*(stall(way, start) for start in SLOW_STARTS.values()))
        return dict(zip(SLOW_STARTS, outcomes, strict=True))

    async with _ways(compute, ca_file) as made:
        outcomes = await made.compare(slow_starts)
    assert set(outcomes.values()) == {"b'' after about the bound"}


def _describe(message: rawpg.Message) -> str:
    if message.kind == b"R":
        return "R:ok" if message.payload == b"\0\0\0\0" else "R:other"
    if message.kind == b"D":
        return "D:" + message.payload[6:].decode()
    return message.kind.decode()


def _kinds(described: list[str]) -> list[str]:
    # ParameterStatus count and order are the server's; compare every other message exactly.
    return [d for d in described if d != "S"]


def _is_branch_status(message: rawpg.Message) -> bool:
    return message.kind == b"S" and rawpg.parameter_status(message)[0] == BRANCH_STATUS


# --- queries, errors and settings -----------------------------------------------------------


async def test_error_fields_reach_the_driver_unchanged(ways: Ways) -> None:
    async def errors(way: Way) -> list[tuple[Any, ...]]:
        seen = []
        async with await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as conn:
            for sql in (
                "SELECT 1/0",
                "SELECT no_such_column FROM (SELECT 1) AS t",
                "DO $$ BEGIN RAISE EXCEPTION 'custom' USING DETAIL = 'the detail', "
                "HINT = 'the hint', ERRCODE = 'P0001'; END $$",
            ):
                try:
                    await conn.execute(sql)
                except psycopg.Error as exc:
                    diag = exc.diag
                    seen.append(
                        (
                            diag.sqlstate,
                            diag.message_primary,
                            diag.message_detail,
                            diag.message_hint,
                            diag.statement_position,
                            diag.severity,
                        )
                    )
        return seen

    outcome = await ways.compare(errors)
    assert [e[0] for e in outcome] == ["22012", "42703", "P0001"]
    assert outcome[2][2:4] == ("the detail", "the hint")


async def test_set_and_show_and_parameter_status(ways: Ways) -> None:
    async def settings(way: Way) -> tuple[str, str | None]:
        async with await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as conn:
            await conn.execute("SET TimeZone = 'Asia/Tokyo'")
            row = await (await conn.execute("SHOW TimeZone")).fetchone()
            assert row is not None
            return str(row[0]), conn.info.parameter_status("TimeZone")

    assert await ways.compare(settings) == ("Asia/Tokyo", "Asia/Tokyo")


async def test_startup_settings_take_effect(ways: Ways) -> None:
    """Settings a driver sends at startup (options and plain parameters) apply on the server."""

    async def startup_settings(way: Way) -> tuple[str, str]:
        conninfo = way.conninfo(options="-c search_path=from_options")
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            path = await (await conn.execute("SHOW search_path")).fetchone()
        conn2 = await asyncpg.connect(
            dsn=way._asyncpg_dsn(), server_settings={"DateStyle": "SQL, DMY"}
        )
        try:
            style = await conn2.fetchval("SHOW DateStyle")
        finally:
            await conn2.close()
        assert path is not None
        return str(path[0]), str(style)

    assert await ways.compare(startup_settings) == ("from_options", "SQL, DMY")


async def test_copy_both_ways(ways: Ways) -> None:
    async def copy(way: Way) -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(way.conninfo()) as conn:
            out = bytearray()
            async with conn.cursor().copy(
                "COPY (SELECT g, repeat('x', 50) FROM generate_series(1, 5000) g) TO STDOUT"
            ) as copy_out:
                async for chunk in copy_out:
                    out += chunk
            await conn.execute("CREATE TEMP TABLE copied (n int, s text)")
            async with conn.cursor().copy("COPY copied FROM STDIN") as copy_in:
                await copy_in.write(bytes(out))
            row = await (await conn.execute("SELECT count(*) FROM copied")).fetchone()
            assert row is not None
            return out.count(b"\n"), int(row[0])

    assert await ways.compare(copy) == (5000, 5000)


async def test_a_pipelined_batch_with_a_failure(ways: Ways) -> None:
    """libpq pipeline mode: results in order, the failing statement's error, the rest aborted."""

    async def batch(way: Way) -> list[str]:
        seen: list[str] = []
        async with await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as conn:
            async with conn.pipeline() as pipeline:
                cursors = [await conn.execute("SELECT 1"), await conn.execute("SELECT 2")]
                await pipeline.sync()
                for cur in cursors:
                    row = await cur.fetchone()
                    seen.append(f"row {row[0] if row else None}")
            try:
                async with conn.pipeline() as pipeline:
                    await conn.execute("SELECT 1/0")
                    await conn.execute("SELECT 3")
                    await pipeline.sync()
            except psycopg.Error as exc:
                seen.append(f"error {exc.sqlstate}")
            row = await (await conn.execute("SELECT 4")).fetchone()
            seen.append(f"after {row[0] if row else None}")
        return seen

    assert await ways.compare(batch) == ["row 1", "row 2", "error 22012", "after 4"]


# --- cancel ---------------------------------------------------------------------------------


def _cancel_soon(conn: psycopg.AsyncConnection[Any], delay: float = 0.5) -> asyncio.Task[None]:
    """Cancel ``conn``'s query after ``delay`` without blocking the loop the daemon runs in."""

    async def later() -> None:
        await asyncio.sleep(delay)
        await conn.cancel_safe()

    return asyncio.create_task(later())


async def test_cancel_a_running_query(ways: Ways) -> None:
    async def cancel_one(way: Way) -> tuple[str | None, int]:
        async with await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as conn:
            canceller = _cancel_soon(conn)
            try:
                await conn.execute("SELECT pg_sleep(10)")
            except psycopg.Error as exc:
                state: str | None = exc.sqlstate
            else:
                state = None
            await canceller
            row = await (await conn.execute("SELECT 5")).fetchone()
            return state, row[0] if row else 0

    assert await ways.compare(cancel_one) == ("57014", 5)


async def test_cancel_with_asyncpg_timeout(ways: Ways) -> None:
    """asyncpg cancels a query that overran its timeout with a CancelRequest."""

    async def overrun(way: Way) -> tuple[str, int]:
        conn = await way.asyncpg_connect()
        try:
            try:
                await conn.fetchval("SELECT pg_sleep(10)", timeout=0.5)
            except TimeoutError:
                outcome = "timed out"
            else:
                outcome = "finished"
            return outcome, await conn.fetchval("SELECT 6")
        finally:
            await conn.close()

    assert await ways.compare(overrun) == ("timed out", 6)


async def test_cancel_the_second_request_of_a_pipeline(ways: Ways) -> None:
    async def cancel_second(way: Way) -> list[str]:
        seen: list[str] = []
        async with await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as conn:
            try:
                async with conn.pipeline() as pipeline:
                    first = await conn.execute("SELECT 'first'")
                    await conn.execute("SELECT pg_sleep(10)")
                    canceller = _cancel_soon(conn)
                    await pipeline.sync()
            except psycopg.Error as exc:
                seen.append(f"second {exc.sqlstate}")
            await canceller
            row = await first.fetchone()
            seen.append(f"first {row[0] if row else None}")
        return seen

    assert await ways.compare(cancel_second) == ["second 57014", "first first"]


async def test_cancel_during_binary_copy(ways: Ways) -> None:
    async def cancel_copy(way: Way) -> tuple[str | None, int]:
        async with await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as conn:
            state: str | None = None
            got = 0
            try:
                async with conn.cursor().copy(
                    "COPY (SELECT g, pg_sleep(0.01) FROM generate_series(1, 2000) g) "
                    "TO STDOUT (FORMAT binary)"
                ) as copy:
                    async for _ in copy:
                        got += 1
                        if got == 5:
                            await conn.cancel_safe()
            except psycopg.Error as exc:
                state = exc.sqlstate
            row = await (await conn.execute("SELECT 7")).fetchone()
            return state, row[0] if row else 0

    assert await ways.compare(cancel_copy) == ("57014", 7)


def _pipeline_two_syncs_then_cancel(conninfo: str) -> list[str]:
    """libpq pipeline mode: a query, Sync, a long query, Sync; cancel once the first is in."""
    seen: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        pg = conn.pgconn
        pg.enter_pipeline_mode()
        for sql in (b"SELECT 'first'", b"SELECT pg_sleep(10)"):
            pg.send_query_params(sql, None)
            pg.pipeline_sync()
        libpq.flush(pg)

        def on_sync() -> None:
            if seen.count("sync") == 1:
                time.sleep(0.5)
                conn.cancel_safe(timeout=rawpg.READ_TIMEOUT_S)

        _read_pipeline(pg, 2, seen, on_sync)
        pg.exit_pipeline_mode()
        seen.append(f"after {conn.execute('SELECT 8').fetchone()}")
    return seen


def _read_pipeline(pg: PGconn, syncs: int, seen: list[str], on_sync: Callable[[], None]) -> None:
    deadline = time.monotonic() + 3 * rawpg.READ_TIMEOUT_S
    while syncs and time.monotonic() < deadline:
        if pg.is_busy():
            libpq.wait_readable(pg)
            continue
        result = pg.get_result()
        if result is None:
            continue
        status = pq.ExecStatus(result.status)
        if status == pq.ExecStatus.PIPELINE_SYNC:
            seen.append("sync")
            syncs -= 1
            on_sync()
        elif status == pq.ExecStatus.TUPLES_OK:
            value = result.get_value(0, 0)
            seen.append(f"row {value.decode() if value is not None else None}")
        else:
            code = result.error_field(pq.DiagnosticField.SQLSTATE)
            seen.append(f"{status.name} {code.decode() if code else ''}")


async def test_cancel_the_second_of_two_synced_requests_of_a_pipeline(ways: Ways) -> None:
    """The first request's ReadyForQuery arrives while the second runs: it is still busy."""

    async def two_syncs(way: Way) -> list[str]:
        return await asyncio.to_thread(_pipeline_two_syncs_then_cancel, way.conninfo())

    assert await ways.compare(two_syncs) == [
        "row first",
        "sync",
        "FATAL_ERROR 57014",
        "sync",
        "after (8,)",
    ]


async def test_cancel_the_second_of_two_queries_sent_in_one_write(
    ways: Ways, compute_main: LocalCompute
) -> None:
    """Two Query messages in one write; the cancel comes after the first one's answer.

    Straight to a server that trusts the client (its Unix socket), and through the daemon that
    logs in with the URL's credentials.
    """
    socket_path = str(compute_main.socket_dir / f".s.PGSQL.{compute_main.spec.port}")
    creds = ways.daemons["credentials"]

    async def direct() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(socket_path)

    async def through() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", creds.port)

    async def two_queries(
        connect: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
    ) -> list[str]:
        client = rawpg.RawClient(*await connect())
        try:
            await client.send(rawpg.startup({"user": "neondb_owner", "database": "neondb"}))
            key = next(m for m in await client.read_until(b"Z") if m.kind == b"K").payload
            await client.send(rawpg.query("SELECT 'first'") + rawpg.query("SELECT pg_sleep(10)"))
            first = await client.read_until(b"Z")
            await asyncio.sleep(0.5)
            canceller = rawpg.RawClient(*await connect())
            await canceller.send(rawpg.packet(struct.pack("!i", rawpg.CANCEL_REQUEST_CODE) + key))
            await canceller.close()
            second = await client.read_until(b"Z")
        finally:
            await client.close()
        return [_describe(m) for m in first] + [
            f"E:{rawpg.parse_error(m.payload).sqlstate}" if m.kind == b"E" else _describe(m)
            for m in second
        ]

    expected = await two_queries(direct)
    assert expected == ["T", "D:first", "C", "Z", "T", "E:57014", "Z"]
    assert await two_queries(through) == expected


# Rows whose last six bytes are a ReadyForQuery's, each ending exactly where PostgreSQL
# flushes its 8192-byte send buffer (the first row makes up for ParseComplete, BindComplete
# and the RowDescription of one column named "b"), so the daemon reads chunks that end in them.
_ROWS_THAT_END_LIKE_READY_FOR_QUERY = """
    SELECT decode(repeat('00', n - 6), 'hex') || '\\x5a0000000549'::bytea AS b
    FROM (
        SELECT CASE WHEN g = 1 THEN 8192 - 37 - 11 ELSE 8192 - 11 END AS n, pg_sleep(0.02)
        FROM generate_series(1, 300) g
    ) rows
"""


async def test_cancel_while_row_data_ends_in_the_bytes_of_a_ready_for_query(ways: Ways) -> None:
    async def cancel_rows(way: Way) -> tuple[str | None, bytes]:
        async with await psycopg.AsyncConnection.connect(way.conninfo(), autocommit=True) as conn:
            state: str | None = None
            tail = b""
            got = 0
            try:
                async for (value,) in conn.cursor(binary=True).stream(
                    _ROWS_THAT_END_LIKE_READY_FOR_QUERY
                ):
                    tail = bytes(value[-6:])
                    got += 1
                    if got == 5:
                        await conn.cancel_safe()
            except psycopg.Error as exc:
                state = exc.sqlstate
            return state, tail

    assert await ways.compare(cancel_rows) == ("57014", b"Z\x00\x00\x00\x05I")


# --- other drivers --------------------------------------------------------------------------


def _node_problem() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        return f"node-postgres is not installed: run `npm ci` in {NODE_DIR}"
    return None


async def _node(scenario: str, way: Way) -> dict[str, Any]:
    problem = _node_problem()
    if problem is not None:
        pytest.skip(problem)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "NODE_"))}
    options = {"scenario": scenario, **way.node_options()}
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_DIR / "scenario.js"),
        json.dumps(options),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert out, err.decode()
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("pid", {"agrees": True}),
        ("ownNotify", {"payload": "hello", "own": True}),
        ("connectThenEnd", None),
    ],
)
async def test_node_postgres(ways: Ways, scenario: str, expected: dict[str, Any] | None) -> None:
    async def run(way: Way) -> dict[str, Any]:
        return await _node(scenario, way)

    outcome = await ways.compare(run)
    if expected is not None:
        assert outcome == expected
    assert "crash" not in outcome


@pytest.fixture(scope="session")
def pgjdbc_classes() -> Iterator[Path]:
    javac = shutil.which("javac")
    if javac is None or not PGJDBC_JAR.exists():
        pytest.skip("pgjdbc needs javac and libpostgresql-jdbc-java (scripts/bootstrap)")
    out = private_dir("neonlocal-test-java-")
    subprocess.run(
        [javac, "-d", str(out), "-cp", str(PGJDBC_JAR), str(JAVA_SOURCE)],
        check=True,
        timeout=120,
    )
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("pid", {"agrees": True}),
        ("ownNotify", {"received": True, "own": True}),
        ("terminateOwn", {"terminated": True, "next_query": "57P01"}),
    ],
)
async def test_pgjdbc(
    ways: Ways, pgjdbc_classes: Path, scenario: str, expected: dict[str, Any]
) -> None:
    async def run(way: Way) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            "java",
            "-cp",
            f"{PGJDBC_JAR}:{pgjdbc_classes}",
            "SameAsDirect",
            scenario,
            way.jdbc_url(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result

    assert await ways.compare(run) == expected
