"""When a branch cannot be used, the client reads why (branch, host, cause) and the daemon lives on.

Every failure arrives as a PostgreSQL ErrorResponse with the SQLSTATE a driver or pool acts
on; asyncpg exposes it as ``exc.sqlstate`` even for connection failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import psycopg
import pytest

from fixtures import rawpg
from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, write_config
from fixtures.net import free_port
from fixtures.pg import TEST_PASSWORD
from neonlocal.localpg import LocalCompute
from neonlocal.tls.certs import CertificateAuthority

pytestmark = pytest.mark.pg

StartDaemon = Callable[..., contextlib.AbstractAsyncContextManager[LocalDaemon]]


def neon_url(
    host: str,
    port: int,
    *,
    password: str = TEST_PASSWORD,
    hostaddr: str | None = None,
    sslrootcert: Path | None = None,
) -> str:
    query = [f"hostaddr={hostaddr}"] if hostaddr else []
    if sslrootcert is not None:
        query.append(f"sslrootcert={sslrootcert}")
    url = f"postgresql://neondb_owner:{quote(password, safe='')}@{host}:{port}/neondb"
    return url + ("?" + "&".join(query) if query else "")


@pytest.fixture
def start(workdir: Path, branch_urls: dict[str, str]) -> StartDaemon:
    """start({name: url or table}, branch=..., extra=...): a daemon that also knows "main"."""

    def start(
        branches: dict[str, str | dict[str, str]], *, branch: str | None, extra: str = ""
    ) -> contextlib.AbstractAsyncContextManager[LocalDaemon]:
        path = write_config(
            workdir / "config.toml",
            {"main": branch_urls["main"], **branches},
            branch=branch,
            extra=extra,
        )
        return running_daemon(path, daemon_env(workdir))

    return start


async def connect_error(daemon: LocalDaemon) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await asyncpg.connect(daemon.url(sslmode="disable"))
    return caught.value


async def serves_main_next(daemon: LocalDaemon) -> None:
    """The daemon is unharmed: switched to "main", the very next session works."""
    await daemon.use("main")
    conn = await asyncpg.connect(daemon.url(sslmode="disable"))
    try:
        assert await conn.fetchval("SELECT name FROM branch_info") == "main"
    finally:
        await conn.close()


def cannot_reach(branch: str, host: str) -> str:
    return f'neonlocal: cannot reach branch "{branch}" ({host}): '


# --- cannot reach the upstream ----------------------------------------------------------------


async def test_refused_connection_names_branch_host_and_cause(start: StartDaemon) -> None:
    port = free_port()
    async with start({"gone": neon_url("127.0.0.1", port)}, branch="gone") as d:
        error = await connect_error(d)
        assert error.sqlstate == "08001"
        assert str(error) == cannot_reach("gone", f"127.0.0.1:{port}") + "connection refused"
        await serves_main_next(d)


async def test_psycopg_shows_the_same_message(start: StartDaemon) -> None:
    """libpq clients print the daemon's sentence, not a bare "server closed the connection"."""
    port = free_port()
    async with start({"gone": neon_url("127.0.0.1", port)}, branch="gone") as d:
        with pytest.raises(psycopg.OperationalError) as caught:
            await psycopg.AsyncConnection.connect(d.url())
        assert cannot_reach("gone", f"127.0.0.1:{port}") + "connection refused" in str(caught.value)


async def test_unresolvable_host_is_a_dns_error(start: StartDaemon) -> None:
    problem = rawpg.dns_failure_problem()
    if problem is not None:
        pytest.skip(problem)
    url = neon_url(rawpg.UNRESOLVABLE_HOST, 5432)  # no hostaddr: the daemon must resolve it
    async with start({"typo": url}, branch="typo") as d:
        error = await connect_error(d)
        assert error.sqlstate == "08001"
        assert str(error).startswith(cannot_reach("typo", f"{rawpg.UNRESOLVABLE_HOST}:5432"))
        assert f"cannot resolve host {rawpg.UNRESOLVABLE_HOST}" in str(error)
        await serves_main_next(d)


