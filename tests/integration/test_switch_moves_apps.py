"""`neonlocal use` moves a running app's pooled connections to the new branch, losing no work.

The default ([switch] sessions = "drain"): a session left on the old branch ends with 57P01
as soon as it is idle outside a transaction; one inside a transaction finishes it first.
Pools that check a connection before use (SQLAlchemy's pre-ping, psycopg_pool's check,
asyncpg's pool) reconnect by themselves, and so land on the new branch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import psycopg_pool
import pytest
import sqlalchemy

from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, write_config

pytestmark = pytest.mark.pg

SELECT_BRANCH = "SELECT name FROM branch_info"


@pytest.fixture
async def daemon(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    config = write_config(workdir / "config.toml", branch_urls, branch="main")
    async with running_daemon(config, daemon_env(workdir)) as running:
        yield running


def _sqlalchemy_url(daemon: LocalDaemon) -> str:
    return f"postgresql+psycopg://neondb_owner@127.0.0.1:{daemon.port}/neondb"


async def test_a_pre_pinging_sqlalchemy_pool_follows_the_switch(daemon: LocalDaemon) -> None:
    """The FastAPI + SQLAlchemy app of the README: its next request runs on the new branch."""
    engine = sqlalchemy.create_engine(_sqlalchemy_url(daemon), pool_pre_ping=True, pool_size=2)

    def branch_now() -> str:
        with engine.connect() as conn:
            return str(conn.execute(sqlalchemy.text(SELECT_BRANCH)).scalar_one())

    try:
        assert await asyncio.to_thread(branch_now) == "main"
        reply = await daemon.use("dev")
        assert reply["switch"]["moved"] == {"main": 1}
        assert await asyncio.to_thread(branch_now) == "dev"
        assert daemon.status()["sessions"] == {"dev": 1}
    finally:
        await asyncio.to_thread(engine.dispose)


async def test_without_pre_ping_one_request_fails_with_57P01_and_the_next_follows(
    daemon: LocalDaemon,
) -> None:
    """A pool that does not check its connections sees the 57P01 once, as after a server
    restart; SQLAlchemy then drops the pool and the next request is on the new branch."""
    engine = sqlalchemy.create_engine(_sqlalchemy_url(daemon), pool_size=1)

    def branch_now() -> str:
        with engine.connect() as conn:
            return str(conn.execute(sqlalchemy.text(SELECT_BRANCH)).scalar_one())

    try:
        assert await asyncio.to_thread(branch_now) == "main"
        await daemon.use("dev")
        with pytest.raises(sqlalchemy.exc.OperationalError) as failed:
            await asyncio.to_thread(branch_now)
        assert failed.value.connection_invalidated
        assert await asyncio.to_thread(branch_now) == "dev"
    finally:
        await asyncio.to_thread(engine.dispose)


async def test_psycopg_pool_and_asyncpg_pool_follow_the_switch(daemon: LocalDaemon) -> None:
    async with psycopg_pool.AsyncConnectionPool(
        daemon.dsn(),
        min_size=1,
        max_size=1,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
        open=False,
    ) as ppool:
        apool = await asyncpg.create_pool(daemon.url(), min_size=1, max_size=1)
        try:
            async with ppool.connection() as conn:
                assert await (await conn.execute(SELECT_BRANCH)).fetchone() == ("main",)
            assert await apool.fetchval(SELECT_BRANCH) == "main"

            reply = await daemon.use("dev")

            assert reply["switch"]["moved"] == {"main": 2}
            async with ppool.connection() as conn:
                assert await (await conn.execute(SELECT_BRANCH)).fetchone() == ("dev",)
            assert await _asyncpg_pool_branch(apool) == "dev"
        finally:
            await apool.close()


async def _asyncpg_pool_branch(pool: asyncpg.Pool) -> str:
    # asyncpg's pool replaces a connection it finds closed; the one in hand when the server
    # ended it raises once, like after a restart.
    for _ in range(2):
        try:
            return str(await pool.fetchval(SELECT_BRANCH))
        except (asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.AdminShutdownError):
            continue
    raise AssertionError("the pool did not reconnect")


async def test_a_transaction_in_progress_finishes_on_the_old_branch(daemon: LocalDaemon) -> None:
    """Nothing is cut off: the open transaction commits on main, then the session ends."""
    async with await psycopg.AsyncConnection.connect(daemon.dsn()) as conn:
        await conn.execute("CREATE TEMP TABLE work (n int)")
        await conn.commit()
        await conn.execute("INSERT INTO work VALUES (1)")  # a transaction is now open

        await daemon.use("dev")

        await conn.execute("INSERT INTO work VALUES (2)")
        query = "SELECT count(*), (SELECT name FROM branch_info) FROM work"
        row = await (await conn.execute(query)).fetchone()
        assert row == (2, "main")
        await conn.commit()
        with pytest.raises(psycopg.OperationalError) as ended:
            await conn.execute("SELECT 1")
        assert ended.value.sqlstate == "57P01"
        assert 'switched to branch "dev"' in str(ended.value)


async def test_keep_leaves_sessions_where_they_are(daemon: LocalDaemon) -> None:
    async with await psycopg.AsyncConnection.connect(daemon.dsn(), autocommit=True) as conn:
        reply = await daemon.use("dev", sessions="keep")
        assert reply["switch"] == {"branch": "dev", "sessions": "keep", "moved": {"main": 1}}
        await asyncio.sleep(0.2)
        assert await (await conn.execute(SELECT_BRANCH)).fetchone() == ("main",)


async def test_a_config_can_keep_sessions_by_default(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    config = write_config(
        workdir / "config.toml", branch_urls, branch="main", extra='[switch]\nsessions = "keep"'
    )
    async with (
        running_daemon(config, daemon_env(workdir)) as daemon,
        await psycopg.AsyncConnection.connect(daemon.dsn(), autocommit=True) as conn,
    ):
        await daemon.use("dev")
        assert await (await conn.execute(SELECT_BRANCH)).fetchone() == ("main",)


@pytest.mark.parametrize("mode", ["drain", "terminate"])
async def test_a_listening_session_that_got_a_notify_is_still_idle(
    daemon: LocalDaemon, mode: str
) -> None:
    """A NOTIFY arriving while no query runs must not make the session look busy: it gets its
    57P01 at once, like any idle session, not a bare close seconds later."""
    listener = await asyncpg.connect(daemon.url())
    sender = await asyncpg.connect(daemon.url())
    got: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener("jobs", lambda *args: got.put_nowait(args[3]))
        await sender.execute("NOTIFY jobs, 'one'")
        assert await asyncio.wait_for(got.get(), 5) == "one"
        ended = asyncio.get_running_loop().create_future()
        listener.add_termination_listener(lambda _conn: ended.set_result(None))

        await daemon.use("dev", sessions=mode)

        await asyncio.wait_for(ended, 1.0)
    finally:
        await sender.close()
        await listener.close()
