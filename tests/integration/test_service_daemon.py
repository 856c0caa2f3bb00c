"""`neonlocal up` as a service manager runs it: a real process, real signals, real sockets.

Socket activation hands the daemon a pre-bound listener (LISTEN_FDS), readiness and reloads
are announced on a real NOTIFY_SOCKET datagram socket, SIGTERM drains live sessions up to
``shutdown_deadline`` and ends the rest with 57P01, SIGHUP reloads, and a second SIGINT does
not wait. Logs of a daemon whose stdout is not a terminal are JSON lines.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fixtures import rawpg
from fixtures.daemon import (
    DaemonProcess,
    LocalDaemon,
    daemon_env,
    neonlocal_cmd,
    start_daemon_process,
    write_config,
)
from fixtures.net import free_port
from fixtures.pg import TEST_PASSWORD
from neonlocal.config.file import switch_branch
from neonlocal.daemon import Daemon

WAIT_S = 20.0  # upper bound for anything the daemon should do promptly; never reached when well

# Variables a service manager sets; a test run under systemd must not leak its own.
_MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS")


def service_env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in daemon_env(workdir).items() if k not in _MANAGER_VARIABLES}
    env.update(extra)
    return env


def unused_url(name: str) -> str:
    """A branch URL that is never connected to (the test opens no session to it)."""
    return (
        f"postgresql://neondb_owner:{TEST_PASSWORD}@ep-{name}-700007.us-east-2.aws.neon.tech:"
        f"{free_port()}/neondb?hostaddr=127.0.0.1"
    )


def log_events(proc: DaemonProcess) -> list[dict[str, Any]]:
    """The daemon's log, which must be JSON lines since its stdout is a file."""
    return [json.loads(line) for line in proc.log().splitlines() if line.strip()]


def wait_for_event(proc: DaemonProcess, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for event in log_events(proc):
            if match(event):
                return event
        if proc.proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"no such log event; log:\n{proc.log()}")


def exit_code(proc: DaemonProcess) -> int:
    try:
        return proc.proc.wait(WAIT_S)
    except subprocess.TimeoutExpired:
        proc.proc.kill()
        raise


@pytest.fixture
def cleanup() -> Iterator[list[DaemonProcess]]:
    """Daemon processes a test started; killed if the test left them running."""
    procs: list[DaemonProcess] = []
    yield procs
    for proc in procs:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


# --- socket activation --------------------------------------------------------------------------


def activated_daemon(
    config: Path, env: Mapping[str, str], redirect: str, pass_fds: tuple[int, ...] = ()
) -> DaemonProcess:
    """`neonlocal up` started as systemd starts it: ``redirect`` puts a descriptor at 3,
    LISTEN_FDS=1, and LISTEN_PID names the daemon's own PID (exec keeps the shell's).

    bash, not sh: dash cannot redirect descriptors above 9.
    """
    log_path = config.parent / "daemon.log"
    with log_path.open("w") as log:
        popen = subprocess.Popen(
            ["bash", "-c", f'export LISTEN_PID=$$; exec "$@" {redirect}', "bash",
             *neonlocal_cmd("--config", str(config), "up")],
            env={**env, "LISTEN_FDS": "1"},
            stdout=log, stderr=subprocess.STDOUT, text=True, pass_fds=pass_fds,
        )  # fmt: skip
    return DaemonProcess(popen, config, dict(env), log_path)


@pytest.mark.pg
async def test_socket_activated_daemon_serves_on_the_inherited_socket(
    workdir: Path, branch_urls: dict[str, str], cleanup: list[DaemonProcess]
) -> None:
    with (
        # The configured port is taken: binding it would fail, so serving proves adoption.
        socket.create_server(("127.0.0.1", 0)) as taken,
        socket.create_server(("127.0.0.1", 0)) as listener,
    ):
        port = listener.getsockname()[1]
        config = write_config(
            workdir / "config.toml", branch_urls, branch="main", port=taken.getsockname()[1]
        )
        # Above 3, so that `3<&N` copies it rather than clobbering it.
        fd = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
        try:
            proc = activated_daemon(config, service_env(workdir), f"3<&{fd} {fd}<&-", (fd,))
        finally:
            os.close(fd)
        cleanup.append(proc)
        listener.close()  # the daemon holds the only copy now, as after systemd's fork

        status = await asyncio.to_thread(proc.wait_ready)
        assert status["listen"] == [f"127.0.0.1:{port}"]
        url = f"postgresql://neondb_owner@127.0.0.1:{port}/neondb"
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT name FROM branch_info")
            assert await cur.fetchone() == ("main",)
        proc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(exit_code, proc) == 0


