"""The admin listener: health and readiness probes, and Prometheus metrics of real traffic.

Each test runs a daemon in the test's event loop with ``[admin] listen = "127.0.0.1:0"`` and
reads the endpoints over HTTP as a probe or a Prometheus scraper would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
import structlog
import structlog.testing
from prometheus_client.parser import text_string_to_metric_families

from fixtures import rawpg
from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, write_config
from fixtures.net import free_port
from fixtures.pg import TEST_PASSWORD
from neonlocal.config.schema import ConfigError, load_settings
from neonlocal.daemon import Daemon
from neonlocal.errors import StartupError

ADMIN = '[admin]\nlisten = "127.0.0.1:0"'
PAYLOAD = 100_000  # bytes each session sends and receives


def neon_url(host: str, port: int, *, hostaddr: str = "127.0.0.1") -> str:
    return f"postgresql://neondb_owner:{TEST_PASSWORD}@{host}:{port}/neondb?hostaddr={hostaddr}"


def unused_branch_url() -> str:
    """A branch nobody listens for: fine for tests that never open a session to it."""
    return neon_url("ep-idle-300003.us-east-2.aws.neon.tech", free_port())


@contextlib.asynccontextmanager
async def admin_daemon(
    workdir: Path,
    branches: Mapping[str, str],
    *,
    branch: str | None,
    name: str = "config.toml",
) -> AsyncIterator[LocalDaemon]:
    config = write_config(workdir / name, branches, branch=branch, extra=ADMIN)
    # The control socket's name derives from the config path: two files, two daemons.
    async with running_daemon(config, daemon_env(workdir)) as daemon:
        yield daemon


async def get(daemon: LocalDaemon, path: str, method: str = "GET") -> httpx.Response:
    admin = daemon.daemon.admin
    assert admin is not None
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        return await client.request(method, f"http://127.0.0.1:{admin.port}{path}")


async def scrape(daemon: LocalDaemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics parsed by the Prometheus text parser: {(sample name, labels): value}."""
    response = await get(daemon, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def labels_of(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str
) -> list[dict[str, str]]:
    return [dict(labels) for (sample, labels) in samples if sample == name]


async def sessions_closed(daemon: LocalDaemon) -> None:
    """Wait until the daemon has seen every client go (a close is asynchronous)."""
    server = daemon.daemon.server
    assert server is not None
    async with asyncio.timeout(10):
        while server.sessions:  # noqa: ASYNC110 - nothing to await but the close
            await asyncio.sleep(0.01)


@contextlib.contextmanager
def captured_log_events() -> Iterator[list[dict[str, Any]]]:
    """The daemon's log events as dicts, whatever level an earlier test configured."""
    saved = structlog.get_config()
    capture = structlog.testing.LogCapture()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**saved)


def logged_bytes(events: list[dict[str, Any]], key: str) -> int:
    """Sum of ``key`` over the session_closed log events."""
    return sum(int(e[key]) for e in events if e["event"] == "session_closed")


# --- metrics against real traffic ---------------------------------------------------------------


