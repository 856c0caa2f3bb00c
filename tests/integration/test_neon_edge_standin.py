"""The Neon edge stand-in behaves as Neon's edge does, seen by real clients talking to it directly.

psql, psycopg 3 (libpq 18) and asyncpg connect straight to ``fixtures.neon_edge`` in front of
the shared test clusters; a raw TLS client checks what drivers hide (message order, silence,
SCRAM flags). Which Neon source file each behaviour comes from is cited in the stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest
from scramp import ScramClient

from fixtures.dns import faked_dns
from fixtures.neon_edge import (
    COULD_NOT_CONNECT,
    ENDPOINT_DISABLED,
    ERR_BINDING_MISMATCH,
    ERR_INCONSISTENT,
    ERR_INSECURE,
    ERR_MISSING_ENDPOINT,
    ERR_PLUS_NOT_USED,
    PERMIT_FAILED,
    TOO_MANY_CONNECTION_ATTEMPTS,
    TOO_MANY_CONNECTIONS,
    CancelRecord,
    NeonEdge,
    neon_edge,
)
from fixtures.pg import TEST_DATABASE, TEST_PASSWORD, TEST_ROLE, MakeCompute
from fixtures.rawpg import (
    CANCEL_REQUEST_CODE,
    Message,
    RawClient,
    packet,
    parse_error,
    ssl_request,
    startup,
)

__all__ = ["neon_edge"]  # the stand-in fixture, used by name below

pytestmark = pytest.mark.pg

MAIN = "ep-main-100001"
DEV = "ep-dev-200002"

Dsn = Callable[..., str]


@pytest.fixture
def dsn(neon_edge: NeonEdge, ca_file: Path) -> Dsn:
    """dsn(endpoint_id, **libpq_params): a conninfo for the edge with the test role."""
    return functools.partial(
        neon_edge.conninfo, user=TEST_ROLE, password=TEST_PASSWORD, ca_file=ca_file
    )


def client_context(ca_file: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


async def open_tls(
    edge: NeonEdge, context: ssl.SSLContext, host: str | None, *, direct: bool
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to the edge, SNI ``host``: direct, or after SSLRequest and 'S'."""
    if direct:
        return await asyncio.open_connection(
            edge.addr, edge.port, ssl=context, server_hostname=host
        )
    reader, writer = await asyncio.open_connection(edge.addr, edge.port)
    writer.write(ssl_request())
    assert await reader.readexactly(1) == b"S"
    await writer.start_tls(context, server_hostname=host)
    return reader, writer


@contextlib.asynccontextmanager
async def tls_client(
    edge: NeonEdge, ca_file: Path, endpoint_id: str | None = MAIN, *, direct: bool = False
) -> AsyncIterator[RawClient]:
    """A raw client after the TLS handshake, SNI naming ``endpoint_id`` (None: no SNI)."""
    context = client_context(ca_file, ["postgresql"])
    host = edge.hostname(endpoint_id) if endpoint_id else None
    if host is None:
        context.check_hostname = False  # no SNI; the chain is still verified
    reader, writer = await open_tls(edge, context, host, direct=direct)
    client = RawClient(reader, writer)
    try:
        yield client
    finally:
        await client.close()


def sasl_initial(method: str, message: str) -> bytes:
    body = method.encode() + b"\0" + struct.pack("!i", len(message)) + message.encode()
    return password_message(body)


def password_message(body: bytes) -> bytes:
    return b"p" + struct.pack("!i", len(body) + 4) + body


def auth_code(message: Message) -> int:
    assert message.kind == b"R", message
    return int(struct.unpack("!i", message.payload[:4])[0])


async def scram_until_final(client: RawClient, scram: ScramClient) -> None:
    """Startup and SCRAM up to and including the client's final message."""
    await client.send(startup({"user": TEST_ROLE, "database": TEST_DATABASE}))
    offer = await client.read_message()
    assert offer is not None
    assert auth_code(offer) == 10
    await client.send(sasl_initial(scram.mechanism_name, scram.get_client_first()))
    server_first = await client.read_message()
    assert server_first is not None
    assert auth_code(server_first) == 11
    scram.set_server_first(server_first.payload[4:].decode())
    await client.send(password_message(scram.get_client_final().encode()))