def test_unusable_inherited_descriptor_is_one_line_and_exit_1(workdir: Path) -> None:
    config = write_config(workdir / "config.toml", {"idle": unused_url("idle")}, branch="idle")
    proc = activated_daemon(config, service_env(workdir), "3</dev/null")
    assert exit_code(proc) == 1
    assert proc.log().splitlines() == [
        "neonlocal: socket activation: inherited descriptor 3 is not a usable socket: "
        "Socket operation on non-socket"
    ]


# --- readiness, reload, watchdog and stop over NOTIFY_SOCKET -------------------------------------


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET: one datagram per notification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(WAIT_S)
        self.seen: list[dict[str, str]] = []

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        assert data.endswith("\n"), data
        message = dict(line.split("=", 1) for line in data.splitlines())
        self.seen.append(message)
        return message

    def until(self, key: str) -> dict[str, str]:
        """The next message carrying ``key`` (watchdog pings and others in between pass)."""
        while True:
            message = self.next()
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(workdir: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(workdir / "notify.sock")
    yield listener
    listener.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_service_manager_hears_ready_reloads_watchdog_and_stopping(
    workdir: Path, notify: NotifyListener, cleanup: list[DaemonProcess]
) -> None:
    port = free_port()
    branches = {"main": unused_url("main"), "dev": unused_url("dev")}
    config = write_config(workdir / "config.toml", branches, branch="main", port=port)
    env = service_env(workdir, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000")
    proc = start_daemon_process(config, env, log_level="info")
    cleanup.append(proc)

    ready = notify.until("READY")
    # READY=1 means clients can connect now, and it names what they will reach.
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S):
        pass
    assert ready == {"READY": "1", "STATUS": f"serving main ({branches_host('main', branches)})"}
    assert notify.until("WATCHDOG") == {"WATCHDOG": "1"}

    # SIGHUP reloads even an unchanged file, announced as systemd >= 253 expects.
    before = monotonic_usec()
    proc.proc.send_signal(signal.SIGHUP)
    reloading = notify.until("RELOADING")
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    assert notify.until("READY")["STATUS"].startswith("serving main ")
    wait_for_event(proc, lambda e: e["event"] == "config_reloaded" and e["reason"] == "SIGHUP")

    # An edit then SIGHUP: the new branch is served and the status line says so.
    switch_branch(config, "dev")
    proc.proc.send_signal(signal.SIGHUP)
    wait_for_event(
        proc,
        lambda e: (
            e["event"] == "config_reloaded" and e["reason"] == "SIGHUP" and e["branch"] == "dev"
        ),
    )
    assert proc.status()["branch"] == "dev"
    while (message := notify.until("READY"))["STATUS"].startswith("serving main "):
        pass
    assert message["STATUS"] == f"serving dev ({branches_host('dev', branches)})"

    proc.proc.send_signal(signal.SIGTERM)
    assert notify.until("STOPPING")["STOPPING"] == "1"
    assert exit_code(proc) == 0
    events = [e["event"] for e in log_events(proc)]
    assert events[0] == "daemon_started"
    assert events[-3:] == ["signal_received", "daemon_stopping", "daemon_stopped"]


def branches_host(name: str, branches: Mapping[str, str]) -> str:
    """``host:port`` of a branch URL made by ``unused_url``, as the daemon describes it."""
    return branches[name].split("@", 1)[1].split("/", 1)[0]


# --- SIGTERM drains, second SIGINT does not wait -------------------------------------------------


@pytest.mark.pg
async def test_sigterm_lets_sessions_finish_until_the_deadline_then_ends_the_rest(
    workdir: Path, branch_urls: dict[str, str], cleanup: list[DaemonProcess]
) -> None:
    config = write_config(workdir / "config.toml", branch_urls, branch="main")
    config.write_text("shutdown_deadline = 1.5\n" + config.read_text())
    proc = start_daemon_process(config, service_env(workdir), log_level="info")
    cleanup.append(proc)
    status = await asyncio.to_thread(proc.wait_ready)
    port = int(status["listen"][0].rsplit(":", 1)[1])
    url = f"postgresql://neondb_owner@127.0.0.1:{port}/neondb"

    finishing = await psycopg.AsyncConnection.connect(url)
    lingering = await psycopg.AsyncConnection.connect(url)
    psql = await asyncio.create_subprocess_exec(
        "psql", "--no-psqlrc", "-qAt", "-c", "SELECT pg_sleep(0.5), 'psql done'", url,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    async with rawpg.raw_client("127.0.0.1", port) as raw:
        await raw.send(rawpg.startup({"user": "neondb_owner", "database": "neondb"}))
        await raw.read_until(b"Z")
        while (await asyncio.to_thread(proc.status))["sessions"].get("main") != 4:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # psql is connecting

        query = asyncio.create_task(finishing.execute("SELECT pg_sleep(0.5), 'query done'"))
        proc.proc.send_signal(signal.SIGTERM)
        # Sessions open before SIGTERM finish their work...
        cur = await query
        assert await cur.fetchone() == ("", "query done")
        await finishing.close()
        out, err = await psql.communicate()
        assert psql.returncode == 0, err.decode()
        assert out.decode().strip() == "|psql done"
        # ...while nobody new gets in.
        await asyncio.to_thread(wait_until_refused, port)

        # Past the deadline the ones still open are ended with 57P01.
        error = await raw.read_error()
        assert (error.sqlstate, error.message) == ("57P01", "neonlocal is shutting down")
        assert error.severity == "FATAL"
    with pytest.raises(psycopg.errors.AdminShutdown, match="neonlocal is shutting down"):
        await lingering.execute("SELECT 1")
    await lingering.close()

    assert await asyncio.to_thread(exit_code, proc) == 0
    events = log_events(proc)
    stopping = next(e for e in events if e["event"] == "daemon_stopping")
    assert stopping["deadline_s"] == 1.5
    closed = [e["reason"] for e in events if e["event"] == "session_closed"]
    assert len(closed) == 4
    assert closed.count("shutdown") == 2  # the raw client and `lingering`
    # Both were idle: ending them needs no cancel request to the branch.
    assert not [e for e in events if e["event"].startswith("cancel")]
    assert events[-1]["event"] == "daemon_stopped"


def wait_until_refused(port: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S):
                pass
        except ConnectionRefusedError:
            return
        time.sleep(0.02)
    raise AssertionError(f"127.0.0.1:{port} still accepts connections")


def test_second_sigint_exits_at_once_without_draining(
    workdir: Path, cleanup: list[DaemonProcess]
) -> None:
    """With a session open and the default 30 s deadline, a second Ctrl-C ends it now."""
    config = write_config(workdir / "config.toml", {"idle": unused_url("idle")}, branch="idle")
    proc = start_daemon_process(config, service_env(workdir), log_level="info")
    cleanup.append(proc)
    status = proc.wait_ready()
    port = int(status["listen"][0].rsplit(":", 1)[1])
    # A client halfway through its startup packet is a session the drain would wait for.
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as client:
        client.sendall(rawpg.startup({"user": "neondb_owner"})[:4])
        wait_for_event(proc, lambda e: e["event"] == "daemon_started")
        proc.proc.send_signal(signal.SIGINT)
        wait_for_event(proc, lambda e: e["event"] == "daemon_stopping")
        assert proc.proc.poll() is None  # draining, as the first Ctrl-C asked
        proc.proc.send_signal(signal.SIGINT)
        assert exit_code(proc) == 130
    assert log_events(proc)[-1]["event"] == "forced_exit"


# --- signal handlers are the embedder's again after run() ---------------------------------------


async def test_run_restores_the_signal_handlers_it_replaced(workdir: Path) -> None:
    config = write_config(workdir / "config.toml", {"idle": unused_url("idle")}, branch="idle")
    received: list[int] = []

    def ours(signum: int, _frame: object) -> None:
        received.append(signum)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    saved = {sig: signal.getsignal(sig) for sig in handled}
    try:
        for sig in handled:
            signal.signal(sig, ours)
        daemon = Daemon(config, service_env(workdir))
        run = asyncio.create_task(daemon.run())
        async with asyncio.timeout(WAIT_S):
            while signal.getsignal(signal.SIGHUP) is ours:  # noqa: ASYNC110 - run() installs
                await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the daemon, which stops
        async with asyncio.timeout(WAIT_S):
            await run
        assert received == []
        assert [signal.getsignal(sig) for sig in handled] == [ours, ours, ours]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


async def test_service_status_shows_the_branch_the_running_daemon_serves(
    daemon: LocalDaemon,
) -> None:
    """`neonlocal service status` asks the daemon itself which branch it serves."""
    from neonlocal.cli.service import daemon_status_lines

    lines = await asyncio.to_thread(daemon_status_lines, daemon.config_path, daemon.env)
    assert lines[0] == "branch: main (ep-main-100001.us-east-2.aws.neon.tech:5432)"
    assert lines[1] == "sessions: none"
