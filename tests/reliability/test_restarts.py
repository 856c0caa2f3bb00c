"""A compute restarted or suspended underneath the daemon: clear errors while down, service once
back, and never a connection the daemon makes on its own (the server logs every connection)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from fixtures.daemon import LocalDaemon, serving
from fixtures.daemon import branch_of_new_session as new_session_branch
from fixtures.pg import MakeCompute
from neonlocal.localpg import LocalCompute
from reliability.conftest import Figures
from reliability.measure import eventually

pytestmark = [pytest.mark.reliability, pytest.mark.pg]

CONNECT_TIMEOUT = 2.0
GRACE = 5.0
# How long the compute stays "suspended", and how long an idle daemon is watched for
# connections of its own.
SUSPEND_S = 2.0
IDLE_WATCH_S = 1.5
_TCP_CONNECTION = re.compile(r"connection received: host=(?!\[local\])")


def tcp_connections(compute: LocalCompute) -> int:
    """Connections the server accepted over TCP (the daemon's; our own psql uses the socket)."""
    return len(_TCP_CONNECTION.findall(compute.server_log()))


@pytest.fixture
async def restartable(make_compute: MakeCompute) -> LocalCompute:
    return await asyncio.to_thread(make_compute, "restartable", items=("kept",))


@pytest.fixture
async def daemon(
    workdir: Path,
    restartable: LocalCompute,
    compute_dev: LocalCompute,
    ca_file: Path,
    no_unhandled_errors: list[object],
) -> AsyncIterator[LocalDaemon]:
    branches = {"main": restartable.url(ca_file=ca_file), "dev": compute_dev.url(ca_file=ca_file)}
    extra = f"[upstream]\nconnect_timeout = {CONNECT_TIMEOUT}"
    async with serving(workdir, branches, extra) as running:
        yield running
        await eventually(lambda: not running.status()["sessions"], what="sessions to end")


async def branch_of_new_session(daemon: LocalDaemon) -> str:
    async with asyncio.timeout(CONNECT_TIMEOUT + GRACE):
        return await new_session_branch(daemon)


async def test_sessions_work_again_after_the_compute_restarts(
    daemon: LocalDaemon, restartable: LocalCompute, figures: Figures
) -> None:
    before = tcp_connections(restartable)
    open_session = await asyncpg.connect(daemon.url(sslmode="disable"))
    await asyncio.to_thread(restartable.restart)
    async with asyncio.timeout(GRACE):
        # The server ended it (57P01 on its way down); the client hears it, not a hang.
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await open_session.fetchval("SELECT 1")
    await open_session.close()
    assert await branch_of_new_session(daemon) == "restartable"
    # One upstream connection per client session, and no reconnect of its own after the
    # restart ended the first.
    assert tcp_connections(restartable) - before == 2
    figures.record(restarts=1, sessions=2, upstream_connections=2)


async def test_a_suspended_compute_refuses_with_08001_then_serves_once_started(
    daemon: LocalDaemon, restartable: LocalCompute, figures: Figures
) -> None:
    assert await branch_of_new_session(daemon) == "restartable"
    await asyncio.to_thread(restartable.stop)
    failures = 0
    async with asyncio.timeout(SUSPEND_S + GRACE):
        deadline = asyncio.get_running_loop().time() + SUSPEND_S
        while asyncio.get_running_loop().time() < deadline:
            with pytest.raises(asyncpg.PostgresError) as caught:
                await asyncpg.connect(daemon.url(sslmode="disable"))
            assert caught.value.sqlstate == "08001"
            assert 'cannot reach branch "main"' in str(caught.value)
            failures += 1
            await asyncio.sleep(0.25)
    assert daemon.status()["last_error"] is not None
    before = tcp_connections(restartable)
    await asyncio.to_thread(restartable.start)
    assert await branch_of_new_session(daemon) == "restartable"
    assert tcp_connections(restartable) - before == 1
    figures.record(suspended_s=SUSPEND_S, refused_while_down=failures)


async def test_an_idle_daemon_never_connects_on_its_own(
    daemon: LocalDaemon, restartable: LocalCompute, figures: Figures
) -> None:
    """Not at start, not after a restart, not on reloads or switches: only for clients."""
    assert await branch_of_new_session(daemon) == "restartable"
    after_session = tcp_connections(restartable)
    await asyncio.to_thread(restartable.restart)
    await daemon.use("dev")
    await daemon.use("main")
    assert await daemon.daemon.reload("test", force=True) is None
    # Watching for something that must not happen takes time by nature.
    await asyncio.sleep(IDLE_WATCH_S)
    assert tcp_connections(restartable) == after_session
    assert await branch_of_new_session(daemon) == "restartable"
    assert tcp_connections(restartable) == after_session + 1
    figures.record(idle_watch_s=IDLE_WATCH_S, connections_of_its_own=0)