@pytest.mark.pg
async def test_metrics_count_sessions_bytes_and_connect_latency_of_real_sessions(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    with captured_log_events() as events:
        async with admin_daemon(workdir, branch_urls, branch="main") as daemon:
            conns = [await psycopg.AsyncConnection.connect(daemon.url()) for _ in range(2)]
            try:
                for conn in conns:
                    cur = await conn.execute(
                        "SELECT length(%s::text), repeat('x', %s)", ("y" * PAYLOAD, PAYLOAD)
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    assert row[0] == PAYLOAD
                    assert len(row[1]) == PAYLOAD
                live = await scrape(daemon)
                upstream = daemon.status()["upstream_host"]
            finally:
                for conn in conns:
                    await conn.close()
            await sessions_closed(daemon)
            after = await scrape(daemon)

    assert value(live, "neonlocal_sessions_open", branch="main") == 2
    assert value(live, "neonlocal_sessions_open", branch="dev") == 0
    assert value(live, "neonlocal_branch_info", branch="main", upstream=upstream) == 1
    assert value(live, "neonlocal_sessions_total", branch="main") == 2
    assert value(live, "neonlocal_upstream_connect_seconds_count", branch="main") == 2
    connect_sum = value(live, "neonlocal_upstream_connect_seconds_sum", branch="main")
    assert connect_sum is not None
    assert connect_sum > 0
    assert value(live, "neonlocal_upstream_connect_seconds_bucket", branch="main", le="+Inf") == 2

    assert value(after, "neonlocal_sessions_open", branch="main") == 0
    assert value(after, "neonlocal_sessions_total", branch="main") == 2
    to_upstream = value(after, "neonlocal_bytes_total", branch="main", direction="to_upstream")
    to_client = value(after, "neonlocal_bytes_total", branch="main", direction="to_client")
    assert to_upstream is not None
    assert to_client is not None
    # Each session sent and received a 100 kB value, plus the protocol around it...
    assert 2 * PAYLOAD < to_upstream < 2 * PAYLOAD + 20_000
    assert 2 * PAYLOAD < to_client < 2 * PAYLOAD + 20_000
    # ...and the counters agree to the byte with what each session logged when it closed.
    assert to_upstream == logged_bytes(events, "bytes_from_client")
    assert to_client == logged_bytes(events, "bytes_from_server")
    assert value(after, "neonlocal_errors_total", kind="upstream_unreachable") == 0


@pytest.mark.pg
async def test_failed_sessions_are_counted_by_kind(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """A refused connection, an upstream without TLS and a wrong password count apart."""
    refused = neon_url("ep-gone-400004.us-east-2.aws.neon.tech", free_port())
    async with rawpg.fake_upstream(rawpg.refuses_tls) as plain_port:
        plain = neon_url("ep-plain-500005.us-east-2.aws.neon.tech", plain_port)
        wrong = branch_urls["dev"].replace(TEST_PASSWORD, "not-the-password")
        assert wrong != branch_urls["dev"]
        branches = {"main": branch_urls["main"], "gone": refused, "plain": plain, "wrong": wrong}
        async with admin_daemon(workdir, branches, branch="gone") as daemon:
            for name, expected_sqlstate in (
                ("gone", "08001"),
                ("plain", "08001"),
                ("wrong", "28P01"),
            ):
                await daemon.use(name)
                with pytest.raises(asyncpg.PostgresError) as caught:
                    await asyncpg.connect(daemon.url(sslmode="disable"))
                assert caught.value.sqlstate == expected_sqlstate, name
            samples = await scrape(daemon)

    assert value(samples, "neonlocal_errors_total", kind="upstream_unreachable") == 1
    assert value(samples, "neonlocal_errors_total", kind="tls") == 1
    assert value(samples, "neonlocal_errors_total", kind="auth") == 1
    assert value(samples, "neonlocal_errors_total", kind="too_many") == 0
    # Only the branch selected now, with the host it reaches.
    assert labels_of(samples, "neonlocal_branch_info") == [
        {"branch": "wrong", "upstream": wrong.split("@", 1)[1].split("/", 1)[0]}
    ]


async def test_each_daemon_keeps_its_own_metrics(workdir: Path) -> None:
    """Two daemons in one process: an error at one is not counted by the other."""
    branches = {"idle": unused_branch_url()}
    async with (
        admin_daemon(workdir, branches, branch=None) as first,
        admin_daemon(workdir, branches, branch=None, name="second.toml") as second,
    ):
        with pytest.raises(asyncpg.PostgresError) as caught:
            await asyncpg.connect(first.url(sslmode="disable"))
        assert caught.value.sqlstate == "08001"
        assert value(await scrape(first), "neonlocal_errors_total", kind="no_branch") == 1
        assert value(await scrape(second), "neonlocal_errors_total", kind="no_branch") == 0


# --- health and readiness -----------------------------------------------------------------------


async def test_probes_and_scrapes_never_touch_the_upstream(workdir: Path) -> None:
    """/healthz, /readyz and /metrics answer without a single connection to the branch."""
    reached = 0

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal reached
        reached += 1
        await rawpg.refuses_tls(reader, writer)

    async with rawpg.fake_upstream(counting) as port:
        url = neon_url("ep-asleep-600006.us-east-2.aws.neon.tech", port)
        async with admin_daemon(workdir, {"asleep": url}, branch="asleep") as daemon:
            for path in ("/healthz", "/readyz", "/metrics", "/healthz", "/readyz", "/metrics"):
                assert (await get(daemon, path)).status_code == 200, path
            assert reached == 0
            # The counter works: a client session does reach the branch.
            with pytest.raises(asyncpg.PostgresError):
                await asyncpg.connect(daemon.url(sslmode="disable"))
            assert reached == 1


async def test_readyz_is_503_until_a_branch_is_selected(workdir: Path) -> None:
    async with admin_daemon(workdir, {"idle": unused_branch_url()}, branch=None) as daemon:
        health = await get(daemon, "/healthz")
        assert (health.status_code, health.text) == (200, "ok\n")
        ready = await get(daemon, "/readyz")
        assert ready.status_code == 503
        assert ready.text == "not ready: no branch is selected\n"
        await daemon.use("idle")
        ready = await get(daemon, "/readyz")
        assert (ready.status_code, ready.text) == (200, "ready\n")


async def test_readyz_is_503_while_the_daemon_drains(workdir: Path) -> None:
    async with admin_daemon(workdir, {"idle": unused_branch_url()}, branch="idle") as daemon:
        assert (await get(daemon, "/readyz")).status_code == 200
        server = daemon.daemon.server
        assert server is not None
        daemon.daemon.request_stop()
        await server.close_listeners()
        ready = await get(daemon, "/readyz")
        assert (ready.status_code, ready.text) == (503, "not ready: shutting down\n")
        assert (await get(daemon, "/healthz")).status_code == 200


async def test_other_paths_and_methods_are_refused(workdir: Path) -> None:
    async with admin_daemon(workdir, {"idle": unused_branch_url()}, branch="idle") as daemon:
        assert (await get(daemon, "/")).status_code == 404
        assert (await get(daemon, "/metrics/../admin")).status_code == 404
        assert (await get(daemon, "/metrics", method="POST")).status_code == 405
        head = await get(daemon, "/healthz", method="HEAD")
        assert (head.status_code, head.content) == (200, b"")


# --- configuration ------------------------------------------------------------------------------


def test_admin_listener_is_off_unless_configured(workdir: Path) -> None:
    config = write_config(workdir / "config.toml", {"idle": unused_branch_url()}, branch="idle")
    assert load_settings(config, {}).admin.address is None


@pytest.mark.parametrize(
    "address", ["0.0.0.0:9187", "192.168.1.10:9187", "[::]:9187", "example.com:9187"]
)
def test_admin_listener_refuses_non_loopback_addresses(workdir: Path, address: str) -> None:
    config = write_config(
        workdir / "config.toml",
        {"idle": unused_branch_url()},
        branch="idle",
        extra=f'[admin]\nlisten = "{address}"',
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config, {})
    line = config.read_text().splitlines().index(f'listen = "{address}"') + 1
    assert str(caught.value).startswith(
        f"{config}:{line}: admin.listen: the admin listener serves loopback only"
    )


async def test_daemon_with_a_non_loopback_admin_address_does_not_start(workdir: Path) -> None:
    config = write_config(
        workdir / "config.toml",
        {"idle": unused_branch_url()},
        branch="idle",
        extra='[admin]\nlisten = "0.0.0.0:9187"',
    )
    daemon = Daemon(config, daemon_env(workdir))
    with pytest.raises(StartupError, match="loopback only"):
        await daemon.start()
    assert daemon.server is None
