"""What a user notices with the daemon in front of Neon's edge, not in front of bare PostgreSQL.

Real clients (psycopg, asyncpg, psql, node-postgres) talk to an in-process daemon whose
branches are Neon host names that lead to the edge stand-in (``fixtures.neon_edge``), which
stands in front of the shared test clusters. The edge sends every connect-time error as
XX000, holds a waking compute's login in silence, and drops startup settings; the daemon
must turn those back into what a client straight on PostgreSQL would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import psycopg
import pytest
import sqlalchemy

from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, toml_string, write_config
from fixtures.dns import faked_dns
from fixtures.neon_edge import (
    COULD_NOT_CONNECT,
    ENDPOINT_DISABLED,
    ENDPOINT_UNAVAILABLE,
    PERMIT_FAILED,
    TOO_MANY_CONNECTION_ATTEMPTS,
    TOO_MANY_CONNECTIONS,
    NeonEdge,
    neon_edge,
)
from fixtures.pg import TEST_DATABASE, TEST_PASSWORD, TEST_ROLE
from neon_standin import NeonStandIn

__all__ = ["neon_edge"]  # the stand-in fixture, used by name below

pytestmark = pytest.mark.pg

MAIN = "ep-main-100001"
DEV = "ep-dev-200002"

StartDaemon = Callable[..., contextlib.AbstractAsyncContextManager[LocalDaemon]]


def edge_url(
    edge: NeonEdge, endpoint_id: str, ca_file: Path, *, password: str | None = TEST_PASSWORD
) -> str:
    """A branch URL naming the endpoint's Neon host, dialled at the edge (``hostaddr``)."""
    userinfo = TEST_ROLE + (f":{quote(password, safe='')}" if password is not None else "")
    return (
        f"postgresql://{userinfo}@{edge.hostname(endpoint_id)}:{edge.port}/{TEST_DATABASE}"
        f"?hostaddr={edge.addr}&sslmode=verify-full&sslrootcert={ca_file}"
    )


@pytest.fixture
def start(workdir: Path, neon_edge: NeonEdge, ca_file: Path) -> StartDaemon:
    """start(extra=..., password=..., main=...): a daemon on "main" with "dev", both
    through the edge; ``main`` replaces main's endpoint id (a ``-pooler`` one, say)."""

    def start(
        *, extra: str = "", password: str | None = TEST_PASSWORD, main: str = MAIN
    ) -> contextlib.AbstractAsyncContextManager[LocalDaemon]:
        branches = {
            "main": edge_url(neon_edge, main, ca_file, password=password),
            "dev": edge_url(neon_edge, DEV, ca_file, password=password),
        }
        config = write_config(workdir / "config.toml", branches, branch="main", extra=extra)
        return running_daemon(config, daemon_env(workdir))

    return start


def upstream(connect_timeout: float = 30.0, **more: float) -> str:
    """An ``[upstream]`` table for the config."""
    keys = {"connect_timeout": connect_timeout, **more}
    return "[upstream]\n" + "\n".join(f"{key} = {value}" for key, value in keys.items())


async def branch_via(daemon: LocalDaemon, **kwargs: Any) -> str:
    conn = await asyncpg.connect(daemon.url(sslmode="disable"), **kwargs)
    try:
        return str(await conn.fetchval("SELECT name FROM branch_info"))
    finally:
        await conn.close()


async def refusal(daemon: LocalDaemon, **kwargs: Any) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await asyncpg.connect(daemon.url(sslmode="disable"), **kwargs)
    return caught.value


def ssl_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


async def run_psql(dsn: str, sql: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """psql -At -c SQL against ``dsn``: (exit code, stdout, stderr)."""
    psql = shutil.which("psql")
    assert psql is not None
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = await asyncio.create_subprocess_exec(
        psql, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})},
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- switching and cancel ---------------------------------------------------------------------


