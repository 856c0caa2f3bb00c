"""Apps keep their Neon URL: local TLS, verify-full with the local CA, and local channel binding.

Every client here is a real libpq (psql, psycopg) unless the test needs the raw bytes or an
SQLSTATE from a failed connection (asyncpg, the raw-socket client).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import asyncpg
import psycopg
import pytest
from click.testing import CliRunner

from fixtures import rawpg
from fixtures.daemon import (
    DaemonProcess,
    LocalDaemon,
    daemon_env,
    neonlocal_cmd,
    serving,
    start_daemon_process,
    toml_string,
    write_config,
)
from fixtures.pg import TEST_PASSWORD
from neonlocal.cli import main as cli_main
from neonlocal.localpg import LocalCompute

pytestmark = pytest.mark.pg

SELECT_BRANCH = "SELECT name FROM branch_info"
LOCAL_PASSWORD = "l0cal and Secret"
LIBPQ_VERSION = psycopg.pq.version()


@pytest.fixture
async def daemon(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    """The default configuration: local TLS on, TLS clients trusted like plaintext ones."""
    async with serving(workdir, branch_urls) as running:
        yield running


def local_ca(daemon: LocalDaemon) -> Path:
    return daemon.config_path.parent / "tls" / "ca.crt"


def conninfo(daemon: LocalDaemon, host: str = "127.0.0.1", **params: str) -> str:
    parts = {"host": host, "port": str(daemon.port), "user": "neondb_owner", "dbname": "neondb"}
    parts.update(params)
    return " ".join(f"{k}='{v}'" for k, v in parts.items())


def libpq_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment without PG* variables, with a HOME of the test's own (~/.postgresql)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = str(home)
    env.update(extra)
    return env


async def psql(dsn: str, env: Mapping[str, str], sql: str = SELECT_BRANCH) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "psql", "--no-psqlrc", "--no-password", "-qAt", "-c", sql, dsn,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env),
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode()


async def psycopg_branch(dsn: str) -> tuple[str, bool]:
    """The branch a psycopg session reaches, and whether its local connection used TLS."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(SELECT_BRANCH)
        row = await cur.fetchone()
        assert row is not None
        return row[0], conn.pgconn.ssl_in_use


async def still_serves(daemon: LocalDaemon) -> None:
    assert await psycopg_branch(conninfo(daemon, sslmode="disable")) == ("main", False)


# --- sslmode, from disable to verify-full ---------------------------------------------------


@pytest.mark.parametrize("sslmode", ["disable", "prefer", "require"])
async def test_every_sslmode_reaches_the_branch_with_psql_and_psycopg(
    daemon: LocalDaemon, workdir: Path, sslmode: str
) -> None:
    """Plaintext stays accepted on loopback; prefer and require get TLS from the daemon."""
    assert await psycopg_branch(conninfo(daemon, sslmode=sslmode)) == (
        "main",
        sslmode != "disable",
    )
    code, out, err = await psql(conninfo(daemon, sslmode=sslmode), libpq_env(workdir), r"\conninfo")
    assert code == 0, err
    assert ("SSL connection" in out) is (sslmode != "disable"), out


async def test_verify_full_against_localhost_trusts_the_generated_ca(
    daemon: LocalDaemon, workdir: Path, ca_file: Path
) -> None:
    """sslrootcert=<config dir>/tls/ca.crt makes verify-full work; another CA is refused."""
    ca = local_ca(daemon)
    good = conninfo(daemon, host="localhost", sslmode="verify-full", sslrootcert=str(ca))
    assert await psycopg_branch(good) == ("main", True)
    code, out, err = await psql(good, libpq_env(workdir))
    assert (code, out) == (0, "main"), err
    # The test CA signed the computes' certificates, not the daemon's.
    wrong = conninfo(daemon, host="localhost", sslmode="verify-full", sslrootcert=str(ca_file))
    code, _out, err = await psql(wrong, libpq_env(workdir))
    assert code != 0
    assert "certificate verify failed" in err
    # The certificate names localhost, not some other name that reaches the same address.
    code, _out, err = await psql(
        conninfo(
            daemon, host="ep-main-100001.us-east-2.aws.neon.tech", hostaddr="127.0.0.1",
            sslmode="verify-full", sslrootcert=str(ca),
        ),
        libpq_env(workdir),
    )  # fmt: skip
    assert code != 0
    assert "does not match host name" in err


