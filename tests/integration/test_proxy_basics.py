"""A client on localhost reaches the selected branch over verified TLS, with any driver."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path

import asyncpg
import psycopg
import pytest
import sqlalchemy

from fixtures.daemon import LocalDaemon, branch_of, daemon_env, running_daemon, write_config
from fixtures.pg import TEST_PASSWORD
from fixtures.sni import SniRecorder
from neonlocal.localpg import LocalCompute

pytestmark = pytest.mark.pg


async def test_psycopg_reaches_the_selected_branch(daemon: LocalDaemon) -> None:
    async with await psycopg.AsyncConnection.connect(daemon.url()) as conn:
        assert await branch_of(conn) == "main"
        assert conn.info.parameter_status("neonlocal.branch") == "main"


async def test_upstream_session_is_tls_with_a_channel_bound_scram_login(
    daemon: LocalDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon logs in with SCRAM-SHA-256-PLUS (tls-server-end-point) over TLS."""
    async with await psycopg.AsyncConnection.connect(daemon.url()) as conn:
        cur = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert await cur.fetchone() == (True,)
    out = capsys.readouterr().out
    ready = next(line for line in out.splitlines() if "session_ready" in line)
    assert "auth=SCRAM-SHA-256-PLUS" in ready
    assert "channel_binding=True" in ready
    # How long the client waited for its session (a waking compute shows up here).
    waited = re.search(r"ready_s=([0-9.]+)", ready)
    assert waited is not None
    assert 0 < float(waited.group(1)) < 30


async def test_asyncpg_sees_the_branch_and_its_data(daemon: LocalDaemon) -> None:
    conn = await asyncpg.connect(daemon.url())
    try:
        assert await conn.fetchval("SELECT name FROM branch_info") == "main"
        labels = await conn.fetch("SELECT label FROM items ORDER BY id")
        assert [r["label"] for r in labels] == ["apple", "banana"]
        assert conn.get_server_pid() != 0
    finally:
        await conn.close()


async def test_psql_runs_queries_through_the_daemon(daemon: LocalDaemon) -> None:
    proc = await asyncio.create_subprocess_exec(
        "psql", "--no-psqlrc", "-qAt", "-c", "SELECT name FROM branch_info", daemon.url(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "main"


async def test_sqlalchemy_pool_with_pre_ping_as_in_a_fastapi_app(daemon: LocalDaemon) -> None:
    url = daemon.url().replace("postgresql://", "postgresql+psycopg://")

    def app_requests() -> list[str]:
        engine = sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=2)
        try:
            seen = []
            for _ in range(5):
                with engine.connect() as conn:
                    seen.append(
                        conn.execute(sqlalchemy.text("SELECT name FROM branch_info")).scalar_one()
                    )
            return seen
        finally:
            engine.dispose()

    assert await asyncio.to_thread(app_requests) == ["main"] * 5


async def test_large_copy_out_and_in_stream_through(daemon: LocalDaemon) -> None:
    """COPY of ~20 MB each way arrives complete (backpressure, no truncation)."""
    async with await psycopg.AsyncConnection.connect(daemon.url()) as conn:
        total = 0
        async with conn.cursor().copy(
            "COPY (SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g) TO STDOUT"
        ) as copy:
            async for chunk in copy:
                total += len(chunk)
        assert total > 20_000_000
        await conn.execute("CREATE TEMP TABLE sink (n int, t text)")
        row = b"%d\t" + b"y" * 200 + b"\n"
        async with conn.cursor().copy("COPY sink FROM STDIN") as copy:
            for n in range(100_000):
                await copy.write(row % n)
        cur = await conn.execute("SELECT count(*), sum(length(t)) FROM sink")
        assert await cur.fetchone() == (100_000, 20_000_000)


async def test_without_a_password_in_the_url_the_clients_own_scram_is_relayed(
    workdir: Path, compute_main: LocalCompute, ca_file: Path
) -> None:
    """The daemon never learns the password: the client proves it to the server itself."""
    url = compute_main.url(ca_file=ca_file, password=False)
    config = write_config(workdir / "config.toml", {"main": url}, branch="main")
    async with running_daemon(config, daemon_env(workdir)) as d:
        async with await psycopg.AsyncConnection.connect(d.url(password=TEST_PASSWORD)) as conn:
            assert await branch_of(conn) == "main"
        proc = await asyncio.create_subprocess_exec(
            "psql", "--no-psqlrc", "-qAt", "-c", "SELECT name FROM branch_info", d.url(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PGPASSWORD": TEST_PASSWORD},
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == "main"
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(d.url(), password="wrong-password")


async def test_upstream_gets_the_branch_host_as_sni(
    workdir: Path, sni_recorder: SniRecorder, ca_file: Path
) -> None:
    host = "ep-sni-300003.us-east-2.aws.neon.tech"
    url = (
        f"postgresql://neondb_owner:pw@{host}:{sni_recorder.port}/neondb"
        f"?hostaddr={sni_recorder.host}&sslrootcert={ca_file}"
    )
    config = write_config(workdir / "config.toml", {"sni": url}, branch="sni")
    async with running_daemon(config, daemon_env(workdir)) as d:
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(d.url(), connect_timeout=5)
        hellos = sni_recorder.wait_for(1)
    assert sni_recorder.server_names[0] == host
    assert hellos[0].alpn == "postgresql"


async def test_status_counts_sessions_per_branch(daemon: LocalDaemon) -> None:
    async with await psycopg.AsyncConnection.connect(daemon.url()):
        status = daemon.status()
        assert status["branch"] == "main"
        assert status["sessions"] == {"main": 1}
        assert status["upstream_host"] == "ep-main-100001.us-east-2.aws.neon.tech:5432"
        json.dumps(status)
    for _ in range(50):
        if daemon.status()["sessions"] == {}:
            break
        await asyncio.sleep(0.02)
    assert daemon.status()["sessions"] == {}