async def test_a_switch_moves_new_sessions_from_main_to_dev_through_the_edge(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    async with (
        start() as daemon,
        await psycopg.AsyncConnection.connect(daemon.dsn()) as on_main,
    ):
        assert on_main.info.parameter_status("neonlocal.branch") == "main"
        assert neon_edge.relayed[-1].endpoint == MAIN

        await daemon.use("dev", sessions="keep")

        async with await psycopg.AsyncConnection.connect(daemon.dsn()) as on_dev:
            cur = await on_dev.execute("SELECT name FROM branch_info")
            assert await cur.fetchone() == ("dev",)
            assert on_dev.info.parameter_status("neonlocal.branch") == "dev"
        cur = await on_main.execute("SELECT name FROM branch_info")
        assert await cur.fetchone() == ("main",)  # kept: an open session never moves
    session = neon_edge.relayed[-1]
    assert (session.endpoint, session.sni) == (DEV, neon_edge.hostname(DEV))
    assert session.auth == "SCRAM-SHA-256-PLUS"


async def test_cancel_through_daemon_and_edge_stops_the_running_query(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    async with (
        start() as daemon,
        await psycopg.AsyncConnection.connect(daemon.dsn(), autocommit=True) as conn,
    ):
        sleeping = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        began = time.monotonic()
        await conn.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await sleeping
        assert time.monotonic() - began < 5
        cur = await conn.execute("SELECT name FROM branch_info")
        assert await cur.fetchone() == ("main",)
    # The edge found the session by its own key and cancelled at main's compute.
    session = neon_edge.relayed[-1]
    assert [c.key for c in neon_edge.cancels] == [session.cancel_key]
    assert neon_edge.cancels[0].forwarded_to == MAIN


async def test_after_a_switch_asyncpgs_cancel_reaches_the_branch_its_session_is_on(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    async with start() as daemon:
        on_main = await asyncpg.connect(daemon.url(sslmode="disable"))
        try:
            await daemon.use("dev", sessions="keep")
            with pytest.raises(TimeoutError):
                # asyncpg sends a CancelRequest when the wait times out.
                await asyncio.wait_for(on_main.fetchval("SELECT pg_sleep(30)"), 0.5)
            assert await on_main.fetchval("SELECT name FROM branch_info") == "main"
        finally:
            await on_main.close()
        assert await branch_via(daemon) == "dev"
    assert [c.forwarded_to for c in neon_edge.cancels] == [MAIN]


async def test_a_sqlalchemy_app_follows_a_switch_to_a_branch_whose_compute_sleeps(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    """The README's app (a pre-pinging SQLAlchemy pool) after `neonlocal use dev` while dev's
    compute is suspended: its next request waits out the wake and runs on dev."""
    async with start(extra=upstream(connect_timeout=1)) as daemon:
        url = f"postgresql+psycopg://{TEST_ROLE}@127.0.0.1:{daemon.port}/{TEST_DATABASE}"
        engine = sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=2)

        def branch_now() -> str:
            with engine.connect() as conn:
                return str(conn.execute(sqlalchemy.text("SELECT name FROM branch_info")).scalar())

        try:
            assert await asyncio.to_thread(branch_now) == "main"
            neon_edge.suspend(DEV, wake_s=3.0)
            await daemon.use("dev")

            assert await asyncio.to_thread(branch_now) == "dev"
        finally:
            await asyncio.to_thread(engine.dispose)
    assert neon_edge.relayed[-1].cold_start_s >= 3.0


# --- cold starts ------------------------------------------------------------------------------


async def sessions_waking_while(daemon: LocalDaemon, login: asyncio.Future[Any]) -> set[int]:
    """Every ``sessions_waking`` count ``status`` showed until ``login`` finished."""
    seen = set()
    while not login.done():
        seen.add(daemon.status()["sessions_waking"])
        await asyncio.sleep(0.1)
    seen.add(daemon.status()["sessions_waking"])
    return seen


async def test_a_cold_start_longer_than_connect_timeout_succeeds_and_status_shows_it(
    start: StartDaemon, neon_edge: NeonEdge, capsys: pytest.CaptureFixture[str]
) -> None:
    """The edge says nothing for the 5 s the compute takes to wake; connect_timeout (2 s)
    bounds TCP, TLS and SCRAM, not that wait. (This login is pipelined: the daemon has
    logged in to the edge before.)"""
    async with start(extra=upstream(connect_timeout=2)) as daemon:
        assert await branch_via(daemon) == "main"
        neon_edge.suspend(MAIN, wake_s=5.0)
        began = time.monotonic()
        login = asyncio.ensure_future(branch_via(daemon, timeout=30))

        seen = await sessions_waking_while(daemon, login)

        assert await login == "main"
        assert time.monotonic() - began >= 5.0
        assert seen == {0, 1}
        assert daemon.status()["sessions_waking"] == 0
    assert neon_edge.relayed[-1].cold_start_s >= 5.0
    log = capsys.readouterr().out.splitlines()
    waking = [line for line in log if "compute_waking" in line]
    assert len(waking) == 1
    assert "branch=main" in waking[0]
    assert "pipelined=True" in [line for line in log if "session_ready" in line][-1]


async def test_a_pools_burst_during_a_cold_start_waits_for_the_one_wake(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    """Ten sessions at once (an app's pool filling) while the compute wakes: status counts
    all ten waiting, and every one gets in when the compute is up."""
    async with start(extra=upstream(connect_timeout=1)) as daemon:
        neon_edge.suspend(MAIN, wake_s=3.0)
        logins = asyncio.gather(*(branch_via(daemon, timeout=30) for _ in range(10)))

        seen = await sessions_waking_while(daemon, logins)

        assert await logins == ["main"] * 10
        assert max(seen) == 10
    assert len(neon_edge.relayed) == 10


async def test_a_relayed_login_waits_for_the_wake_too(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    """No password in the branch URL: the wait after the client's own last SCRAM message is
    the compute waking, bounded by wake_timeout, not connect_timeout."""
    async with start(password=None, extra=upstream(connect_timeout=1)) as daemon:
        neon_edge.suspend(MAIN, wake_s=3.0)
        login = asyncio.ensure_future(branch_via(daemon, password=TEST_PASSWORD, timeout=30))

        seen = await sessions_waking_while(daemon, login)

        assert await login == "main"
        assert 1 in seen
    assert neon_edge.relayed[-1].cold_start_s >= 3.0


async def test_a_wake_longer_than_wake_timeout_fails_naming_the_setting(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    async with start(extra=upstream(connect_timeout=2, wake_timeout=1.5)) as daemon:
        neon_edge.suspend(MAIN, wake_s=4.0)

        error = await refusal(daemon, timeout=30)

        assert error.sqlstate == "08001"
        assert str(error) == (
            f'neonlocal: branch "main" ({neon_edge.hostname(MAIN)}:{neon_edge.port}) did not '
            "answer during login within 1.5 s ([upstream] wake_timeout)"
        )
        assert daemon.status()["sessions_waking"] == 0


@pytest.mark.timeout(150)
async def test_a_40_s_cold_start_with_default_settings_waits_like_psql_straight_to_neon(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    """What a real cold start can take; psql, with no connect_timeout of its own, waits.

    Slow on purpose (40 s); it is not in the reliability suite, so `scripts/test` runs it.
    """
    async with start() as daemon:
        neon_edge.suspend(MAIN, wake_s=40.0)
        began = time.monotonic()
        psql = asyncio.ensure_future(run_psql(daemon.dsn(), "SELECT name FROM branch_info"))

        seen = await sessions_waking_while(daemon, psql)

        code, out, err = await psql
        assert (code, out.strip()) == (0, "main"), err
        assert time.monotonic() - began >= 40.0
        assert 1 in seen


# --- passwords --------------------------------------------------------------------------------


async def test_a_wrong_password_in_the_branch_url_is_28P01_with_advice_not_xx000(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    async with start(password="npg_Wr0ng-passw0rd") as daemon:
        error = await refusal(daemon)

        assert isinstance(error, asyncpg.InvalidPasswordError)
        assert error.args[0] == (
            f'neonlocal: branch "main" ({neon_edge.hostname(MAIN)}:{neon_edge.port}): '
            "password authentication failed for user 'neondb_owner'"
        )
        assert error.hint is not None
        # A static URL: the hint says where in the config its password is.
        assert f'branch "main"\'s URL in {daemon.config_path}:' in error.hint
        assert "npg_Wr0ng-passw0rd" not in str(error) + error.hint


async def test_a_relayed_login_with_a_wrong_client_password_is_28P01(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    """A branch URL without a password: the client's own SCRAM goes through to the edge."""
    async with start(password=None) as daemon:
        assert await branch_via(daemon, password=TEST_PASSWORD) == "main"

        error = await refusal(daemon, password="npg_Not-the-password")

        assert isinstance(error, asyncpg.InvalidPasswordError)
        assert error.args[0] == (
            f'neonlocal: branch "main" ({neon_edge.hostname(MAIN)}:{neon_edge.port}): '
            "password authentication failed for user 'neondb_owner'"
        )
        assert error.hint is None  # the client typed this password, not neonlocal
    assert neon_edge.relayed[0].auth == "SCRAM-SHA-256"  # the client's proof, relayed
    assert len(neon_edge.sessions) == 2  # a refused password of the client's is not retried


@pytest.fixture
def through_api(workdir: Path, neon_edge: NeonEdge, ca_file: Path) -> Iterator[NeonStandIn]:
    """The Neon API stand-in hands out main's and dev's endpoint hosts, which
    ``[network.resolve]`` sends to the edge (it listens on 5432, where Neon does)."""
    assert neon_edge.port == 5432
    with NeonStandIn(main_host=neon_edge.hostname(MAIN), password=TEST_PASSWORD) as api:
        api.add_branch("dev", host=neon_edge.hostname(DEV))
        lines = [
            'branch = "main"',
            "[listen]",
            'host = ["127.0.0.1"]',
            "port = 0",
            "[neon]",
            f"project_id = {toml_string(api.project_id)}",
            f"api_url = {toml_string(api.base_url)}",
            f"sslrootcert = {toml_string(str(ca_file))}",
            "[network.resolve]",
            *(f'"{neon_edge.hostname(ep)}" = "{neon_edge.addr}"' for ep in (MAIN, DEV)),
        ]
        config = workdir / "config.toml"
        config.write_text("\n".join(lines) + "\n")
        config.chmod(0o600)
        yield api


@contextlib.asynccontextmanager
async def api_daemon(workdir: Path, api: NeonStandIn) -> AsyncIterator[LocalDaemon]:
    env = {**daemon_env(workdir), "NEON_API_KEY": api.api_key}
    env.pop("NEON_API_HOST", None)
    async with running_daemon(workdir / "config.toml", env) as daemon:
        yield daemon


ROTATED = "npg_Rotated-Pa55word"


async def test_a_password_rotated_in_neon_is_fetched_again_and_the_client_sees_no_error(
    workdir: Path, through_api: NeonStandIn, neon_edge: NeonEdge, capsys: pytest.CaptureFixture[str]
) -> None:
    async with api_daemon(workdir, through_api) as daemon:
        assert await branch_via(daemon) == "main"
        through_api.set_password("main", TEST_ROLE, ROTATED)
        neon_edge.set_password(TEST_ROLE, ROTATED)
        reveals = len(through_api.requests_to("reveal_password"))

        assert await branch_via(daemon) == "main"  # no error reached the client
        assert await branch_via(daemon) == "main"

        assert len(through_api.requests_to("reveal_password")) == reveals + 1
    refused = [s.error for s in neon_edge.sessions if s.error is not None]
    assert refused == ["password authentication failed for user 'neondb_owner'"]
    out = capsys.readouterr().out
    assert "credentials_refreshed" in out
    assert ROTATED not in out


async def test_a_password_the_api_still_gives_out_but_the_edge_refuses_is_28P01_with_advice(
    workdir: Path, through_api: NeonStandIn, neon_edge: NeonEdge
) -> None:
    async with api_daemon(workdir, through_api) as daemon:
        neon_edge.set_password(TEST_ROLE, ROTATED)  # changed, and the API not yet told
        reveals = len(through_api.requests_to("reveal_password"))

        error = await refusal(daemon)

        assert isinstance(error, asyncpg.InvalidPasswordError)
        assert error.args[0].endswith("password authentication failed for user 'neondb_owner'")
        assert error.hint is not None
        assert "`neonlocal use main` fetches it again" in error.hint
        assert len(through_api.requests_to("reveal_password")) == reveals + 1  # it did ask


async def test_a_fresh_password_the_edge_has_not_learnt_yet_is_retried_until_it_has(
    workdir: Path, through_api: NeonStandIn, neon_edge: NeonEdge
) -> None:
    """The edge caches role secrets for minutes: right after a rotation it can refuse the
    new password too. The daemon fetches it once, then retries within connect_timeout."""
    async with api_daemon(workdir, through_api) as daemon:
        assert await branch_via(daemon) == "main"
        through_api.set_password("main", TEST_ROLE, ROTATED)
        neon_edge.set_password(TEST_ROLE, "npg_Cached-by-the-edge")
        learnt = asyncio.get_running_loop().call_later(
            0.6, neon_edge.set_password, TEST_ROLE, ROTATED
        )
        reveals = len(through_api.requests_to("reveal_password"))
        try:
            assert await branch_via(daemon) == "main"
        finally:
            learnt.cancel()

        assert len(through_api.requests_to("reveal_password")) == reveals + 1
    refused = [s for s in neon_edge.sessions if s.error is not None]
    assert len(refused) >= 2  # the old password, then the new one at least once


# --- settings the edge would drop -------------------------------------------------------------

SETTINGS = {
    "TimeZone": "Pacific/Chatham",
    "DateStyle": "SQL, DMY",
    "search_path": "pg_catalog, public",
    "statement_timeout": "4321",
}
SHOW_SETTINGS = (
    "SELECT current_setting('TimeZone'), current_setting('DateStyle'), "
    "current_setting('search_path'), current_setting('statement_timeout')"
)
CLIENT_SEES = ("Pacific/Chatham", "SQL, DMY", "pg_catalog, public", "4321ms")


async def settings_via_asyncpg(**connect: Any) -> tuple[str, ...]:
    conn = await asyncpg.connect(server_settings=SETTINGS, **connect)
    try:
        row = await conn.fetchrow(SHOW_SETTINGS)
    finally:
        await conn.close()
    assert row is not None
    return tuple(row)


async def test_asyncpg_server_settings_take_effect_through_the_edge_as_they_do_not_directly(
    start: StartDaemon, neon_edge: NeonEdge, ca_file: Path
) -> None:
    async with start() as daemon:
        assert await settings_via_asyncpg(dsn=daemon.url(sslmode="disable")) == CLIENT_SEES
    options = dict(neon_edge.relayed[-1].compute_params or []).get("options", "")
    assert "-c TimeZone=Pacific/Chatham" in options
    assert r"-c search_path=pg_catalog,\ public" in options  # escaped as libpq does

    host = neon_edge.hostname(MAIN)
    async with faked_dns(host) as dns:
        dns.answer = neon_edge.addr
        direct = await settings_via_asyncpg(
            host=host, port=neon_edge.port, user=TEST_ROLE, password=TEST_PASSWORD,
            database=TEST_DATABASE, ssl=ssl_context(ca_file),
        )  # fmt: skip
    assert all(got != wanted for got, wanted in zip(direct, CLIENT_SEES, strict=True)), direct


async def test_a_reused_session_keeps_the_clients_settings_and_drops_what_it_set(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    """With ``reuse_sessions`` the next client with the same settings gets the same upstream
    session back: DISCARD ALL returns it to the settings it was opened with, not to the
    compute's defaults."""
    async with start(extra="[upstream]\nreuse_sessions = true") as daemon:
        first = await asyncpg.connect(daemon.url(sslmode="disable"), server_settings=SETTINGS)
        await first.execute("SET TimeZone = 'Europe/Lisbon'")
        await first.close()
        pool = daemon.daemon.server.pool if daemon.daemon.server is not None else None
        assert pool is not None
        for _ in range(200):  # the reset runs as the client leaves
            if len(pool) == 1:
                break
            await asyncio.sleep(0.01)

        assert await settings_via_asyncpg(dsn=daemon.url(sslmode="disable")) == CLIENT_SEES
    assert len(neon_edge.relayed) == 1


async def test_libpq_pgtz_and_pgdatestyle_take_effect_through_the_edge(
    start: StartDaemon, neon_edge: NeonEdge, ca_file: Path
) -> None:
    env = {"PGTZ": "Asia/Kathmandu", "PGDATESTYLE": "German, DMY"}
    show = "SELECT current_setting('TimeZone') || ' | ' || current_setting('DateStyle')"
    async with start() as daemon:
        code, out, err = await run_psql(daemon.dsn(), show, env)
        assert (code, out.strip()) == (0, "Asia/Kathmandu | German, DMY"), err

        direct_dsn = neon_edge.conninfo(
            MAIN, user=TEST_ROLE, password=TEST_PASSWORD, ca_file=ca_file
        )
        code, out, err = await run_psql(direct_dsn, show, env)
        assert code == 0, err
        assert "Kathmandu" not in out
        assert "German" not in out  # what the daemon fixes: straight to the edge, both are lost


async def test_psycopg_options_and_a_folded_pgtz_both_reach_the_compute(
    start: StartDaemon, neon_edge: NeonEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's own ``options`` go first, as it wrote them; PGTZ follows as ``-c``."""
    monkeypatch.setenv("PGTZ", "Asia/Kathmandu")  # libpq sends it as a startup parameter
    options = r"-c search_path=pg_catalog,\ public -c statement_timeout=4321"
    async with (
        start() as daemon,
        await psycopg.AsyncConnection.connect(
            daemon.dsn(), options=options, application_name="edge-test"
        ) as conn,
    ):
        cur = await conn.execute(
            "SELECT current_setting('search_path'), current_setting('statement_timeout'), "
            "current_setting('application_name'), current_setting('TimeZone')"
        )
        assert await cur.fetchone() == (
            "pg_catalog, public",
            "4321ms",
            "edge-test",
            "Asia/Kathmandu",
        )
    sent = dict(neon_edge.relayed[-1].compute_params or [])
    assert sent["options"] == options + " -c timezone=Asia/Kathmandu"


NODE_DIR = Path(__file__).resolve().parents[1] / "node"
NODE = shutil.which("node")
NODE_MISSING = NODE is None or not (NODE_DIR / "node_modules" / "pg").is_dir()


@pytest.mark.skipif(NODE_MISSING, reason="node or node-postgres (tests/node) is not installed")
async def test_node_pg_statement_and_lock_timeouts_take_effect_through_the_edge(
    start: StartDaemon,
) -> None:
    """node-postgres sends statement_timeout and lock_timeout as startup parameters."""
    assert NODE is not None
    async with start() as daemon:
        options = {
            "client": {
                "host": "127.0.0.1", "port": daemon.port, "user": TEST_ROLE,
                "database": TEST_DATABASE, "statement_timeout": 4321, "lock_timeout": 1234,
            },
            "sql": "SELECT current_setting('statement_timeout') AS statement, "
            "current_setting('lock_timeout') AS lock",
        }  # fmt: skip
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "NODE_"))}
        proc = await asyncio.create_subprocess_exec(
            NODE, str(NODE_DIR / "query.js"), json.dumps(options),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean,
            cwd=NODE_DIR,
        )  # fmt: skip
        out, err = await proc.communicate()
    outcome = json.loads(out.decode().strip().splitlines()[-1])
    assert outcome["rows"] == [{"statement": "4321ms", "lock": "1234ms"}], err.decode()


# --- the edge's limits and refusals -----------------------------------------------------------

# Each passing refusal, and the SQLSTATE a client gets when it does not pass in time.
PASSING = {
    "too many connections": (TOO_MANY_CONNECTIONS, "53300"),
    "too many attempts": (TOO_MANY_CONNECTION_ATTEMPTS, "53300"),
    "no permit": (PERMIT_FAILED, "53300"),
    "compute unreachable": (COULD_NOT_CONNECT, "08001"),
}


@pytest.mark.parametrize("refusal_text", [text for text, _ in PASSING.values()], ids=list(PASSING))
async def test_a_passing_limit_is_retried_and_the_client_never_sees_it(
    start: StartDaemon, neon_edge: NeonEdge, refusal_text: str
) -> None:
    async with start() as daemon:
        neon_edge.fail_next(2, refusal_text)

        assert await branch_via(daemon) == "main"

    refused = [s.error for s in neon_edge.sessions if s.error is not None]
    assert refused == [refusal_text, refusal_text]
    assert len(neon_edge.relayed) == 1


@pytest.mark.parametrize(("refusal_text", "code"), list(PASSING.values()), ids=list(PASSING))
async def test_a_limit_that_lasts_reaches_the_client_with_postgresqls_code_and_neons_words(
    start: StartDaemon, neon_edge: NeonEdge, refusal_text: str, code: str
) -> None:
    async with start(extra=upstream(connect_timeout=1.5)) as daemon:
        neon_edge.fail_next(1000, refusal_text)
        began = time.monotonic()

        error = await refusal(daemon)

        assert time.monotonic() - began < 5
        assert error.sqlstate == code
        assert error.args[0] == (
            f'neonlocal: branch "main" ({neon_edge.hostname(MAIN)}:{neon_edge.port}): '
            + refusal_text
        )
    assert neon_edge.connect_count > 2  # retried within the budget first


async def test_a_relayed_login_is_retried_only_before_the_client_was_asked_to_authenticate(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    """The endpoint's connection limit comes before any authentication, so a relayed login
    (no password in the branch URL) is retried unseen; a wake limit comes after the client's
    own SCRAM proof, which cannot be replayed, so libpq gets 53300 with Neon's words, not a
    second SCRAM request ("duplicate SASL authentication request")."""
    async with start(password=None) as daemon:
        dsn = daemon.dsn(password=TEST_PASSWORD, sslmode="disable")
        neon_edge.fail_next(2, TOO_MANY_CONNECTIONS)

        assert await run_psql(dsn, "SELECT name FROM branch_info") == (0, "main\n", "")

        neon_edge.fail_next(1, TOO_MANY_CONNECTION_ATTEMPTS)
        code, _, err = await run_psql(dsn, "SELECT 1")

        assert code == 2
        assert f'FATAL:  neonlocal: branch "main" ({neon_edge.hostname(MAIN)}' in err
        assert err.rstrip().endswith(TOO_MANY_CONNECTION_ATTEMPTS)
    refused = [s.error for s in neon_edge.sessions if s.error is not None]
    assert refused == [TOO_MANY_CONNECTIONS] * 2 + [TOO_MANY_CONNECTION_ATTEMPTS]


@pytest.mark.parametrize(
    ("refusal_text", "code", "advice"),
    [
        (ENDPOINT_DISABLED, "08001", "enable the endpoint in the Neon console"),
        (ENDPOINT_UNAVAILABLE, "57P03", "check the project's quotas"),
    ],
    ids=["disabled", "unavailable"],
)
async def test_a_disabled_endpoint_is_said_at_once_with_what_to_do(
    start: StartDaemon, neon_edge: NeonEdge, refusal_text: str, code: str, advice: str
) -> None:
    async with start() as daemon:
        neon_edge.fail_next(1000, refusal_text)

        error = await refusal(daemon)

        assert error.sqlstate == code
        assert error.args[0].endswith(f"): {refusal_text}")
        assert error.hint is not None
        assert advice in error.hint
    assert neon_edge.connect_count == 1  # no retry: trying again cannot help


async def test_a_database_the_compute_does_not_have_is_3D000(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    async with start() as daemon:
        with pytest.raises(asyncpg.InvalidCatalogNameError) as caught:
            await asyncpg.connect(daemon.url(database="nope", sslmode="disable"))
    assert caught.value.args[0].endswith('): database "nope" does not exist')
    assert neon_edge.sessions[-1].error == 'database "nope" does not exist'  # XX000 upstream


async def test_a_startup_packet_the_edge_would_drop_is_refused_with_a_reason(
    start: StartDaemon, neon_edge: NeonEdge
) -> None:
    """The edge hangs up without a word on a StartupMessage over 10,000 bytes. This client's
    (about 6,000 bytes) grows past that once its spaces are escaped in ``options``."""
    search_path = "public," + " " * 6_000 + "pg_catalog"
    async with start() as daemon:
        error = await refusal(daemon, server_settings={"search_path": search_path})

        assert error.sqlstate == "08P01"
        assert error.args[0].startswith("neonlocal: the startup packet for this session would be")
        assert "Neon's edge accepts at most 10000" in error.args[0]
    assert neon_edge.connect_count == 0


# --- a pooled host ----------------------------------------------------------------------------


async def test_a_pooler_host_gets_settings_as_they_are_and_the_log_warns_once(
    start: StartDaemon, neon_edge: NeonEdge, capsys: pytest.CaptureFixture[str]
) -> None:
    """PgBouncer would not apply them anyway; folding them into options would make it refuse
    the connection, so the daemon behaves as a direct pooled connection does, and says so."""
    async with start(main=f"{MAIN}-pooler") as daemon:
        first = await settings_via_asyncpg(dsn=daemon.url(sslmode="disable"))
        await settings_via_asyncpg(dsn=daemon.url(sslmode="disable"))

    assert first[0] != "Pacific/Chatham"
    for session in neon_edge.relayed:
        assert session.endpoint == f"{MAIN}-pooler"
        assert "options" not in dict(session.compute_params or [])
    warnings = [
        line for line in capsys.readouterr().out.splitlines() if "pooler_ignores_parameters" in line
    ]
    assert len(warnings) == 1
    for name in SETTINGS:
        assert name in warnings[0]
