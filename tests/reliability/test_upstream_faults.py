"""Faults between the daemon and a branch: the client affected hears of it in time, no one else.

Branch "faulty" reaches compute "dev" through a fault-injecting relay (its URL keeps the
Neon-like host for SNI and the certificate check, and points hostaddr/port at the relay);
"main" is reached directly. A bystander session opened on "main" before switching must keep
working through every fault, and the daemon must end every affected session by itself.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, write_config
from neonlocal.localpg import LocalCompute
from neonlocal.proxy.session import Session
from reliability.conftest import Figures
from reliability.faultrelay import Direction, Fault, FaultRelay, FaultSpec
from reliability.measure import eventually

pytestmark = [pytest.mark.reliability, pytest.mark.pg]

CONNECT_TIMEOUT = 1.0
# A hang guard, not a speed check: far beyond the timeout, but far below any test timeout.
GRACE = 5.0


def via_relay(url: str, relay: FaultRelay) -> str:
    """``url`` with hostaddr and port pointing at the relay; host (SNI) unchanged."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query["hostaddr"] = relay.host
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host = hostport.rsplit(":", 1)[0]
    netloc = f"{userinfo}@{host}:{relay.port}"
    return urllib.parse.urlunsplit(
        parts._replace(netloc=netloc, query=urllib.parse.urlencode(query, safe="/:"))
    )


@dataclass
class Rig:
    daemon: LocalDaemon
    relay: FaultRelay
    bystander: asyncpg.Connection

    def dsn(self) -> str:
        return self.daemon.url(sslmode="disable")

    async def bystander_unharmed(self) -> None:
        assert await self.bystander.fetchval("SELECT name FROM branch_info") == "main"


@pytest.fixture
async def rig(
    workdir: Path,
    compute_main: LocalCompute,
    compute_dev: LocalCompute,
    ca_file: Path,
    no_unhandled_errors: list[object],
) -> AsyncIterator[Rig]:
    spec = compute_dev.spec
    async with FaultRelay(spec.listen_addr, spec.port) as relay:
        config = write_config(
            workdir / "config.toml",
            {
                "main": compute_main.url(ca_file=ca_file),
                "faulty": via_relay(compute_dev.url(ca_file=ca_file), relay),
            },
            branch="main",
            extra=f"[upstream]\nconnect_timeout = {CONNECT_TIMEOUT}",
        )
        async with running_daemon(config, daemon_env(workdir)) as daemon:
            bystander = await asyncpg.connect(daemon.url(sslmode="disable"))
            try:
                # The bystander stays on main: that it is unharmed is the point.
                await daemon.use("faulty", sessions="keep")
                yield Rig(daemon, relay, bystander)
                await eventually(lambda: not rig_sessions(daemon), what="faulty sessions to end")
            finally:
                await bystander.close()


def rig_sessions(daemon: LocalDaemon) -> list[Session]:
    assert daemon.daemon.server is not None
    return [s for s in daemon.daemon.server.sessions if s.branch == "faulty"]


async def refused(rig: Rig) -> asyncpg.PostgresError:
    """The ErrorResponse a new client gets, within the connect timeout (plus a hang guard)."""
    async with asyncio.timeout(CONNECT_TIMEOUT + GRACE):
        with pytest.raises(asyncpg.PostgresError) as caught:
            await asyncpg.connect(rig.dsn())
    return caught.value


async def served(rig: Rig) -> str:
    async with asyncio.timeout(CONNECT_TIMEOUT + GRACE):
        conn = await asyncpg.connect(rig.dsn())
        try:
            return str(await conn.fetchval("SELECT name FROM branch_info"))
        finally:
            await conn.close()


async def test_a_relay_without_faults_reaches_the_branch(rig: Rig) -> None:
    """The rig itself: TLS through the relay verifies, and the session lands on "dev"."""
    assert await served(rig) == "dev"
    assert rig.relay.accepted == 1


async def test_a_connection_dropped_at_once_is_a_connection_failure(
    rig: Rig, figures: Figures
) -> None:
    rig.relay.fault = FaultSpec(Fault.DROP)
    error = await refused(rig)
    assert error.sqlstate == "08006"
    assert 'branch "faulty"' in str(error)
    await rig.bystander_unharmed()
    rig.relay.fault = FaultSpec()
    assert await served(rig) == "dev"
    figures.record(faults=dict(rig.relay.injected))


