"""A branch as it was at a past moment (`main@-1h`, `main@<RFC 3339>`, `main@<LSN>`) through
the API stand-in, served by a real daemon onto real PostgreSQL computes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from fixtures.daemon import LocalDaemon, daemon_env, neonlocal_cmd, running_daemon, toml_string
from fixtures.pg import TEST_PASSWORD
from neon_standin import FakeBranch, NeonStandIn
from neonlocal.localpg import LocalCompute

pytestmark = pytest.mark.pg


@pytest.fixture
def standin(compute_main: LocalCompute, compute_dev: LocalCompute) -> Iterator[NeonStandIn]:
    """main on the main compute; branches created through the API land on the dev one."""
    with NeonStandIn(main_host=compute_main.spec.hostname, password=TEST_PASSWORD) as api:
        api.host_factory = lambda _name: compute_dev.spec.hostname
        yield api


def write_config(
    workdir: Path,
    standin: NeonStandIn,
    ca_file: Path,
    computes: dict[str, LocalCompute],
    *,
    ports: dict[int, str] | None = None,
) -> Path:
    lines = ['branch = "main"', "[listen]", 'host = ["127.0.0.1"]', "port = 0"]
    lines += ['unix_socket_dir = ""', "[neon]", f"project_id = {toml_string(standin.project_id)}"]
    lines += [f"api_url = {toml_string(standin.base_url)}"]
    lines += [f"sslrootcert = {toml_string(str(ca_file))}", "[network.resolve]"]
    for compute in computes.values():
        lines.append(
            f"{toml_string(compute.spec.hostname)} = {toml_string(compute.spec.listen_addr)}"
        )
    if ports:
        lines += ["[ports]", *(f"{port} = {toml_string(name)}" for port, name in ports.items())]
    path = workdir / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def moments(standin: NeonStandIn) -> list[FakeBranch]:
    return [b for b in standin.project().branches.values() if "@" in b.name]


async def branch_via(daemon: LocalDaemon) -> str:
    url = daemon.url(sslmode="disable")
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT name FROM branch_info")
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])


async def until_gone(standin: NeonStandIn, name: str) -> None:
    async with asyncio.timeout(10):
        while standin.has_branch(name):  # noqa: ASYNC110 - the stand-in runs in a thread
            await asyncio.sleep(0.05)


async def test_main_an_hour_ago_is_created_served_and_deleted_on_switching_away(
    workdir: Path, standin: NeonStandIn, ca_file: Path, computes: dict[str, LocalCompute]
) -> None:
    config = write_config(workdir, standin, ca_file, computes)
    env = {**daemon_env(workdir), "NEON_API_KEY": standin.api_key}
    async with running_daemon(config, env) as daemon:
        before = datetime.now(UTC)
        reply = await daemon.use("main@-1h")
        assert reply["ok"], reply

        [made] = moments(standin)
        assert made.parent_id == standin.branch("main").id
        assert made.parent_timestamp is not None
        when = datetime.fromisoformat(made.parent_timestamp.replace("Z", "+00:00"))
        assert abs(when - (before - timedelta(hours=1))) < timedelta(seconds=5)
        assert made.name == f"main@{when:%Y-%m-%dT%H:%M:%SZ}"
        assert made.expires_at is not None
        expires = datetime.fromisoformat(made.expires_at.replace("Z", "+00:00"))
        assert timedelta(hours=3, minutes=59) < expires - before <= timedelta(hours=4, seconds=5)
        assert made.annotations["purpose"] == "point-in-time"
        assert await branch_via(daemon) == "dev"  # the compute its host leads to
        assert daemon.status()["branch"] == "main@-1h"

        await daemon.use("main")
        await until_gone(standin, made.name)
        assert await branch_via(daemon) == "main"


async def test_a_moment_by_lsn_and_by_timestamp_starts_from_that_point(
    workdir: Path, standin: NeonStandIn, ca_file: Path, computes: dict[str, LocalCompute]
) -> None:
    config = write_config(workdir, standin, ca_file, computes)
    env = {**daemon_env(workdir), "NEON_API_KEY": standin.api_key}
    at = (datetime.now(UTC) - timedelta(minutes=30)).replace(microsecond=0)
    stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    async with running_daemon(config, env) as daemon:
        assert (await daemon.use("main@0/1de2850"))["ok"]
        assert [(b.name, b.parent_lsn) for b in moments(standin)] == [
            ("main@0/1DE2850", "0/1DE2850")
        ]
        assert (await daemon.use(f"main@{stamp}"))["ok"]
        await until_gone(standin, "main@0/1DE2850")
        assert [(b.name, b.parent_timestamp) for b in moments(standin)] == [
            (f"main@{stamp}", stamp)
        ]
        created = standin.requests_to("create_branch")[-1].body["branch"]
        assert set(created) == {"name", "parent_id", "expires_at", "parent_timestamp"}


async def test_a_moment_outside_the_history_window_says_what_the_window_is(
    workdir: Path, standin: NeonStandIn, ca_file: Path, computes: dict[str, LocalCompute]
) -> None:
    config = write_config(workdir, standin, ca_file, computes)
    env = {**daemon_env(workdir), "NEON_API_KEY": standin.api_key}
    async with running_daemon(config, env) as daemon:
        reply = await daemon.use("main@-2d")

        assert not reply["ok"]
        assert (
            "is outside the project's history window (24 hours: nothing before" in (reply["error"])
        )
        assert moments(standin) == []
        assert daemon.status()["branch"] == "main"


async def test_a_pinned_moment_lives_as_long_as_its_port(
    workdir: Path, standin: NeonStandIn, ca_file: Path, computes: dict[str, LocalCompute]
) -> None:
    from test_pinned_ports import free_port

    port = free_port()
    config = write_config(workdir, standin, ca_file, computes, ports={port: "main@-12h"})
    env = {**daemon_env(workdir), "NEON_API_KEY": standin.api_key}
    async with running_daemon(config, env) as daemon:
        [made] = moments(standin)
        assert daemon.status()["ports"][0]["branch"] == "main@-12h"
        write_config(workdir, standin, ca_file, computes)
        assert (await daemon.daemon.handle_control({"op": "reload"}))["ok"]
        await until_gone(standin, made.name)


async def test_moments_made_by_the_daemon_are_deleted_when_it_stops(
    workdir: Path, standin: NeonStandIn, ca_file: Path, computes: dict[str, LocalCompute]
) -> None:
    config = write_config(workdir, standin, ca_file, computes)
    env = {**daemon_env(workdir), "NEON_API_KEY": standin.api_key}
    async with running_daemon(config, env) as daemon:
        assert (await daemon.use("main@-10m"))["ok"]
        [made] = moments(standin)
    assert not standin.has_branch(made.name)


async def test_use_of_a_moment_with_no_daemon_creates_nothing_and_says_when_it_will_be(
    workdir: Path, standin: NeonStandIn, ca_file: Path, computes: dict[str, LocalCompute]
) -> None:
    config = write_config(workdir, standin, ca_file, computes)
    env = {**daemon_env(workdir), "NEON_API_KEY": standin.api_key}
    proc = await asyncio.create_subprocess_exec(
        *neonlocal_cmd("--config", str(config), "use", "main@-1h"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)

    assert proc.returncode == 0, err
    assert out.decode().strip().endswith("branch = main@-1h; the daemon is not running")
    assert "main@-1h: a branch of main as it was then, made when the daemon serves it" in (
        err.decode()
    )
    assert 'branch = "main@-1h"' in config.read_text()
    assert moments(standin) == []
