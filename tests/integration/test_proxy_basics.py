"""A client on localhost reaches the selected branch over verified TLS."""

from __future__ import annotations

import psycopg
import pytest

from fixtures.daemon import LocalDaemon

pytestmark = pytest.mark.pg


async def branch_of(conn: psycopg.AsyncConnection[tuple[str]]) -> str:
    cur = await conn.execute("SELECT name FROM branch_info")
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def test_psycopg_reaches_the_selected_branch(daemon: LocalDaemon) -> None:
    async with await psycopg.AsyncConnection.connect(daemon.url()) as conn:
        assert await branch_of(conn) == "main"
        assert conn.info.parameter_status("neonlocal.branch") == "main"