async def test_trust_install_makes_verify_full_work_with_no_sslrootcert(
    daemon: LocalDaemon, workdir: Path
) -> None:
    """`neonlocal trust --install` puts the daemon's CA in ~/.postgresql/root.crt for libpq."""
    home = workdir / "home"
    home.mkdir()
    dsn = conninfo(daemon, host="localhost", sslmode="verify-full")
    code, _out, err = await psql(dsn, libpq_env(home))
    assert code != 0
    assert "root certificate file" in err
    shown = CliRunner().invoke(cli_main, ["--config", str(daemon.config_path), "trust"])
    assert f"sslrootcert={local_ca(daemon)}" in shown.output
    done = CliRunner().invoke(
        cli_main,
        ["--config", str(daemon.config_path), "trust", "--install"],
        env={"HOME": str(home)},
    )
    assert done.exit_code == 0, done.output
    code, out, err = await psql(dsn, libpq_env(home))
    assert (code, out) == (0, "main"), err


async def test_pgsslrootcert_in_the_environment_works_like_the_parameter(
    daemon: LocalDaemon, workdir: Path
) -> None:
    env = libpq_env(workdir, PGSSLROOTCERT=str(local_ca(daemon)), PGSSLMODE="verify-full")
    code, out, err = await psql(conninfo(daemon, host="localhost"), env)
    assert (code, out) == (0, "main"), err


@pytest.mark.parametrize(
    "negotiation",
    [
        {"sslmode": "disable"},
        {"sslmode": "require"},
        pytest.param(
            {"sslmode": "require", "sslnegotiation": "direct"},
            marks=pytest.mark.skipif(LIBPQ_VERSION < 170000, reason="needs libpq 17"),
        ),
    ],
    ids=["plaintext", "ssl-request", "direct"],
)
async def test_neon_endpoint_options_in_a_client_url_are_accepted_on_every_path(
    daemon: LocalDaemon, negotiation: dict[str, str]
) -> None:
    """Neon's `options=endpoint=...` (for clients without SNI) is dropped, not sent upstream."""
    dsn = conninfo(daemon, options="endpoint=ep-main-100001 -c search_path=public", **negotiation)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT name, current_setting('search_path') FROM branch_info")
        assert await cur.fetchone() == ("main", "public")


# --- local channel binding --------------------------------------------------------------------


def neon_style_url(daemon: LocalDaemon, password: str, host: str = "localhost") -> str:
    """A Neon connection string with only the host swapped for the daemon's."""
    return (
        f"postgresql://neondb_owner:{password}@{host}:{daemon.port}/neondb"
        "?sslmode=require&channel_binding=require"
    )