def plus_client(ssl_object: ssl.SSLObject) -> ScramClient:
    return ScramClient(
        ["SCRAM-SHA-256-PLUS"],
        TEST_ROLE,
        TEST_PASSWORD,
        channel_binding=("tls-server-end-point", ssl_object),
    )


async def refusal_of(**connect_kwargs: object) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await asyncpg.connect(**connect_kwargs)
    return caught.value


@contextlib.asynccontextmanager
async def asyncpg_kwargs(
    edge: NeonEdge, ca_file: Path, endpoint_id: str = MAIN
) -> AsyncIterator[dict[str, object]]:
    """asyncpg arguments for the edge; the endpoint's host name resolves to the edge."""
    host = edge.hostname(endpoint_id)
    async with faked_dns(host) as dns:
        dns.answer = edge.addr
        yield {
            "host": host,
            "port": edge.port,
            "user": TEST_ROLE,
            "password": TEST_PASSWORD,
            "database": TEST_DATABASE,
            "ssl": client_context(ca_file),
            "timeout": 10,
        }


def assert_edge_error(error: asyncpg.PostgresError, text: str) -> None:
    assert (error.sqlstate, error.severity, error.args[0]) == ("XX000", "ERROR", text)


# --- TLS, SNI and the endpoint id -------------------------------------------------------------


def test_psycopg_logs_in_with_scram_plus_and_reads_the_edges_own_cancel_key(
    neon_edge: NeonEdge, dsn: Dsn
) -> None:
    with psycopg.connect(dsn(MAIN, channel_binding="require")) as conn:
        row = conn.execute("SELECT name, pg_backend_pid() FROM branch_info").fetchone()
        assert row is not None
        branch, real_pid = row
        client_pid = conn.info.backend_pid
    session = neon_edge.relayed[-1]
    assert branch == "main"
    assert session.auth == "SCRAM-SHA-256-PLUS"
    assert (session.endpoint, session.sni) == (MAIN, neon_edge.hostname(MAIN))
    assert session.alpn_offered == ("postgresql",)  # libpq 17+ always offers it
    assert session.cancel_key is not None
    assert session.compute_key is not None
    assert client_pid == struct.unpack("!i", session.cancel_key[:4])[0]
    assert session.compute_key[0] == real_pid


def test_psql_reaches_the_branch_named_by_sni(neon_edge: NeonEdge, dsn: Dsn) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    done = subprocess.run(
        [psql, dsn(DEV), "-XAtc", "SELECT name FROM branch_info"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PGAPPNAME": "psql-test"},
    )
    assert (done.returncode, done.stdout.strip()) == (0, "dev"), done.stderr
    assert neon_edge.relayed[-1].endpoint == DEV


def test_a_pooler_host_keeps_pooler_in_the_endpoint_id(neon_edge: NeonEdge, dsn: Dsn) -> None:
    with psycopg.connect(dsn(f"{MAIN}-pooler")) as conn:
        conn.execute("SELECT 1")
    assert neon_edge.relayed[-1].endpoint == f"{MAIN}-pooler"


def test_plaintext_startup_is_refused_as_insecure(neon_edge: NeonEdge, dsn: Dsn) -> None:
    with pytest.raises(psycopg.OperationalError, match="connection is insecure"):
        psycopg.connect(dsn(MAIN, sslmode="disable", gssencmode="disable"))
    assert neon_edge.sessions[-1].error == ERR_INSECURE


async def test_plaintext_refusal_is_error_xx000(neon_edge: NeonEdge) -> None:
    client = await RawClient.connect(neon_edge.addr, neon_edge.port)
    try:
        await client.send(startup({"user": TEST_ROLE}))
        error = await client.read_error()
        rest = await client.read_to_end()
    finally:
        await client.close()
    assert error.fields == {"S": "ERROR", "C": "XX000", "M": ERR_INSECURE}
    assert rest == b""


def test_direct_tls_with_alpn_postgresql_is_accepted(neon_edge: NeonEdge, dsn: Dsn) -> None:
    with psycopg.connect(dsn(MAIN, sslnegotiation="direct")) as conn:
        conn.execute("SELECT 1")
    session = neon_edge.relayed[-1]
    assert session.direct_tls
    assert session.alpn_offered == ("postgresql",)


async def test_asyncpg_direct_tls_reaches_its_endpoint(neon_edge: NeonEdge, ca_file: Path) -> None:
    async with asyncpg_kwargs(neon_edge, ca_file, DEV) as kwargs:
        conn = await asyncpg.connect(**kwargs, direct_tls=True)
        try:
            assert await conn.fetchval("SELECT name FROM branch_info") == "dev"
        finally:
            await conn.close()
    assert neon_edge.relayed[-1].direct_tls


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "sslrequest"])
async def test_another_alpn_protocol_is_refused(
    neon_edge: NeonEdge, ca_file: Path, direct: bool
) -> None:
    context = client_context(ca_file, ["h2"])
    host = neon_edge.hostname(MAIN)
    with pytest.raises(ssl.SSLError, match=r"NO_APPLICATION_PROTOCOL|no application protocol"):
        await open_tls(neon_edge, context, host, direct=direct)
    assert neon_edge.sessions[-1].alpn_offered == ("h2",)


