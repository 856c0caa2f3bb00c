"""The daemon also listens on a Unix-domain socket, where libpq looks when no host is given."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import psycopg
import pytest

from fixtures import rawpg
from fixtures.daemon import (
    LocalDaemon,
    daemon_env,
    neonlocal_cmd,
    running_daemon,
    toml_string,
    write_config,
)
from fixtures.net import free_port
from neonlocal.localpg import LocalCompute

pytestmark = pytest.mark.pg

SELECT_BRANCH = "SELECT name FROM branch_info"
LOCAL_PASSWORD = "l0cal-unix-Secret"


@contextlib.asynccontextmanager
async def serving(
    workdir: Path,
    branch_urls: Mapping[str, str],
    socket_dir: str,
    extra: str = "",
    *,
    port: int = 0,
) -> AsyncIterator[LocalDaemon]:
    config = write_config(
        workdir / "config.toml",
        branch_urls,
        branch="main",
        port=port,
        extra=extra,
        unix_socket_dir=socket_dir,
    )
    async with running_daemon(config, daemon_env(workdir)) as running:
        yield running


@pytest.fixture
def socket_dir(workdir: Path) -> Path:
    path = workdir / "sock"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
async def daemon(
    workdir: Path, branch_urls: dict[str, str], socket_dir: Path
) -> AsyncIterator[LocalDaemon]:
    async with serving(workdir, branch_urls, str(socket_dir)) as running:
        yield running


def socket_path(daemon: LocalDaemon) -> Path:
    assert daemon.daemon.server is not None
    path = daemon.daemon.server.unix_socket
    assert path is not None
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


async def psql(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "psql", "--no-psqlrc", "--no-password", "-qAt", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env or clean_env()),
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode()


async def test_psql_and_psycopg_reach_the_branch_through_the_socket_directory(
    daemon: LocalDaemon, socket_dir: Path
) -> None:
    port = str(daemon.port)
    assert socket_path(daemon) == socket_dir / f".s.PGSQL.{port}"
    code, out, err = await psql(
        "-h", str(socket_dir), "-p", port, "-U", "neondb_owner", "-d", "neondb",
        "-c", SELECT_BRANCH,
    )  # fmt: skip
    assert (code, out) == (0, "main"), err
    dsn = f"host={socket_dir} port={port} user=neondb_owner dbname=neondb"
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(SELECT_BRANCH)
        assert await cur.fetchone() == ("main",)
        assert not conn.pgconn.ssl_in_use  # libpq never uses TLS on a Unix socket


async def test_the_socket_file_is_for_its_owner_only_and_listed_in_status(
    daemon: LocalDaemon,
) -> None:
    path = socket_path(daemon)
    info = path.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert info.st_uid == os.geteuid()
    assert stat.S_IMODE(info.st_mode) & 0o077 == 0, oct(info.st_mode)
    assert str(path) in daemon.status()["listen"]


async def test_a_query_on_the_socket_can_be_cancelled(
    daemon: LocalDaemon, socket_dir: Path
) -> None:
    """libpq sends the CancelRequest to the same socket; the daemon forwards it upstream."""
    dsn = f"host={socket_dir} port={daemon.port} user=neondb_owner dbname=neondb"
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        running = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
        # A cancel that overtakes the query finds the session idle and is dropped: repeat it
        # until the query has been stopped.
        while not running.done():
            await conn.cancel_safe()
            await asyncio.wait([running], timeout=0.5)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await running


async def test_the_local_password_guards_the_socket_too(
    workdir: Path, branch_urls: dict[str, str], socket_dir: Path
) -> None:
    extra = f"[local]\npassword = {toml_string(LOCAL_PASSWORD)}"
    async with serving(workdir, branch_urls, str(socket_dir), extra) as d:
        args = ("-h", str(socket_dir), "-p", str(d.port), "-U", "neondb_owner", "-d", "neondb")
        code, out, err = await psql(
            *args, "-c", SELECT_BRANCH, env=clean_env(PGPASSWORD=LOCAL_PASSWORD)
        )
        assert (code, out) == (0, "main"), err
        code, _out, err = await psql(*args, "-c", SELECT_BRANCH, env=clean_env(PGPASSWORD="nope"))
        assert code != 0
        assert 'password authentication failed for user "neondb_owner"' in err


async def test_require_tls_still_admits_the_owner_only_socket(
    workdir: Path, branch_urls: dict[str, str], socket_dir: Path
) -> None:
    """libpq never speaks TLS on a Unix socket, and only its owner can open this one, so
    require_tls (like PostgreSQL's hostssl lines) concerns TCP clients alone."""
    async with serving(workdir, branch_urls, str(socket_dir), "[local]\nrequire_tls = true") as d:
        base = ("-p", str(d.port), "-U", "neondb_owner", "-d", "neondb", "-c", SELECT_BRANCH)
        code, out, err = await psql("-h", str(socket_dir), *base)
        assert (code, out) == (0, "main"), err
        code, _out, err = await psql("-h", "127.0.0.1", *base, env=clean_env(PGSSLMODE="disable"))
        assert code != 0
        assert "requires TLS" in err


async def libpq_default_socket_dir() -> Path:
    """Where this machine's psql looks when no host is given (its error message names it)."""
    free = str(free_port())
    code, _out, err = await psql("-p", free, "-d", "x", "-c", "SELECT 1")
    assert code != 0
    match = re.search(r'socket "(?P<dir>/[^"]*)/\.s\.PGSQL\.' + free, err)
    assert match is not None, err
    return Path(match["dir"])


async def test_psql_with_no_host_at_all_finds_the_daemon(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """unix_socket_dir = "auto" puts the socket where libpq looks: `psql -d neondb` just works."""
    default_dir = await libpq_default_socket_dir()
    async with serving(workdir, branch_urls, "auto") as d:
        assert d.daemon.server is not None
        chosen = d.daemon.server.unix_socket
        if chosen is None or chosen.parent != default_dir:
            pytest.skip(
                f"psql looks in {default_dir}, which this user cannot write to "
                f"(the daemon chose {chosen.parent if chosen else 'no directory'})"
            )
        code, out, err = await psql(
            "-p", str(d.port), "-U", "neondb_owner", "-d", "neondb", "-c", SELECT_BRANCH
        )
        assert (code, out) == (0, "main"), err
    assert not chosen.exists(), "the daemon removes its socket when it stops"


async def test_a_stale_socket_file_from_a_crashed_daemon_is_replaced(
    workdir: Path, branch_urls: dict[str, str], socket_dir: Path
) -> None:
    port = free_port()
    stale = socket_dir / f".s.PGSQL.{port}"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # bound, never listening, then closed: what a crash leaves
    async with serving(workdir, branch_urls, str(socket_dir), port=port) as d:
        assert socket_path(d) == stale
        code, out, err = await psql(
            "-h", str(socket_dir), "-p", str(port), "-U", "neondb_owner", "-d", "neondb",
            "-c", SELECT_BRANCH,
        )  # fmt: skip
        assert (code, out) == (0, "main"), err
    assert not stale.exists()


async def test_an_empty_socket_directory_turns_the_socket_off(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    async with serving(workdir, branch_urls, "") as d:
        assert d.daemon.server is not None
        assert d.daemon.server.unix_socket is None
        assert all(":" in address for address in d.status()["listen"])


async def test_psql_with_its_default_role_uses_the_branch_urls_role_on_the_socket(
    daemon: LocalDaemon, socket_dir: Path
) -> None:
    """`psql -d neondb` names the role after the OS user (root here); no branch has that role,
    and over the owner-only socket the kernel says it is only libpq's default."""
    code, out, err = await psql(
        "-h", str(socket_dir), "-p", str(daemon.port), "-d", "neondb",
        "-c", "SELECT current_user || ' on ' || name FROM branch_info",
    )  # fmt: skip
    assert (code, out) == (0, "neondb_owner on main"), err


async def test_url_socket_and_status_name_the_socket(daemon: LocalDaemon, socket_dir: Path) -> None:
    status = daemon.status()
    assert status["unix_socket"] == str(socket_dir / f".s.PGSQL.{daemon.port}")
    env = {**clean_env(), "XDG_RUNTIME_DIR": str(daemon.env["XDG_RUNTIME_DIR"])}
    proc = await asyncio.create_subprocess_exec(
        *neonlocal_cmd("--config", str(daemon.config_path), "url", "--socket"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    url = out.decode().strip()
    assert url == f"postgresql://neondb_owner@/neondb?host={socket_dir}&port={daemon.port}"
    code, answer, perr = await psql(url, "-c", SELECT_BRANCH)
    assert (code, answer) == (0, "main"), perr


async def test_a_role_of_the_clients_own_over_tcp_is_told_which_role_works(
    daemon: LocalDaemon,
) -> None:
    """Over TCP the OS user is unknown: a refused role of its own gets a hint naming the URL's."""
    dsn = (
        f"host=127.0.0.1 port={daemon.port} user=alice password=guess dbname=neondb sslmode=disable"
    )
    with pytest.raises(psycopg.OperationalError) as refused:
        await psycopg.AsyncConnection.connect(dsn)
    said = str(refused.value)
    assert 'password authentication failed for user "alice"' in said
    assert 'HINT:  neonlocal logs in for you as "neondb_owner"' in said
    assert "psql -U neondb_owner" in said


async def test_a_client_slow_to_start_up_on_the_socket_is_dropped_without_a_word(
    daemon: LocalDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's authentication_timeout holds on its Unix socket too (test_same_as_direct.py
    compares the TCP case with the server); the daemon's bound is read at accept."""
    monkeypatch.setattr("neonlocal.proxy.server.STARTUP_TIMEOUT_S", 0.5)
    loop = asyncio.get_running_loop()
    began = loop.time()
    client = rawpg.RawClient(*await asyncio.open_unix_connection(str(socket_path(daemon))))
    try:
        await client.send(rawpg.startup({"user": "neondb_owner"})[:10])
        assert await client.read_to_end() == b""
    finally:
        await client.close()
    assert loop.time() - began < 5


async def test_an_ssl_request_on_the_socket_is_declined_as_postgresql_declines_it(
    daemon: LocalDaemon, compute_main: LocalCompute
) -> None:
    """PostgreSQL offers no TLS on its Unix socket: 'N', whatever its ssl setting; so does
    the daemon, whose local TLS is on here. The login then goes on in plaintext."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        client = rawpg.RawClient(reader, writer)
        try:
            await client.send(rawpg.ssl_request())
            declined = await client.read_byte()
            await client.send(rawpg.startup({"user": "neondb_owner", "database": "neondb"}))
            return declined + await client.read_byte()
        finally:
            await client.close()

    server_socket = compute_main.socket_dir / f".s.PGSQL.{compute_main.spec.port}"
    direct = await answer(*await asyncio.open_unix_connection(str(server_socket)))
    assert direct == b"NR"
    assert await answer(*await asyncio.open_unix_connection(str(socket_path(daemon)))) == direct