async def test_a_black_holed_connection_times_out_with_08001(rig: Rig, figures: Figures) -> None:
    rig.relay.fault = FaultSpec(Fault.STALL)
    error = await refused(rig)
    assert error.sqlstate == "08001"
    assert f"timed out after {CONNECT_TIMEOUT:g} s" in str(error)
    await rig.bystander_unharmed()
    figures.record(faults=dict(rig.relay.injected))


async def test_a_slow_accept_within_the_timeout_is_served_beyond_it_refused(
    rig: Rig, figures: Figures
) -> None:
    rig.relay.fault = FaultSpec(Fault.SLOW_ACCEPT, delay=CONNECT_TIMEOUT / 4)
    assert await served(rig) == "dev"
    rig.relay.fault = FaultSpec(Fault.SLOW_ACCEPT, delay=CONNECT_TIMEOUT * 3)
    error = await refused(rig)
    assert error.sqlstate == "08001"
    await rig.bystander_unharmed()
    figures.record(faults=dict(rig.relay.injected))


@pytest.mark.parametrize("direction", list(Direction))
async def test_a_half_open_connection_times_out_with_08001(
    rig: Rig, direction: Direction, figures: Figures
) -> None:
    """One direction silently gone from the start: the TLS negotiation never completes."""
    rig.relay.fault = FaultSpec(Fault.HALF_OPEN, direction=direction)
    error = await refused(rig)
    assert error.sqlstate == "08001"
    await rig.bystander_unharmed()
    figures.record(faults=dict(rig.relay.injected))


async def test_a_server_gone_silent_during_login_times_out_with_08001(
    rig: Rig, figures: Figures
) -> None:
    """TLS completes, then the server's answers stop: the login wait is bounded too."""
    rig.relay.fault = FaultSpec(Fault.HALF_OPEN_AFTER_HANDSHAKE)
    error = await refused(rig)
    assert error.sqlstate == "08001"
    assert 'branch "faulty"' in str(error)
    await rig.bystander_unharmed()
    figures.record(faults=dict(rig.relay.injected))


async def test_a_reset_mid_query_closes_that_client_cleanly_and_no_other(
    rig: Rig, figures: Figures
) -> None:
    victim = await asyncpg.connect(rig.dsn())
    assert rig.relay.arm_reset_all(after_bytes=4096) == 1
    # Opened after arming: this session's relay connection is not armed.
    survivor = await asyncpg.connect(rig.dsn())
    try:
        async with asyncio.timeout(GRACE):
            with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError)):
                await victim.fetchval("SELECT repeat('x', 1000000)")
        assert victim.is_closed()
        assert await survivor.fetchval("SELECT length(repeat('x', 1000000))") == 1000000
        await rig.bystander_unharmed()
        await eventually(lambda: len(rig_sessions(rig.daemon)) == 1, what="the victim to end")
        (session,) = rig_sessions(rig.daemon)
        assert session.relay is not None
        assert not session.relay.done.done()
    finally:
        await survivor.close()
    figures.record(faults=dict(rig.relay.injected))


async def test_an_idle_session_whose_upstream_goes_silent_ends_once_tcp_gives_up(
    rig: Rig, figures: Figures
) -> None:
    """Laptop suspend: the upstream vanishes without a FIN.

    Only the kernel can tell a silent peer from an idle one: keepalive is set on the
    upstream socket, and when its probes fail the socket errors out. A relay cannot fake
    unanswered probes (its own kernel answers them), so the test checks the socket options
    and then delivers what the kernel would: a reset.
    """
    conn = await asyncpg.connect(rig.dsn())
    (session,) = rig_sessions(rig.daemon)
    assert session.upstream is not None
    sock = session.upstream.endpoint.extra("socket")  # noqa: S610 - not Django
    options = {
        "SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "TCP_KEEPIDLE": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "TCP_KEEPINTVL": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        "TCP_KEEPCNT": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    }
    assert options["SO_KEEPALIVE"] == 1
    detect_s = options["TCP_KEEPIDLE"] + options["TCP_KEEPINTVL"] * options["TCP_KEEPCNT"]
    assert 0 < detect_s <= 300
    rig.relay.half_open_all(Direction.TO_CLIENT)
    rig.relay.half_open_all(Direction.TO_SERVER)
    query = asyncio.ensure_future(conn.fetchval("SELECT 1"))
    try:
        await rig.bystander_unharmed()
        assert not query.done()
        assert rig.relay.reset_all() == 1
        async with asyncio.timeout(GRACE):
            with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError)):
                await query
    finally:
        query.cancel()
        await conn.close()
    await rig.bystander_unharmed()
    figures.record(keepalive=options, dead_peer_detected_within_s=detect_s)