def test_options_endpoint_names_the_branch_without_sni(
    neon_edge: NeonEdge, ca_file: Path, dsn: Dsn
) -> None:
    # An IP literal sends no SNI; verify-ca still checks the edge's certificate chain.
    params = {"host": neon_edge.addr, "sslmode": "verify-ca", "options": f"endpoint={DEV}"}
    with psycopg.connect(dsn(MAIN, **params)) as conn:
        row = conn.execute("SELECT name FROM branch_info").fetchone()
    assert row == ("dev",)
    session = neon_edge.relayed[-1]
    assert (session.sni, session.endpoint) == (None, DEV)
    assert session.compute_params is not None
    assert "options" not in dict(session.compute_params)  # only endpoint=: nothing left


def test_options_endpoint_must_agree_with_sni(neon_edge: NeonEdge, dsn: Dsn) -> None:
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(dsn(MAIN, options=f"project={DEV}"))
    text = ERR_INCONSISTENT.format(MAIN, DEV)
    assert f"ERROR:  {text}" in str(caught.value)
    assert neon_edge.sessions[-1].error == text


@pytest.mark.parametrize("host", ["ip", "other-domain"])
def test_without_endpoint_the_edge_asks_for_the_password_hack(
    neon_edge: NeonEdge, dsn: Dsn, host: str
) -> None:
    params = {"hostaddr": neon_edge.addr, "sslmode": "verify-ca"}
    params["host"] = neon_edge.addr if host == "ip" else "db.example.test"
    hacked = f"endpoint={DEV};{TEST_PASSWORD}"
    with psycopg.connect(dsn(MAIN, **params, password=hacked)) as conn:
        row = conn.execute("SELECT name FROM branch_info").fetchone()
    assert row == ("dev",)
    assert (neon_edge.relayed[-1].auth, neon_edge.relayed[-1].endpoint) == ("password hack", DEV)

    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(dsn(MAIN, **params))
    assert ERR_MISSING_ENDPOINT in str(caught.value)


# --- startup packet limits and SCRAM ----------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        startup({"user": TEST_ROLE, "application_name": "x" * 10_000}),
        packet(struct.pack("!i", 3 << 16) + b"user\0\xff\xfe\0\0"),
    ],
    ids=["over-10000-bytes", "not-utf8"],
)
async def test_bad_startup_packet_is_closed_without_a_word(
    neon_edge: NeonEdge, ca_file: Path, body: bytes
) -> None:
    async with tls_client(neon_edge, ca_file) as client:
        await client.send(body)
        assert await client.read_to_end() == b""
    assert neon_edge.sessions[-1].error is None


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"database": TEST_DATABASE}, "Parameter 'user' is missing in startup packet."),
        (
            {"user": TEST_ROLE, "options": "endpoint=ep_main!"},
            "Project name ('ep_main!') must contain only alphanumeric characters and hyphen.",
        ),
    ],
    ids=["no-user", "malformed-endpoint"],
)
async def test_startup_parameter_errors(
    neon_edge: NeonEdge, ca_file: Path, params: dict[str, str], text: str
) -> None:
    async with tls_client(neon_edge, ca_file, None) as client:
        await client.send(startup(params))
        error = await client.read_error()
    assert error.fields == {"S": "ERROR", "C": "XX000", "M": text}


