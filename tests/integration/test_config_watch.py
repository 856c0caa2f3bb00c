"""The daemon follows its config file: hand edits, editor saves, broken edits, SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest

from fixtures.daemon import (
    DaemonProcess,
    LocalDaemon,
    daemon_env,
    neonlocal_cmd,
    start_daemon_process,
    write_config,
)

pytestmark = pytest.mark.pg

# A switch normally lands in well under a second; the slack absorbs a busy 2-core machine.
SWITCH_BUDGET_S = 3.0


async def until(condition: Callable[[], bool], budget: float = SWITCH_BUDGET_S) -> bool:
    """Poll ``condition`` until it holds or ``budget`` seconds pass; whether it held."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def branch_via(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        name = await conn.fetchval("SELECT name FROM branch_info")
        assert isinstance(name, str)
        return name
    finally:
        await conn.close()


def edit_in_place(path: Path, text: str) -> None:
    """What `vim` with backupcopy=yes or `echo >` does: same inode, new content."""
    with path.open("r+") as handle:
        handle.truncate(0)
        handle.write(text)


def save_like_an_editor(path: Path, text: str) -> None:
    """Write a temp file beside the config and rename it over it."""
    temp = path.with_name(f".{path.name}.swp")
    temp.write_text(text)
    os.replace(temp, path)


def line_of(text: str, fragment: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if fragment in line)


async def test_a_hand_edit_of_branch_switches_new_sessions(daemon: LocalDaemon) -> None:
    config = daemon.config_path
    inode = config.stat().st_ino

    edit_in_place(config, config.read_text().replace('branch = "main"', 'branch = "dev"'))

    assert config.stat().st_ino == inode
    assert await until(lambda: daemon.status()["branch"] == "dev")
    assert await branch_via(daemon.url()) == "dev"


async def test_an_editor_save_by_rename_is_picked_up(daemon: LocalDaemon) -> None:
    config = daemon.config_path
    inode = config.stat().st_ino

    save_like_an_editor(config, config.read_text().replace('branch = "main"', 'branch = "dev"'))

    assert config.stat().st_ino != inode
    assert await until(lambda: daemon.status()["branch"] == "dev")
    assert await branch_via(daemon.url()) == "dev"
    # The watch survives the rename: a second save is seen too.
    save_like_an_editor(config, config.read_text().replace('branch = "dev"', 'branch = "main"'))
    assert await until(lambda: daemon.status()["branch"] == "main")


@pytest.mark.parametrize(
    ("good", "bad", "problem"),
    [
        ('branch = "main"', 'branch = "dev', "invalid TOML"),
        ('branch = "main"', 'branch = "nope"', 'unknown branch "nope"; known: dev, main'),
        ("port = 0", 'port = "x"', "listen.port"),
    ],
    ids=["bad-toml", "unknown-branch", "wrong-type"],
)
async def test_a_broken_edit_keeps_the_last_good_config_until_fixed(
    daemon: LocalDaemon,
    capsys: pytest.CaptureFixture[str],
    good: str,
    bad: str,
    problem: str,
) -> None:
    config = daemon.config_path
    original = config.read_text()
    where = f"{config}:{line_of(original, good)}:"

    edit_in_place(config, original.replace(good, bad))

    assert await until(lambda: daemon.status()["config_error"] is not None)
    status = daemon.status()
    assert status["config_error"].startswith(where)
    assert problem in status["config_error"]
    assert status["branch"] == "main"
    assert await branch_via(daemon.url()) == "main"
    rejected = [line for line in capsys.readouterr().out.splitlines() if "config_rejected" in line]
    assert rejected
    assert where in rejected[0]

    edit_in_place(config, original.replace('branch = "main"', 'branch = "dev"'))

    assert await until(lambda: daemon.status()["config_error"] is None)
    assert daemon.status()["branch"] == "dev"
    assert await branch_via(daemon.url()) == "dev"


# --- a real `neonlocal up` process ------------------------------------------------------------


