"""Cancelling a query through the daemon stops that query, on its own branch, and nothing else."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import psycopg
import pytest

from fixtures.daemon import LocalDaemon

pytestmark = pytest.mark.pg


async def test_psycopg_cancel_stops_only_the_running_query(daemon: LocalDaemon) -> None:
    async with (
        await psycopg.AsyncConnection.connect(daemon.url(), autocommit=True) as victim,
        await psycopg.AsyncConnection.connect(daemon.url()) as bystander,
    ):
        other = asyncio.ensure_future(bystander.execute("SELECT pg_sleep(1.5)"))
        sleeping = asyncio.ensure_future(victim.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        began = time.monotonic()
        await victim.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await sleeping
        assert time.monotonic() - began < 10
        await other  # not cancelled
        cur = await victim.execute("SELECT name FROM branch_info")
        assert await cur.fetchone() == ("main",)


async def test_cancel_reaches_the_branch_the_session_is_pinned_to(daemon: LocalDaemon) -> None:
    """After a switch, cancelling a session still on main cancels it there."""
    on_main = await asyncpg.connect(daemon.url())
    try:
        await daemon.use("dev", sessions="keep")
        on_dev = await asyncpg.connect(daemon.url())
        try:
            dev_query = asyncio.ensure_future(on_dev.fetchval("SELECT pg_sleep(1.0)"))
            with pytest.raises(TimeoutError):
                # asyncpg sends a CancelRequest when the wait times out.
                await asyncio.wait_for(on_main.fetchval("SELECT pg_sleep(30)"), 0.5)
            assert await on_main.fetchval("SELECT name FROM branch_info") == "main"
            assert await dev_query is None  # pg_sleep returns void: the dev query finished
            assert await on_dev.fetchval("SELECT name FROM branch_info") == "dev"
        finally:
            await on_dev.close()
    finally:
        await on_main.close()


async def test_a_cancel_for_an_idle_session_is_dropped(
    daemon: LocalDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    async with await psycopg.AsyncConnection.connect(daemon.url()) as conn:
        await conn.cancel_safe()
        cur = await conn.execute("SELECT pg_sleep(0.3), name FROM branch_info")
        assert await cur.fetchone() == ("", "main")
    assert "cancel_dropped" in capsys.readouterr().out