async def test_two_endpoint_options_are_ignored_for_the_password_hack(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    options = f"endpoint={MAIN} project={DEV}"
    async with tls_client(neon_edge, ca_file, None) as client:
        await client.send(startup({"user": TEST_ROLE, "options": options}))
        ask = await client.read_message()
    assert ask is not None
    assert auth_code(ask) == 3  # cleartext: no endpoint known


async def test_gs2_flag_y_is_refused_when_plus_was_offered(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    async with tls_client(neon_edge, ca_file) as client:
        await client.send(startup({"user": TEST_ROLE, "database": TEST_DATABASE}))
        offer = await client.read_message()
        assert offer is not None
        assert auth_code(offer) == 10
        assert offer.payload[4:] == b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
        await client.send(sasl_initial("SCRAM-SHA-256", "y,,n=,r=c2stbm9uY2UtMTIz"))
        error = await client.read_error()
    assert error.fields == {"S": "ERROR", "C": "XX000", "M": ERR_PLUS_NOT_USED}


async def test_channel_binding_to_another_certificate_is_refused(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    scram = ScramClient(
        ["SCRAM-SHA-256-PLUS"],
        TEST_ROLE,
        TEST_PASSWORD,
        channel_binding=("tls-server-end-point", b"\x01" * 32),
    )
    async with tls_client(neon_edge, ca_file) as client:
        await scram_until_final(client, scram)
        error = await client.read_error()
    assert (error.sqlstate, error.message) == ("XX000", ERR_BINDING_MISMATCH)


async def test_libpq_style_empty_scram_user_name_is_tolerated(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    async with tls_client(neon_edge, ca_file) as client:
        ssl_object = client.writer.get_extra_info("ssl_object")
        scram = plus_client(ssl_object)
        first = scram.get_client_first().replace(f"n={TEST_ROLE},", "n=,")
        scram.client_first_bare = first.split(",", 2)[2]
        await client.send(startup({"user": TEST_ROLE, "database": TEST_DATABASE}))
        assert auth_code(await client.read_message() or Message(b"?", b"")) == 10
        await client.send(sasl_initial(scram.mechanism_name, first))
        server_first = await client.read_message()
        assert server_first is not None
        scram.set_server_first(server_first.payload[4:].decode())
        await client.send(password_message(scram.get_client_final().encode()))
        kinds = [m.kind for m in await client.read_until(b"Z")]
    assert b"E" not in kinds


async def test_wrong_password_unknown_role_and_unknown_endpoint_read_alike(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    async with asyncpg_kwargs(neon_edge, ca_file) as kwargs:
        wrong = await refusal_of(**{**kwargs, "password": "not-it"})
        ghost = await refusal_of(**{**kwargs, "user": "ghost"})
    async with asyncpg_kwargs(neon_edge, ca_file, "ep-nowhere-999999") as kwargs:
        nowhere = await refusal_of(**kwargs)
    assert_edge_error(wrong, f"password authentication failed for user '{TEST_ROLE}'")
    assert_edge_error(ghost, "password authentication failed for user 'ghost'")
    assert_edge_error(nowhere, f"password authentication failed for user '{TEST_ROLE}'")


def test_psycopg_sees_the_wrong_password_text(neon_edge: NeonEdge, dsn: Dsn) -> None:
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(dsn(MAIN, password="not-it"))
    assert f"ERROR:  password authentication failed for user '{TEST_ROLE}'" in str(caught.value)


def test_a_changed_password_is_the_only_one_accepted(neon_edge: NeonEdge, dsn: Dsn) -> None:
    neon_edge.set_password(TEST_ROLE, "npg_Rotated-2")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn(MAIN))
    with psycopg.connect(dsn(MAIN, password="npg_Rotated-2")) as conn:
        conn.execute("SELECT 1")


# --- what reaches the compute -----------------------------------------------------------------


async def test_only_filtered_startup_parameters_reach_the_compute(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    settings = {"TimeZone": "Asia/Tokyo", "search_path": "nowhere", "application_name": "edgy"}
    async with asyncpg_kwargs(neon_edge, ca_file) as kwargs:
        conn = await asyncpg.connect(**kwargs, server_settings=settings)
        try:
            timezone = await conn.fetchval("SHOW timezone")
            app = await conn.fetchval("SHOW application_name")
        finally:
            await conn.close()
    sent = dict(neon_edge.relayed[-1].compute_params or [])
    assert timezone != "Asia/Tokyo"
    assert app == "edgy"
    assert sent == {
        "client_encoding": "UTF8",
        "user": TEST_ROLE,
        "database": TEST_DATABASE,
        "application_name": "edgy",
    }


async def test_params_compat_forwards_everything_and_neon_options_are_stripped(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    options = (
        f"-c statement_timeout=4321 neon_proxy_params_compat:true neon_lsn:0/2 endpoint={MAIN}"
    )
    settings = {"TimeZone": "Asia/Tokyo", "options": options}
    async with asyncpg_kwargs(neon_edge, ca_file) as kwargs:
        conn = await asyncpg.connect(**kwargs, server_settings=settings)
        try:
            timezone = await conn.fetchval("SHOW timezone")
            timeout = await conn.fetchval("SHOW statement_timeout")
        finally:
            await conn.close()
    sent = dict(neon_edge.relayed[-1].compute_params or [])
    assert (timezone, timeout) == ("Asia/Tokyo", "4321ms")
    assert sent["options"] == "-c statement_timeout=4321"
    assert sent["client_encoding"] == "'utf-8'"  # asyncpg's own, not the forced UTF8


async def test_compute_startup_errors_are_rewrapped_as_xx000(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    neon_edge.set_password("edge_only_role", "npg_Edge-Only-1")  # unknown to the compute
    async with asyncpg_kwargs(neon_edge, ca_file) as kwargs:
        no_db = await refusal_of(**{**kwargs, "database": "nope"})
        no_role = await refusal_of(
            **{**kwargs, "user": "edge_only_role", "password": "npg_Edge-Only-1"}
        )
    assert_edge_error(no_db, 'database "nope" does not exist')
    assert_edge_error(no_role, 'password authentication failed for user "edge_only_role"')


async def test_too_many_clients_at_the_compute_is_rewrapped(
    neon_edge: NeonEdge, ca_file: Path, make_compute: MakeCompute
) -> None:
    compute = make_compute("crowded", endpoint_id="ep-crowded-300003")
    compute.psql(
        "ALTER SYSTEM SET superuser_reserved_connections = 0; ALTER SYSTEM SET max_connections = 1;"
    )
    compute.restart()
    endpoint_id = neon_edge.add_compute(compute)
    async with asyncpg_kwargs(neon_edge, ca_file, endpoint_id) as kwargs:
        first = await asyncpg.connect(**kwargs)
        try:
            error = await refusal_of(**kwargs)
        finally:
            await first.close()
    assert_edge_error(error, "sorry, too many clients already")


def test_errors_in_a_relayed_session_pass_through_unchanged(dsn: Dsn) -> None:
    with psycopg.connect(dsn(MAIN)) as conn, pytest.raises(psycopg.errors.DivisionByZero) as caught:
        conn.execute("SELECT 1/0")
    assert caught.value.diag.sqlstate == "22012"


# --- injected limits, cold start --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "after_auth"),
    [
        (TOO_MANY_CONNECTIONS, False),
        (TOO_MANY_CONNECTION_ATTEMPTS, True),
        (PERMIT_FAILED, True),
        (COULD_NOT_CONNECT, True),
        (ENDPOINT_DISABLED, True),
    ],
)
async def test_injected_limit_errors_arrive_at_their_stage(
    neon_edge: NeonEdge, ca_file: Path, text: str, after_auth: bool
) -> None:
    neon_edge.fail_next(1, text)
    async with asyncpg_kwargs(neon_edge, ca_file) as kwargs:
        error = await refusal_of(**kwargs)
        conn = await asyncpg.connect(**kwargs)  # only the next connection failed
        await conn.close()
    assert_edge_error(error, text)
    assert (neon_edge.sessions[-2].auth is not None) == after_auth


async def test_an_error_after_auth_arrives_with_saslfinal_and_authok(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    neon_edge.fail_next(1, ENDPOINT_DISABLED)
    async with tls_client(neon_edge, ca_file) as client:
        await scram_until_final(client, plus_client(client.writer.get_extra_info("ssl_object")))
        messages = await client.read_until(b"E")
    assert [m.kind for m in messages] == [b"R", b"R", b"E"]
    assert [auth_code(m) for m in messages[:2]] == [12, 0]
    assert parse_error(messages[2].payload).message == ENDPOINT_DISABLED


async def test_cold_start_is_silent_and_then_the_session_works(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    neon_edge.suspend(MAIN, wake_s=3.0)
    async with tls_client(neon_edge, ca_file) as client:
        await scram_until_final(client, plus_client(client.writer.get_extra_info("ssl_object")))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2.5):
                await client.reader.read(1)  # nothing at all, not even SASLFinal
        messages = await client.read_until(b"Z")
        waited = time.monotonic() - started
    kinds = [m.kind for m in messages]
    assert waited >= 0.4  # the rest of the 3 s wake
    assert kinds[:2] == [b"R", b"R"]
    assert b"N" not in kinds
    assert kinds.count(b"K") == 1
    assert neon_edge.sessions[-1].cold_start_s >= 2.9
    started = time.monotonic()
    async with asyncpg_kwargs(neon_edge, ca_file) as kwargs:
        await (await asyncpg.connect(**kwargs)).close()
    assert time.monotonic() - started < 2.0  # awake now


async def test_a_slow_scram_exchange_times_out(neon_edge: NeonEdge, ca_file: Path) -> None:
    neon_edge.scram_timeout_s = 0.5
    async with tls_client(neon_edge, ca_file) as client:
        await client.send(startup({"user": TEST_ROLE, "database": TEST_DATABASE}))
        error = await client.read_error()  # the client never answers the SASL offer
    assert (error.sqlstate, error.message) == ("XX000", "Authentication timed out")


# --- cancel -----------------------------------------------------------------------------------


def send_plaintext_cancel(edge: NeonEdge, key: bytes) -> None:
    with socket.create_connection((edge.addr, edge.port), timeout=5) as sock:
        sock.sendall(struct.pack("!ii", 16, CANCEL_REQUEST_CODE) + key)
        assert sock.recv(100) == b""  # the edge never answers a cancel


def cancel_over_tls(conn: psycopg.Connection[object]) -> None:
    # The edge hangs up after a cancel without a TLS close_notify (pglb/mod.rs drops the
    # stream), which libpq may report as "unexpected eof" although the cancel was delivered.
    with contextlib.suppress(psycopg.OperationalError):
        conn.cancel_safe()


@pytest.mark.parametrize("over_tls", [False, True], ids=["plaintext", "tls"])
def test_cancel_through_the_edge_cancels_the_running_query(
    neon_edge: NeonEdge, dsn: Dsn, over_tls: bool
) -> None:
    with psycopg.connect(dsn(MAIN)) as conn:
        key = neon_edge.relayed[-1].cancel_key
        assert key is not None
        # libpq's blocking PQcancel keeps the GIL, which would stall the in-process edge: the
        # plaintext cancel is sent by hand with the key the client got; cancel_safe() uses TLS.
        cancel = (
            functools.partial(cancel_over_tls, conn)
            if over_tls
            else functools.partial(send_plaintext_cancel, neon_edge, key)
        )
        timer = threading.Timer(0.5, cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        timer.join()
    assert time.monotonic() - started < 5
    assert neon_edge.cancels == [CancelRecord(key, over_tls, MAIN)]


def test_a_cancel_with_an_unknown_key_is_dropped(neon_edge: NeonEdge) -> None:
    send_plaintext_cancel(neon_edge, b"\0\0\4\xd2\0\0\0\1")
    deadline = time.monotonic() + 5
    while not neon_edge.cancels and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [c.forwarded_to for c in neon_edge.cancels] == [None]


# --- a protocol 3.2 request -------------------------------------------------------------------


async def test_plaintext_with_a_newer_minor_version_gets_past_the_tls_check(
    neon_edge: NeonEdge,
) -> None:
    # pglb/handshake.rs checks for TLS only in its 3.0 branch; the downgrade branch does not.
    # Without SNI the edge then asks for the password hack, in cleartext.
    client = await RawClient.connect(neon_edge.addr, neon_edge.port)
    try:
        await client.send(startup({"user": TEST_ROLE}, minor=2))
        negotiate = await client.read_message()
        ask = await client.read_message()
    finally:
        await client.close()
    assert negotiate is not None
    assert negotiate.kind == b"v"
    assert ask is not None
    assert auth_code(ask) == 3


async def test_a_newer_minor_version_is_downgraded_with_negotiate_protocol_version(
    neon_edge: NeonEdge, ca_file: Path
) -> None:
    async with tls_client(neon_edge, ca_file) as client:
        await client.send(
            startup(
                {"user": TEST_ROLE, "database": TEST_DATABASE, "_pq_.test_option": "1"}, minor=2
            )
        )
        negotiate = await client.read_message()
    assert negotiate is not None
    assert negotiate.kind == b"v"
    assert negotiate.payload == struct.pack("!ii", 3 << 16, 1) + b"_pq_.test_option\0"
