"""Opt-in session reuse: a closed client's upstream session serves the next client, reset."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, write_config
from neonlocal.localpg import LocalCompute

pytestmark = pytest.mark.pg

REUSE = "[upstream]\nreuse_sessions = true\nreuse_idle_timeout = {timeout}"


@pytest.fixture
async def reusing_daemon(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    config = write_config(
        workdir / "config.toml", branch_urls, branch="main", extra=REUSE.format(timeout=30)
    )
    async with running_daemon(config, daemon_env(workdir)) as running:
        yield running


async def parked(daemon: LocalDaemon, count: int) -> None:
    """Wait until ``count`` sessions sit in the pool (the reset runs in the background)."""
    server = daemon.daemon.server
    assert server is not None
    assert server.pool is not None
    for _ in range(200):
        if len(server.pool) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pool holds {len(server.pool)} sessions, expected {count}")


async def backend_pid(url: str, *statements: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement)
        cur = await conn.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_the_next_client_gets_the_same_server_session_reset(
    reusing_daemon: LocalDaemon,
) -> None:
    url = reusing_daemon.url(sslmode="disable")
    first = await backend_pid(url, "SET application_name = 'first'", "CREATE TEMP TABLE t (x int)")
    await parked(reusing_daemon, 1)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_backend_pid(), current_setting('application_name')")
        assert await cur.fetchone() == (first, "")
        cur = await conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 't'")
        assert await cur.fetchone() == (0,)  # DISCARD ALL dropped the temp table
        assert conn.info.parameter_status("neonlocal.branch") == "main"
        cur = await conn.execute("SELECT name FROM branch_info")
        assert await cur.fetchone() == ("main",)


async def test_asyncpg_close_returns_at_once_and_its_session_is_kept(
    reusing_daemon: LocalDaemon,
) -> None:
    """asyncpg waits for the server to close after its Terminate, as PostgreSQL does; the
    daemon keeps the server session but closes the client."""
    conn = await asyncpg.connect(reusing_daemon.url(sslmode="disable"))
    assert await conn.fetchval("SELECT name FROM branch_info") == "main"

    await asyncio.wait_for(conn.close(), 2)

    await parked(reusing_daemon, 1)


async def test_a_session_left_inside_a_transaction_is_not_reused(
    reusing_daemon: LocalDaemon,
) -> None:
    url = reusing_daemon.url(sslmode="disable")
    conn = await psycopg.AsyncConnection.connect(url)
    await conn.execute("SELECT 1")  # psycopg opened a transaction
    cur = await conn.execute("SELECT pg_backend_pid()")
    row = await cur.fetchone()
    assert row is not None
    await conn.close()
    await asyncio.sleep(0.2)
    assert reusing_daemon.daemon.server is not None
    assert reusing_daemon.daemon.server.pool is not None
    assert len(reusing_daemon.daemon.server.pool) == 0
    assert await backend_pid(url) != row[0]


async def test_a_session_the_server_ended_is_never_handed_out(
    reusing_daemon: LocalDaemon, compute_main: LocalCompute
) -> None:
    url = reusing_daemon.url(sslmode="disable")
    first = await backend_pid(url)
    await parked(reusing_daemon, 1)
    compute_main.psql(f"SELECT pg_terminate_backend({first})", dbname="postgres")
    await parked(reusing_daemon, 0)
    second = await backend_pid(url)
    assert second != first


async def test_switching_branches_drops_kept_sessions_and_never_crosses_branches(
    reusing_daemon: LocalDaemon,
) -> None:
    url = reusing_daemon.url(sslmode="disable")
    await backend_pid(url)
    await parked(reusing_daemon, 1)
    await reusing_daemon.use("dev")
    await parked(reusing_daemon, 0)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT name FROM branch_info")
        assert await cur.fetchone() == ("dev",)


async def test_kept_sessions_expire_after_the_idle_timeout(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    config = write_config(
        workdir / "config.toml", branch_urls, branch="main", extra=REUSE.format(timeout=0.3)
    )
    async with running_daemon(config, daemon_env(workdir)) as d:
        await backend_pid(d.url(sslmode="disable"))
        await parked(d, 1)
        await parked(d, 0)


async def test_without_the_option_nothing_is_kept(daemon: LocalDaemon) -> None:
    url = daemon.url(sslmode="disable")
    assert await backend_pid(url) != await backend_pid(url)
    assert daemon.daemon.server is not None
    assert daemon.daemon.server.pool is None
