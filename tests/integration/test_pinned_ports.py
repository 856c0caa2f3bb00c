"""Pinned ports against real PostgreSQL: `[ports]` serves fixed branches beside the main port,
which keeps following `use`; ports open and close live with their lines in the file."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

import psycopg
import pytest

from fixtures.daemon import LocalDaemon, daemon_env, neonlocal_cmd, running_daemon, toml_string

pytestmark = pytest.mark.pg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write(
    path: Path,
    branch_urls: dict[str, str],
    ports: Mapping[int, str],
    *,
    branch: str = "dev",
    protect_main: bool = False,
) -> Path:
    lines = [f"branch = {toml_string(branch)}", "", "[listen]", 'host = ["127.0.0.1"]']
    lines += ["port = 0", 'unix_socket_dir = ""', "", "[ports]"]
    lines += [f"{port} = {toml_string(name)}" for port, name in ports.items()]
    for name, url in branch_urls.items():
        lines += ["", f"[branches.{name}]", f"url = {toml_string(url)}"]
        if name == "main" and protect_main:
            lines.append("protect = true")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def url(port: int) -> str:
    return f"postgresql://neondb_owner@127.0.0.1:{port}/neondb?sslmode=disable"


async def branch_on(port: int) -> str:
    async with await psycopg.AsyncConnection.connect(url(port)) as conn:
        return await branch_of(conn)


async def branch_of(conn: psycopg.AsyncConnection[tuple[str]]) -> str:
    cur = await conn.execute("SELECT name FROM branch_info")
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def use(daemon: LocalDaemon, name: str, *, write: bool = False) -> None:
    await daemon.use(name)
    if write:
        await daemon.daemon.handle_control({"op": "reload", "branch": name, "write": True})


async def reload(daemon: LocalDaemon) -> None:
    reply = await daemon.daemon.handle_control({"op": "reload"})
    assert reply["ok"], reply


async def test_a_pinned_port_keeps_its_branch_while_use_flips_the_main_port(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    pinned = free_port()
    config = write(workdir / "config.toml", branch_urls, {pinned: "main"})
    async with running_daemon(config, daemon_env(workdir)) as daemon:
        assert (await branch_on(daemon.port), await branch_on(pinned)) == ("dev", "main")
        async with await psycopg.AsyncConnection.connect(url(pinned)) as held:
            await use(daemon, "main")
            assert (await branch_on(daemon.port), await branch_on(pinned)) == ("main", "main")
            await use(daemon, "dev")
            assert (await branch_on(daemon.port), await branch_on(pinned)) == ("dev", "main")
            # A switch drains the main port's sessions on other branches, never a pinned one.
            assert await branch_of(held) == "main"
            assert held.info.parameter_status("neonlocal.branch") == "main"


async def test_status_lists_each_pinned_port_with_its_branch_and_sessions(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    pinned = free_port()
    config = write(workdir / "config.toml", branch_urls, {pinned: "main"})
    async with (
        running_daemon(config, daemon_env(workdir)) as daemon,
        await psycopg.AsyncConnection.connect(url(pinned)),
    ):
        [row] = daemon.status()["ports"]
        assert (row["port"], row["branch"], row["sessions"], row["error"]) == (
            pinned,
            "main",
            1,
            None,
        )
        assert row["listen"] == [f"127.0.0.1:{pinned}"]

        shown = await cli(config, daemon.env, "status")
        listed = await cli(config, daemon.env, "url", "--port", str(pinned))

    assert shown.returncode == 0, shown.stderr
    assert [line for line in shown.stdout.splitlines() if line.startswith("port ")] == [
        f"port {pinned}:  main ({row['upstream_host']}), 1 session"
    ]
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip().endswith(f"@localhost:{pinned}/neondb")


async def test_url_of_a_port_that_is_not_pinned_says_which_are(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    config = write(workdir / "config.toml", branch_urls, {6543: "main"})

    done = await cli(config, daemon_env(workdir), "url", "--port", "7000")

    assert done.returncode == 2
    assert done.stderr.strip() == "neonlocal: port 7000 is not in [ports] (pinned ports: 6543)"


async def test_ports_added_and_removed_in_the_file_open_and_close_live(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    first, second = free_port(), free_port()
    config = write(workdir / "config.toml", branch_urls, {first: "main"})
    async with running_daemon(config, daemon_env(workdir)) as daemon:
        write(config, branch_urls, {first: "main", second: "dev"})
        await reload(daemon)
        assert (await branch_on(first), await branch_on(second)) == ("main", "dev")

        held = await psycopg.AsyncConnection.connect(url(first))
        write(config, branch_urls, {second: "dev"})
        await reload(daemon)

        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(url(first), connect_timeout=2)
        # The idle session on the removed port was drained with 57P01.
        with pytest.raises(psycopg.errors.AdminShutdown):
            await held.execute("SELECT 1")
        await held.close()
        assert [row["port"] for row in daemon.status()["ports"]] == [second]
        assert await branch_on(second) == "dev"


async def test_a_port_pointed_at_another_branch_drains_its_sessions(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    pinned = free_port()
    config = write(workdir / "config.toml", branch_urls, {pinned: "main"})
    async with running_daemon(config, daemon_env(workdir)) as daemon:
        held = await psycopg.AsyncConnection.connect(url(pinned))
        write(config, branch_urls, {pinned: "dev"})
        await reload(daemon)

        assert await branch_on(pinned) == "dev"
        with pytest.raises(psycopg.errors.AdminShutdown):
            await held.execute("SELECT 1")
        await held.close()


async def test_a_pinned_protected_branch_stays_read_only_after_use_with_write(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    pinned = free_port()
    config = write(workdir / "config.toml", branch_urls, {pinned: "main"}, protect_main=True)
    async with running_daemon(config, daemon_env(workdir)) as daemon:
        await use(daemon, "main", write=True)
        async with (
            await psycopg.AsyncConnection.connect(url(pinned)) as on_pin,
            await psycopg.AsyncConnection.connect(url(daemon.port)) as on_main,
        ):
            assert on_pin.info.parameter_status("neonlocal.read_only") == "on"
            assert on_main.info.parameter_status("neonlocal.read_only") == "off"
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                await on_pin.execute("CREATE TEMP TABLE pinned_probe (x int)")


async def test_a_pinned_port_that_cannot_be_bound_is_reported_and_the_rest_serve(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = int(taken.getsockname()[1])
        config = write(workdir / "config.toml", branch_urls, {busy: "main"})
        async with running_daemon(config, daemon_env(workdir)) as daemon:
            [row] = daemon.status()["ports"]
            assert (row["port"], row["branch"], row["listen"]) == (busy, "main", [])
            assert row["error"] == (
                f"cannot listen on 127.0.0.1:{busy}: address already in use "
                "(a local PostgreSQL?); pin main to another port"
            )
            assert await branch_on(daemon.port) == "dev"
        taken.close()
        async with running_daemon(config, daemon_env(workdir)) as daemon:
            assert await branch_on(busy) == "main"


async def cli(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        neonlocal_cmd("--config", str(config), *args),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
