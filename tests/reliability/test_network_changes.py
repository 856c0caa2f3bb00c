"""A branch whose address changes is followed by the next session, with no restart and no cache.

Two ways an address changes: the config's ``hostaddr`` is edited (picked up by the file
watcher), or DNS answers differently. /etc/hosts is not ours to edit, so DNS is simulated at
the one place the daemon asks it: the event loop's ``getaddrinfo``, which
``loop.create_connection`` calls for every upstream connection. What this proves: the daemon
resolves per session and never uses an answer the current lookup did not confirm (the last
address only gets a head start: a TCP connect that runs while the name is looked up). What
it cannot prove: that the operating system's resolver (nscd, systemd-resolved,
mDNSResponder) does not cache; that is outside the daemon.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fixtures.daemon import (
    LocalDaemon,
    branch_of_new_session,
    daemon_env,
    running_daemon,
    serving,
    write_config,
)
from fixtures.dns import FakeDns, faked_dns, recorded_connects
from fixtures.pg import endpoint_host
from neonlocal.localpg import LocalCompute
from reliability.conftest import Figures
from reliability.measure import eventually

pytestmark = [pytest.mark.reliability, pytest.mark.pg]

MOVING_HOST = endpoint_host("ep-moving-300003")


def moving_url(compute: LocalCompute, ca_file: Path, *, hostaddr: str | None) -> str:
    """``compute``'s URL under the name MOVING_HOST (the wildcard certificate covers it)."""
    # PostgreSQL 15 has no direct TLS: say so, as a URL for it would, so that each session
    # here is one connection (test_direct_tls_upstream.py covers the guess on Neon's hosts).
    query = {"sslmode": "verify-full", "sslrootcert": str(ca_file), "sslnegotiation": "postgres"}
    if hostaddr is not None:
        query["hostaddr"] = hostaddr
    password = urllib.parse.quote(compute.password, safe="")
    return (
        f"postgresql://{compute.role}:{password}@{MOVING_HOST}:{compute.spec.port}/"
        f"{compute.database}?{urllib.parse.urlencode(query, safe='/:')}"
    )


def selected_hostaddr(daemon: LocalDaemon) -> str | None:
    assert daemon.daemon.server is not None
    selected = daemon.daemon.server.selected
    return None if selected is None else selected[1].hostaddr


async def test_an_edited_hostaddr_is_followed_by_new_sessions_without_restart(
    workdir: Path,
    computes: dict[str, LocalCompute],
    ca_file: Path,
    no_unhandled_errors: list[object],
) -> None:
    main, dev = computes["main"], computes["dev"]
    config = workdir / "config.toml"

    def point_at(compute: LocalCompute) -> None:
        url = moving_url(compute, ca_file, hostaddr=compute.spec.listen_addr)
        write_config(config, {"moving": url}, branch="moving")

    point_at(main)
    async with running_daemon(config, daemon_env(workdir)) as daemon:
        pinned = await asyncpg.connect(daemon.url(sslmode="disable"))
        try:
            assert await pinned.fetchval("SELECT name FROM branch_info") == "main"
            await asyncio.to_thread(point_at, dev)
            await eventually(
                lambda: selected_hostaddr(daemon) == dev.spec.listen_addr,
                what="the file watcher to apply the new hostaddr",
            )
            assert await branch_of_new_session(daemon) == "dev"
            # An open session stays where it was opened.
            assert await pinned.fetchval("SELECT name FROM branch_info") == "main"
            await asyncio.to_thread(point_at, main)
            await eventually(lambda: selected_hostaddr(daemon) == main.spec.listen_addr)
            assert await branch_of_new_session(daemon) == "main"
        finally:
            await pinned.close()


@pytest.fixture
async def fake_dns() -> AsyncIterator[FakeDns]:
    async with faked_dns(MOVING_HOST) as dns:
        yield dns


@pytest.fixture
async def dns_daemon(
    workdir: Path,
    compute_main: LocalCompute,
    ca_file: Path,
    fake_dns: FakeDns,
    no_unhandled_errors: list[object],
) -> AsyncIterator[LocalDaemon]:
    branches = {"moving": moving_url(compute_main, ca_file, hostaddr=None)}
    async with serving(workdir, branches, branch="moving") as daemon:
        yield daemon


async def test_a_changed_dns_answer_is_followed_by_the_next_session(
    dns_daemon: LocalDaemon, fake_dns: FakeDns, computes: dict[str, LocalCompute], figures: Figures
) -> None:
    answers = []
    for name in ["main", "dev", "dev", "main", "dev"]:
        fake_dns.answer = computes[name].spec.listen_addr
        answers.append(await branch_of_new_session(dns_daemon))
        assert answers[-1] == name
    # One lookup per session: nothing was answered from a cache.
    assert fake_dns.lookups == len(answers)
    figures.record(sessions=len(answers), lookups=fake_dns.lookups)


@pytest.fixture
async def upstream_connects(
    computes: dict[str, LocalCompute], fake_dns: FakeDns
) -> AsyncIterator[list[Any]]:
    """(address, lookup still pending) for each TCP connection the daemon opens to a compute."""
    ports = {compute.spec.port for compute in computes.values()}
    async with recorded_connects(ports, fake_dns) as seen:
        yield seen


async def test_a_slow_lookup_runs_alongside_a_connect_to_the_last_address(
    dns_daemon: LocalDaemon,
    fake_dns: FakeDns,
    computes: dict[str, LocalCompute],
    upstream_connects: list[Any],
) -> None:
    """DNS costs a new session no time when the answer has not changed: the daemon connects
    to the address the name had last time while it looks the name up again."""
    main = computes["main"].spec.listen_addr
    fake_dns.answer = main
    assert await branch_of_new_session(dns_daemon) == "main"
    assert upstream_connects == [(main, False)]  # the first session had to wait for DNS
    fake_dns.delay = 0.3
    assert await branch_of_new_session(dns_daemon) == "main"
    assert upstream_connects[1:] == [(main, True)]
    assert fake_dns.lookups == 2


async def test_a_changed_answer_beats_the_head_start(
    dns_daemon: LocalDaemon,
    fake_dns: FakeDns,
    computes: dict[str, LocalCompute],
    upstream_connects: list[Any],
) -> None:
    """The connection to the old address is dropped; the session goes where DNS says now."""
    main, dev = computes["main"].spec.listen_addr, computes["dev"].spec.listen_addr
    fake_dns.answer = main
    assert await branch_of_new_session(dns_daemon) == "main"
    fake_dns.answer, fake_dns.delay = dev, 0.3
    assert await branch_of_new_session(dns_daemon) == "dev"
    assert upstream_connects[1:] == [(main, True), (dev, False)]
    # ...and the next session starts from the new address.
    fake_dns.delay = 0.0
    assert await branch_of_new_session(dns_daemon) == "dev"
    assert upstream_connects[3][0] == dev


async def test_a_cancel_resolves_the_host_again_too(
    dns_daemon: LocalDaemon, fake_dns: FakeDns, computes: dict[str, LocalCompute]
) -> None:
    """A cancel goes to the host the session is pinned to, looked up when it is sent."""
    fake_dns.answer = computes["main"].spec.listen_addr
    conn = await asyncpg.connect(dns_daemon.url(sslmode="disable"))
    try:
        lookups = fake_dns.lookups
        # On its timeout asyncpg sends a CancelRequest and waits for the query to end.
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        assert await conn.fetchval("SELECT name FROM branch_info") == "main"
        await eventually(lambda: fake_dns.lookups == lookups + 1, what="the cancel's lookup")
    finally:
        await conn.close()
