"""`neonlocal use` moves new sessions to the new branch and leaves open ones where they are."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import pq

from fixtures import libpq
from fixtures.daemon import LocalDaemon, branch_of

pytestmark = pytest.mark.pg


async def test_switch_moves_new_sessions_and_keeps_open_ones(daemon: LocalDaemon) -> None:
    async with await psycopg.AsyncConnection.connect(daemon.url()) as old:
        assert await branch_of(old) == "main"
        reply = await daemon.use("dev")
        assert reply["ok"], reply
        assert reply["branch"] == "dev"
        async with await psycopg.AsyncConnection.connect(daemon.url()) as new:
            assert await branch_of(new) == "dev"
            assert new.info.parameter_status("neonlocal.branch") == "dev"
            # The session opened before the switch still talks to main, in a transaction too.
            await old.execute("BEGIN")
            assert await branch_of(old) == "main"
            await old.execute("COMMIT")
            assert daemon.status()["sessions"] == {"main": 1, "dev": 1}


async def test_switch_back_and_forth_always_lands_new_sessions_on_the_selection(
    daemon: LocalDaemon,
) -> None:
    for name in ["dev", "main", "dev", "main"]:
        assert (await daemon.use(name))["ok"]
        async with await psycopg.AsyncConnection.connect(daemon.url()) as conn:
            assert await branch_of(conn) == name


async def test_terminate_ends_old_sessions_with_57P01_naming_the_new_branch(
    daemon: LocalDaemon,
) -> None:
    async with await psycopg.AsyncConnection.connect(daemon.url()) as old:
        assert await branch_of(old) == "main"
        reply = await daemon.use("dev", terminate=True)
        assert reply["ok"]
        assert reply["terminated"] == 1
        with pytest.raises(psycopg.errors.AdminShutdown) as info:
            await old.execute("SELECT 1")
        assert info.value.sqlstate == "57P01"
        assert 'switched to branch "dev"' in str(info.value)
    fresh = await asyncpg.connect(daemon.url())
    try:
        assert await fresh.fetchval("SELECT name FROM branch_info") == "dev"
    finally:
        await fresh.close()


async def test_terminate_leaves_sessions_on_the_new_branch_alone(daemon: LocalDaemon) -> None:
    await daemon.use("dev")
    on_dev = await asyncpg.connect(daemon.url())
    try:
        reply = await daemon.use("dev", terminate=True)
        assert reply["terminated"] == 0
        assert await on_dev.fetchval("SELECT name FROM branch_info") == "dev"
    finally:
        await on_dev.close()


async def test_terminate_lets_a_query_in_flight_finish_then_ends_the_session(
    daemon: LocalDaemon,
) -> None:
    """Nothing is lost: the running query gets its answer, the next one gets 57P01."""
    async with await psycopg.AsyncConnection.connect(daemon.url()) as conn:
        query = asyncio.ensure_future(conn.execute("SELECT pg_sleep(0.5), 'done'"))
        await asyncio.sleep(0.1)
        await daemon.use("dev", terminate=True)
        cur = await query
        assert await cur.fetchone() == ("", "done")
        with pytest.raises(psycopg.errors.AdminShutdown):
            await conn.execute("SELECT 1")


def _copy_in_with_the_extended_protocol(conninfo: str) -> psycopg.Connection[Any]:
    """COPY FROM STDIN as libpq sends it through PQexecParams: a Sync behind the Execute,
    which PostgreSQL ignores while it reads the data, and one more after CopyDone."""
    conn = psycopg.connect(conninfo, autocommit=True)
    conn.execute("CREATE TEMP TABLE copied (n int)")
    pg = conn.pgconn
    pg.send_query_params(b"COPY copied FROM STDIN", None)
    libpq.flush(pg)
    assert libpq.next_result(pg).status == pq.ExecStatus.COPY_IN
    pg.put_copy_data(b"1\n2\n")
    pg.put_copy_end()
    libpq.flush(pg)
    assert libpq.next_result(pg).status == pq.ExecStatus.COMMAND_OK
    assert pg.get_result() is None
    assert conn.execute("SELECT count(*) FROM copied").fetchone() == (2,)
    return conn


async def test_terminate_ends_a_session_at_once_after_an_extended_protocol_copy(
    daemon: LocalDaemon,
) -> None:
    """The session is idle after the COPY although the server answered one Sync of two."""
    conn = await asyncio.to_thread(_copy_in_with_the_extended_protocol, daemon.url())
    try:
        reply = await daemon.use("dev", terminate=True)
        assert reply["terminated"] == 1
        with pytest.raises(psycopg.errors.AdminShutdown):
            await asyncio.to_thread(conn.execute, "SELECT 1")
    finally:
        await asyncio.to_thread(conn.close)