@pytest.fixture
async def up(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[DaemonProcess]:
    """`neonlocal up` in its own process, serving "main" with "dev" configured."""
    config = write_config(workdir / "config.toml", branch_urls, branch="main")
    proc = start_daemon_process(config, daemon_env(workdir))
    try:
        await asyncio.to_thread(proc.wait_ready)
        yield proc
    finally:
        await asyncio.to_thread(proc.stop)
        print(proc.log())  # shown by pytest when the test fails


async def cli(proc: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        neonlocal_cmd("--config", str(proc.config_path), *args),
        env=proc.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def url_of(proc: DaemonProcess) -> str:
    address = proc.status()["listen"][0]
    return f"postgresql://neondb_owner@{address}/neondb"


def logged(proc: DaemonProcess, event: str) -> list[dict[str, object]]:
    """The daemon's JSON log records (not a TTY, so JSON) for ``event``."""
    records = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                records.append(record)
    return records


async def test_sighup_reloads_the_config(up: DaemonProcess) -> None:
    pid = up.status()["pid"]

    up.proc.send_signal(signal.SIGHUP)

    assert await until(
        lambda: any(r.get("reason") == "SIGHUP" for r in logged(up, "config_reloaded"))
    )
    assert up.status()["pid"] == pid
    assert await branch_via(url_of(up)) == "main"


async def test_an_emptied_file_is_a_broken_edit_not_an_empty_config(daemon: LocalDaemon) -> None:
    """A truncating save must not drop the selection: the daemon keeps serving main."""
    config = daemon.config_path
    original = config.read_text()

    edit_in_place(config, "")

    assert await until(lambda: daemon.status()["config_error"] is not None)
    assert daemon.status()["config_error"].startswith(f"{config}: the file is empty")
    assert daemon.status()["branch"] == "main"
    assert await branch_via(daemon.url()) == "main"
    edit_in_place(config, original)
    assert await until(lambda: daemon.status()["config_error"] is None)


async def test_status_shows_a_rejected_edit_with_file_and_line(up: DaemonProcess) -> None:
    config = up.config_path
    original = config.read_text()
    edit_in_place(config, original.replace("port = 0", 'port = "x"'))
    assert await until(lambda: up.status()["config_error"] is not None)

    human = await cli(up, "status")

    assert human.returncode == 0
    line = next(line for line in human.stdout.splitlines() if line.startswith("config:"))
    assert f"{config}:{line_of(original, 'port = 0')}: listen.port" in line
    assert "still serving the last good one" in line
    assert await branch_via(url_of(up)) == "main"


class RawSession:
    """A minimal protocol-3.0 client: logs in, then reports what the server sends unasked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = struct.pack("!i", 196608) + b"user\0neondb_owner\0database\0neondb\0\0"
        writer.write(struct.pack("!i", len(body) + 4) + body)
        session = cls(reader, writer)
        while (await session.message())[0] != b"Z":
            pass
        return session

    async def message(self) -> tuple[bytes, bytes]:
        head = await self.reader.readexactly(5)
        (length,) = struct.unpack("!i", head[1:])
        return head[:1], await self.reader.readexactly(length - 4)

    async def error_fields(self) -> dict[str, str]:
        kind, body = await self.message()
        assert kind == b"E", (kind, body)
        return {f[:1].decode(): f[1:].decode() for f in body.split(b"\0") if f}

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def test_use_terminate_ends_old_branch_sessions_with_57P01_and_spares_the_new(
    up: DaemonProcess, branch_urls: dict[str, str]
) -> None:
    """Idle and busy sessions on main end with FATAL 57P01 naming "dev"; dev's stay."""
    url = url_of(up)
    port = int(url.split(":")[2].split("/")[0])
    assert (await cli(up, "use", "dev")).returncode == 0
    on_dev = await asyncpg.connect(url)
    assert (await cli(up, "use", "main", "--keep")).returncode == 0
    idle = await RawSession.open(port)
    busy = await asyncpg.connect(url)
    # A lock held outside the daemon keeps `busy` inside a query until we let go.
    holder = await psycopg.AsyncConnection.connect(branch_urls["main"], autocommit=True)
    try:
        await holder.execute("SELECT pg_advisory_lock(4242)")
        query = asyncio.ensure_future(busy.fetchval("SELECT pg_advisory_lock(4242)::text"))

        async def busy_is_waiting() -> bool:
            cur = await holder.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
            return (await cur.fetchone()) == (1,)

        for _ in range(300):
            if await busy_is_waiting():
                break
            await asyncio.sleep(0.01)

        done = await cli(up, "use", "dev", "--terminate")

        assert done.returncode == 0, done.stderr
        assert "ended 2 sessions on main" in done.stdout
        fields = await idle.error_fields()
        assert (fields["S"], fields["C"]) == ("FATAL", "57P01")
        assert 'branch "dev"' in fields["M"]
        await holder.execute("SELECT pg_advisory_unlock(4242)")
        assert await query == ""  # the query in flight still gets its answer
        with pytest.raises(asyncpg.PostgresError) as info:
            await busy.fetchval("SELECT name FROM branch_info")
        # asyncpg reports "connection does not exist" and chains the server's error to it.
        error = info.value if info.value.sqlstate == "57P01" else info.value.__cause__
        assert isinstance(error, asyncpg.PostgresError)
        assert error.sqlstate == "57P01"
        assert 'branch "dev"' in str(error)
        assert await on_dev.fetchval("SELECT name FROM branch_info") == "dev"
        # The daemon counts a session until its sockets are closed, a moment after the error.
        assert await until(lambda: up.status()["sessions"] == {"dev": 1})
    finally:
        await holder.close()
        await idle.close()
        await busy.close()
        await on_dev.close()