async def test_silent_upstream_times_out_after_connect_timeout(start: StartDaemon) -> None:
    async with rawpg.fake_upstream(rawpg.never_answers) as port:
        url = neon_url("ep-cold-1.us-east-2.aws.neon.tech", port, hostaddr="127.0.0.1")
        extra = "[upstream]\nconnect_timeout = 0.5"
        async with start({"cold": url}, branch="cold", extra=extra) as d:
            error = await connect_error(d)
            assert error.sqlstate == "08001"
            assert str(error).startswith(
                cannot_reach("cold", f"ep-cold-1.us-east-2.aws.neon.tech:{port}")
            )
            assert "timed out after 0.5 s" in str(error)
            await serves_main_next(d)


async def test_a_retry_right_after_a_timeout_is_answered_at_once(start: StartDaemon) -> None:
    """psql's default sslmode=prefer tries again without TLS after an error: the second try
    gets the same error at once instead of waiting out the timeout again."""
    async with rawpg.fake_upstream(rawpg.never_answers) as port:
        url = neon_url("ep-cold-2.us-east-2.aws.neon.tech", port, hostaddr="127.0.0.1")
        extra = "[upstream]\nconnect_timeout = 2.5"
        async with start({"cold": url}, branch="cold", extra=extra) as d:
            began = time.monotonic()
            psql = await asyncio.create_subprocess_exec(
                "psql", "-X", "-c", "SELECT 1", d.url(sslmode="prefer"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            _out, err = await psql.communicate()
            took = time.monotonic() - began
            assert psql.returncode == 2
            assert err.decode().count("timed out after 2.5 s") == 2
            assert took < 4.5
            await serves_main_next(d)


async def test_upstream_without_tls_is_refused_not_used_in_plaintext(start: StartDaemon) -> None:
    async with rawpg.fake_upstream(rawpg.refuses_tls) as port:
        url = neon_url("ep-plain-1.us-east-2.aws.neon.tech", port, hostaddr="127.0.0.1")
        async with start({"plain": url}, branch="plain") as d:
            error = await connect_error(d)
            assert error.sqlstate == "08001"
            assert str(error).startswith(
                cannot_reach("plain", f"ep-plain-1.us-east-2.aws.neon.tech:{port}")
            )
            assert "does not support TLS" in str(error)
            await serves_main_next(d)


async def test_upstream_hanging_up_during_login_is_a_connection_failure(
    start: StartDaemon, tls_server_context: ssl.SSLContext, ca_file: Path
) -> None:
    handler = rawpg.hangs_up_after_tls(tls_server_context)
    async with rawpg.fake_upstream(handler) as port:
        host = "ep-crash-1.us-east-2.aws.neon.tech"
        url = neon_url(host, port, hostaddr="127.0.0.1", sslrootcert=ca_file)
        async with start({"crash": url}, branch="crash") as d:
            error = await connect_error(d)
            assert error.sqlstate == "08006"
            assert f'branch "crash" ({host}:{port}) closed the connection' in str(error)
            assert d.status()["last_error"] == (
                f'branch "crash" ({host}:{port}) closed the connection during login'
            )
            await serves_main_next(d)


# --- TLS verification -------------------------------------------------------------------------


async def test_certificate_not_covering_the_host_fails_verification(
    start: StartDaemon, compute_main: LocalCompute, ca_file: Path
) -> None:
    """The region wildcard does not cover another region's host name: hostname mismatch."""
    host = "ep-main-100001.ap-southeast-1.aws.neon.tech"
    url = neon_url(
        host, compute_main.spec.port, hostaddr=compute_main.spec.listen_addr, sslrootcert=ca_file
    )
    async with start({"elsewhere": url}, branch="elsewhere") as d:
        error = await connect_error(d)
        assert error.sqlstate == "08001"
        assert str(error).startswith(
            cannot_reach("elsewhere", f"{host}:{compute_main.spec.port}")
            + "certificate verify failed"
        )
        assert "hostname mismatch" in str(error).lower()
        await serves_main_next(d)


async def test_certificate_from_an_unknown_ca_fails_verification(
    start: StartDaemon, compute_main: LocalCompute, workdir: Path
) -> None:
    other_ca = workdir / "other-ca.crt"
    other_ca.write_bytes(CertificateAuthority.create("some other CA").cert_pem)
    async with start({"mitm": compute_main.url(ca_file=other_ca)}, branch="mitm") as d:
        error = await connect_error(d)
        assert error.sqlstate == "08001"
        assert str(error).startswith(
            cannot_reach("mitm", f"{compute_main.spec.hostname}:{compute_main.spec.port}")
            + "certificate verify failed"
        )
        assert "issuer" in str(error)
        await serves_main_next(d)


# --- the upstream refuses the login -----------------------------------------------------------


async def test_wrong_password_in_branch_url_is_28P01_naming_the_branch(
    start: StartDaemon, compute_main: LocalCompute, ca_file: Path
) -> None:
    url = compute_main.url(ca_file=ca_file).replace(f":{TEST_PASSWORD}@", ":Wr0ng-passw0rd@")
    async with start({"stale": url}, branch="stale") as d:
        error = await connect_error(d)
        assert isinstance(error, asyncpg.InvalidPasswordError)
        assert str(error).splitlines()[0] == (
            f'neonlocal: branch "stale" ({compute_main.spec.hostname}:{compute_main.spec.port}): '
            'password authentication failed for user "neondb_owner"'
        )
        assert error.hint == (
            f'the password in branch "stale"\'s URL in {d.config_path}:'
            f"{line_of_url(d.config_path, 'stale')} was refused: paste the branch's current "
            "connection string there"
        )
        assert "Wr0ng" not in error.hint
        last_error = d.status()["last_error"]
        assert 'branch "stale"' in last_error
        assert "password authentication failed" in last_error
        await serves_main_next(d)


def line_of_url(config: Path, branch: str) -> int:
    lines = config.read_text().splitlines()
    table = lines.index(f'[branches."{branch}"]')
    return next(n for n, line in enumerate(lines[table:], table + 1) if line.startswith("url ="))


async def test_missing_database_is_3D000(start: StartDaemon, branch_urls: dict[str, str]) -> None:
    async with start(
        {"nodb": {"url": branch_urls["main"], "database": "nope"}}, branch="nodb"
    ) as d:
        error = await connect_error(d)
        assert isinstance(error, asyncpg.InvalidCatalogNameError)
        assert str(error).startswith('neonlocal: branch "nodb" (')
        assert str(error).endswith('database "nope" does not exist')
        await serves_main_next(d)


async def test_no_branch_selected_says_to_run_neonlocal_use(start: StartDaemon) -> None:
    async with start({}, branch=None) as d:
        error = await connect_error(d)
        assert error.sqlstate == "08001"
        assert "neonlocal use" in f"{error} {error.hint or ''}"
        await serves_main_next(d)


async def test_status_reports_the_last_upstream_failure(start: StartDaemon) -> None:
    port = free_port()
    async with start({"gone": neon_url("127.0.0.1", port)}, branch="gone") as d:
        assert d.status()["last_error"] is None
        await connect_error(d)
        assert d.status()["last_error"] == (
            f'cannot reach branch "gone" (127.0.0.1:{port}): connection refused'
        )


# --- [upstream] keepalive and [listen] max_sessions --------------------------------------------


def upstream_sockets(daemon: LocalDaemon) -> Iterator[socket.socket]:
    assert daemon.daemon.server is not None
    for session in daemon.daemon.server.sessions:
        assert session.upstream is not None
        assert session.upstream.endpoint.transport is not None
        yield session.upstream.endpoint.transport.get_extra_info("socket")


@pytest.mark.parametrize(("extra", "expected"), [("", 1), ("[upstream]\nkeepalive = false", 0)])
async def test_upstream_keepalive_follows_the_setting(
    start: StartDaemon, extra: str, expected: int
) -> None:
    """TCP keepalive notices a vanished compute (suspend, NAT) unless turned off."""
    async with (
        start({}, branch="main", extra=extra) as d,
        await psycopg.AsyncConnection.connect(d.url()),
    ):
        (sock,) = upstream_sockets(d)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == expected


async def wait_for_sessions(daemon: LocalDaemon, count: int) -> None:
    """The daemon notices a client's close a moment after the client returns."""
    async with asyncio.timeout(5):
        # status offers no change notification, so look again every few milliseconds.
        while sum(daemon.status()["sessions"].values()) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_max_sessions_refuses_the_extra_client_with_53300(start: StartDaemon) -> None:
    async with (
        start({}, branch="main", extra="max_sessions = 2") as d,
        await psycopg.AsyncConnection.connect(d.url()) as first,
        await psycopg.AsyncConnection.connect(d.url()),
    ):
        error = await connect_error(d)
        assert isinstance(error, asyncpg.TooManyConnectionsError)
        assert "max_sessions" in str(error)
        await first.close()
        await wait_for_sessions(d, 1)
        conn = await asyncpg.connect(d.url(sslmode="disable"))
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