async def test_channel_binding_require_with_tls_auth_password_takes_the_role_password(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """The Neon URL, host swapped, works as it is: SCRAM-SHA-256-PLUS bound to the local cert."""
    async with serving(workdir, branch_urls, '[local]\ntls_auth = "password"') as d:
        url = neon_style_url(d, TEST_PASSWORD)
        code, out, err = await psql(url, libpq_env(workdir))
        assert (code, out) == (0, "main"), err
        assert await psycopg_branch(url) == ("main", True)
        # The same password without channel binding is fine too; a wrong one is refused.
        assert await psycopg_branch(conninfo(d, sslmode="require", password=TEST_PASSWORD)) == (
            "main",
            True,
        )
        code, _out, err = await psql(neon_style_url(d, "not-the-password"), libpq_env(workdir))
        assert code != 0
        assert 'password authentication failed for user "neondb_owner"' in err
        # Plaintext clients are still trusted: tls_auth only concerns TLS clients.
        await still_serves(d)


async def test_channel_binding_require_with_a_local_password(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """With [local] password set, that password (not the role's) is what clients present."""
    extra = f"[local]\npassword = {toml_string(LOCAL_PASSWORD)}"
    async with serving(workdir, branch_urls, extra) as d:
        url = neon_style_url(d, LOCAL_PASSWORD.replace(" ", "%20"))
        code, out, err = await psql(url, libpq_env(workdir))
        assert (code, out) == (0, "main"), err
        assert await psycopg_branch(url) == ("main", True)
        code, _out, err = await psql(neon_style_url(d, TEST_PASSWORD), libpq_env(workdir))
        assert code != 0
        assert "password authentication failed" in err


async def test_channel_binding_require_without_a_password_to_check_is_refused_by_libpq(
    daemon: LocalDaemon, workdir: Path
) -> None:
    """Under the default tls_auth = "trust" nothing is bound, and libpq says so itself.

    This is the documented trade-off: set tls_auth = "password" (or a local password) for
    URLs that carry channel_binding=require.
    """
    code, _out, err = await psql(neon_style_url(daemon, TEST_PASSWORD), libpq_env(workdir))
    assert code != 0
    assert "channel binding" in err
    await still_serves(daemon)


async def relayed_scram_claiming_binding(daemon: LocalDaemon) -> rawpg.PgError:
    """Over local TLS, start SCRAM with gs2 flag 'y' as libpq does when PLUS is not offered."""
    async with rawpg.raw_client("127.0.0.1", daemon.port) as client:
        await client.send(rawpg.ssl_request())
        assert await client.read_byte() == b"S"
        await client.start_tls()
        await client.send(rawpg.startup({"user": "neondb_owner", "database": "neondb"}))
        (request,) = await client.read_until(b"R")
        assert request.payload[:4] == (10).to_bytes(4, "big")  # AuthenticationSASL
        assert b"SCRAM-SHA-256-PLUS" not in request.payload
        first = b"y,,n=,r=" + os.urandom(18).hex().encode()
        await client.send(
            rawpg.typed(b"p", b"SCRAM-SHA-256\0" + len(first).to_bytes(4, "big") + first)
        )
        return await client.read_error()


# --- refusals that leave the daemon serving -----------------------------------------------


async def test_wrong_local_password_over_tls_is_28P01(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    extra = f"[local]\npassword = {toml_string(LOCAL_PASSWORD)}"
    async with serving(workdir, branch_urls, extra) as d:
        context = ssl.create_default_context(cafile=local_ca(d))
        with pytest.raises(asyncpg.InvalidPasswordError) as caught:
            await asyncpg.connect(
                f"postgresql://neondb_owner@localhost:{d.port}/neondb",
                password="not-it",
                ssl=context,
            )
        assert caught.value.sqlstate == "28P01"
        assert 'password authentication failed for user "neondb_owner"' in str(caught.value)
        conn = await asyncpg.connect(
            f"postgresql://neondb_owner@localhost:{d.port}/neondb",
            password=LOCAL_PASSWORD,
            ssl=context,
        )
        try:
            assert await conn.fetchval(SELECT_BRANCH) == "main"
        finally:
            await conn.close()


async def test_claiming_channel_binding_over_plaintext_is_refused_by_the_client(
    daemon: LocalDaemon, workdir: Path
) -> None:
    """libpq refuses sslmode=disable with channel_binding=require before sending anything."""
    code, _out, err = await psql(
        conninfo(daemon, sslmode="disable", channel_binding="require", password=TEST_PASSWORD),
        libpq_env(workdir),
    )
    assert code != 0
    assert "channel binding" in err
    await still_serves(daemon)


async def test_garbage_instead_of_a_tls_handshake_is_logged_and_the_daemon_serves_on(
    daemon: LocalDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    async with rawpg.raw_client("127.0.0.1", daemon.port) as client:
        await client.send(rawpg.ssl_request())
        assert await client.read_byte() == b"S"
        await client.send(os.urandom(512))
        # The daemon hangs up: read_to_end returns instead of timing out.
        await client.read_to_end()
    out = capsys.readouterr().out
    closed = [line for line in out.splitlines() if "local TLS handshake failed" in line]
    assert closed, out
    await still_serves(daemon)


async def test_require_tls_refuses_a_plaintext_client_and_says_how_to_fix_it(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    async with serving(workdir, branch_urls, "[local]\nrequire_tls = true") as d:
        with pytest.raises(asyncpg.PostgresError) as caught:
            await asyncpg.connect(d.url(sslmode="disable"))
        assert caught.value.sqlstate == "28000"
        assert "requires TLS" in str(caught.value)
        assert "sslmode=require" in str(caught.value)
        code, _out, err = await psql(conninfo(d, sslmode="disable"), libpq_env(workdir))
        assert code != 0
        assert "requires TLS" in err
        assert await psycopg_branch(conninfo(d, sslmode="require")) == ("main", True)


async def test_relay_mode_branch_refuses_a_tls_client_clearly_and_prefer_falls_back(
    workdir: Path, compute_main: LocalCompute, ca_file: Path
) -> None:
    """Without a password in the branch URL, the client's own SCRAM cannot cross local TLS."""
    url = compute_main.url(ca_file=ca_file, password=False)
    async with serving(workdir, {"main": url}) as d:
        env = libpq_env(workdir, PGPASSWORD=TEST_PASSWORD)
        code, _out, err = await psql(conninfo(d, sslmode="require"), env)
        assert code != 0
        assert "holds no password" in err
        assert "sslmode=disable" in err
        error = await relayed_scram_claiming_binding(d)
        assert (error.sqlstate, error.severity) == ("28000", "FATAL")
        assert "holds no password" in error.message
        # libpq's sslmode=prefer retries in plaintext after the error, and gets in.
        code, out, err = await psql(conninfo(d, sslmode="prefer"), env)
        assert (code, out) == (0, "main"), err


# --- PostgreSQL 17 direct TLS -------------------------------------------------------------

needs_libpq_17 = pytest.mark.skipif(
    LIBPQ_VERSION < 170000,
    reason=f"sslnegotiation=direct needs libpq 17 or newer; psycopg has libpq {LIBPQ_VERSION}",
)


@needs_libpq_17
async def test_direct_tls_without_ssl_request_reaches_the_branch(
    daemon: LocalDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """libpq 17's sslnegotiation=direct opens with a ClientHello (ALPN postgresql)."""
    ca = str(local_ca(daemon))
    for sslmode in ("require", "verify-full"):
        dsn = conninfo(
            daemon, host="localhost", sslmode=sslmode, sslnegotiation="direct", sslrootcert=ca
        )
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(SELECT_BRANCH)
            assert await cur.fetchone() == ("main",)
            assert conn.pgconn.ssl_in_use
    assert "local_tls_failed" not in capsys.readouterr().out


async def test_a_client_opening_with_tls_and_alpn_postgresql_gets_a_session(
    daemon: LocalDaemon,
) -> None:
    """Direct TLS at the byte level: a ClientHello first, no SSLRequest, then the startup."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", daemon.port, ssl=raw_tls_context(["postgresql"])
    )
    client = rawpg.RawClient(reader, writer)
    try:
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "postgresql"
        await client.send(rawpg.startup({"user": "neondb_owner", "database": "neondb"}))
        login = await client.read_until(b"Z")
        await client.send(rawpg.query(SELECT_BRANCH))
        rows = [m for m in await client.read_until(b"Z") if m.kind == b"D"]
        await client.send(rawpg.terminate())
    finally:
        await client.close()
    assert login[0].kind == b"R"
    assert len(rows) == 1
    assert rows[0].payload.endswith(b"main")


async def test_direct_tls_is_not_offered_when_local_tls_is_off(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """With [local] tls = false a ClientHello is just a malformed startup packet: as
    PostgreSQL without TLS, the daemon closes without a reply."""
    async with serving(workdir, branch_urls, "[local]\ntls = false") as d:
        hello = bytes.fromhex("16030100c4010000c00303") + b"\0" * 64
        async with rawpg.raw_client("127.0.0.1", d.port) as client:
            await client.send(hello)
            assert await client.read_to_end() == b""


@needs_libpq_17
async def test_direct_tls_with_channel_binding_require(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    async with serving(workdir, branch_urls, '[local]\ntls_auth = "password"') as d:
        url = neon_style_url(d, TEST_PASSWORD) + "&sslnegotiation=direct"
        assert await psycopg_branch(url) == ("main", True)


def raw_tls_context(alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


@pytest.mark.parametrize("alpn", [["http/1.1"], None], ids=["wrong ALPN", "no ALPN"])
async def test_direct_tls_without_alpn_postgresql_is_refused_like_postgresql(
    daemon: LocalDaemon, capsys: pytest.CaptureFixture[str], alpn: list[str] | None
) -> None:
    """The handshake completes, then the daemon hangs up without a word, as PostgreSQL 17."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", daemon.port, ssl=raw_tls_context(alpn)
    )
    try:
        writer.write(rawpg.startup({"user": "neondb_owner", "database": "neondb"}))
        async with asyncio.timeout(rawpg.READ_TIMEOUT_S):
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                assert await reader.read() == b""
    finally:
        writer.close()
    out = capsys.readouterr().out
    assert 'direct TLS without ALPN "postgresql"' in out
    await still_serves(daemon)


async def test_an_ssl_request_over_direct_tls_is_declined_once_like_postgresql_17(
    daemon: LocalDaemon,
) -> None:
    """PostgreSQL 17 answers 'N' to an SSLRequest over direct TLS (it is encrypted already);
    asked again, it refuses the code as protocol version 1234.5679."""
    client = rawpg.RawClient(
        *await asyncio.open_connection(
            "127.0.0.1", daemon.port, ssl=raw_tls_context(["postgresql"])
        )
    )
    try:
        await client.send(rawpg.ssl_request())
        assert await client.read_byte() == b"N"
        await client.send(rawpg.ssl_request())
        error = await client.read_error()
    finally:
        await client.close()
    assert (error.sqlstate, error.message) == (
        "0A000",
        "unsupported frontend protocol 1234.5679: server supports 3.0 to 3.0",
    )
    await still_serves(daemon)


async def test_direct_tls_handshake_garbage_is_logged_and_the_daemon_serves_on(
    daemon: LocalDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    async with rawpg.raw_client("127.0.0.1", daemon.port) as client:
        await client.send(b"\x16\x03\x01\x00\x40" + os.urandom(64))
        client.writer.write_eof()
        reply = await client.read_to_end()
    assert reply[:1] in (b"", b"\x15")  # nothing, or a TLS alert record
    assert "direct TLS handshake failed" in capsys.readouterr().out
    await still_serves(daemon)


def test_the_daemon_process_serves_every_negotiation_on_its_own_event_loop(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """`neonlocal up` runs on uvloop when installed, which reads sockets on its own terms."""
    config = write_config(workdir / "config.toml", branch_urls, branch="main")
    proc = start_daemon_process(config, daemon_env(workdir), log_level="info")
    try:
        listen = proc.wait_ready()["listen"]
        port = int(listen[0].rpartition(":")[2])
        ca = config.parent / "tls" / "ca.crt"
        modes = [{"sslmode": "disable"}, {"sslmode": "verify-full", "sslrootcert": str(ca)}]
        if LIBPQ_VERSION >= 170000:
            modes.append({**modes[1], "sslnegotiation": "direct"})
        for params in modes:
            dsn = " ".join(
                f"{k}={v}"
                for k, v in {"host": "localhost", "port": port, "user": "neondb_owner",
                             "dbname": "neondb", **params}.items()
            )  # fmt: skip
            with psycopg.connect(dsn) as conn:
                assert conn.execute(SELECT_BRANCH).fetchone() == ("main",), params
                assert conn.pgconn.ssl_in_use is (params["sslmode"] != "disable")
        with (
            socket.create_connection(("127.0.0.1", port), timeout=rawpg.READ_TIMEOUT_S) as raw,
            raw_tls_context(["http/1.1"]).wrap_socket(raw) as tls,
        ):
            tls.sendall(rawpg.startup({"user": "neondb_owner", "database": "neondb"}))
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                assert tls.recv(1024) == b""
    finally:
        proc.stop()
    assert "direct TLS without ALPN" in proc.log()


def test_a_first_start_from_the_config_directory_with_a_relative_path_serves_tls(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """`cd ~/proj && neonlocal --config neonlocal.toml up`: the certificate lands beside it."""
    write_config(workdir / "neonlocal.toml", branch_urls, branch="main")
    log_path = workdir / "daemon.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            neonlocal_cmd("--config", "neonlocal.toml", "up", "--log-level", "info"),
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=daemon_env(workdir),
            text=True,
        )
    daemon = DaemonProcess(proc, workdir / "neonlocal.toml", daemon_env(workdir), log_path)
    try:
        port = int(daemon.wait_ready()["listen"][0].rpartition(":")[2])
        ca = workdir / "tls" / "ca.crt"
        dsn = (
            f"host=localhost port={port} user=neondb_owner dbname=neondb "
            f"sslmode=verify-full sslrootcert={ca}"
        )
        with psycopg.connect(dsn) as conn:
            assert conn.execute(SELECT_BRANCH).fetchone() == ("main",)
        switched = subprocess.run(
            neonlocal_cmd("--config", "neonlocal.toml", "use", "dev"),
            cwd=workdir,
            env=daemon_env(workdir),
            capture_output=True,
            text=True,
            check=False,
        )
        assert switched.returncode == 0, switched.stderr
        assert "-> dev" in switched.stdout
    finally:
        assert daemon.stop() == 0, daemon.log()
