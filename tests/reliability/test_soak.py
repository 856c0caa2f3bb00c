"""pgbench through a real `neonlocal up` while `neonlocal use` flips the branch every second.

Two pgbench runs share the daemon: "steady" keeps its sessions for the whole run (they are
never told to terminate, so not one transaction may fail) and "churn" connects anew for every
transaction (-C), so sessions start all the time across the flips. A probe loop connects
on its own and checks that each new session lands on the branch selected when it connected,
by the data (``branch_info``) and by the ``neonlocal.branch`` ParameterStatus.

The duration is ``NEONLOCAL_SOAK_S`` seconds (default 60, what CI runs); a release run
sets it to several minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from fixtures.daemon import DaemonProcess, start_daemon_process, write_config
from fixtures.pg import TEST_DATABASE, TEST_ROLE, MakeCompute
from neonlocal.localpg import LocalCompute
from reliability.conftest import Figures
from reliability.measure import proc_rss_kib, process_env

pytestmark = [pytest.mark.reliability, pytest.mark.pg]

SOAK_S = float(os.environ.get("NEONLOCAL_SOAK_S", "60"))
FLIP_EVERY_S = 1.0
PROBE_EVERY_S = 0.05
# After this long the daemon has built what it keeps (TLS contexts, SCRAM keys, pools of
# Python objects): RSS is measured from here.
WARMUP_S = min(5.0, SOAK_S / 4)
# Generous: the point is "no leak proportional to sessions", not a tight budget.
RSS_GROWTH_LIMIT_KIB = 64 * 1024
COMPUTES = {"a": "soak-a", "b": "soak-b"}


def pgbench_init(compute: LocalCompute) -> None:
    """pgbench's tables, owned by the role clients log in as (over the trusted Unix socket)."""
    subprocess.run(
        [
            str(compute.bindir / "pgbench"),
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            str(compute.socket_dir),
            "-p",
            str(compute.spec.port),
            "-U",
            TEST_ROLE,
            TEST_DATABASE,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
def soak_computes(make_compute: MakeCompute) -> dict[str, LocalCompute]:
    made = {}
    for branch, name in COMPUTES.items():
        made[branch] = make_compute(name, items=(name,))
        pgbench_init(made[branch])
    return made


@pytest.fixture
def up(
    workdir: Path, soak_computes: dict[str, LocalCompute], ca_file: Path
) -> Iterator[DaemonProcess]:
    config = write_config(
        workdir / "config.toml",
        {branch: c.url(ca_file=ca_file) for branch, c in soak_computes.items()},
        branch="a",
        # pgbench does not reconnect: its sessions stay on their branch across the flips.
        extra='unix_socket_dir = ""\n\n[switch]\nsessions = "keep"',
    )
    daemon = start_daemon_process(config, process_env(workdir), log_level="info")
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


@dataclass
class Selection:
    """What `neonlocal use` last confirmed; ``switching`` while a flip is under way."""

    branch: str = "a"
    generation: int = 0
    switching: bool = False
    flips: int = 0
    flip_failures: list[str] = field(default_factory=list)

    def snapshot(self) -> tuple[int, bool]:
        return self.generation, self.switching


@dataclass
class Probes:
    sessions: int = 0
    # Connected while a flip was under way: either branch is right.
    during_flip: int = 0
    wrong: list[str] = field(default_factory=list)


async def finish(proc: asyncio.subprocess.Process) -> bytes:
    """Its output once it exits; killed if we stop waiting (a failed or timed-out test)."""
    try:
        out, _ = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return out


async def flip_branches(up: DaemonProcess, selection: Selection, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        began = loop.time()
        target = "b" if selection.branch == "a" else "a"
        selection.switching = True
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "neonlocal",
            "--config",
            str(up.config_path),
            "use",
            target,
            env=up.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out = await finish(proc)
        if proc.returncode == 0:
            selection.branch = target
            selection.flips += 1
        else:
            selection.flip_failures.append(out.decode(errors="replace"))
        selection.generation += 1
        selection.switching = False
        pause = FLIP_EVERY_S - (loop.time() - began)
        if pause > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)


async def probe_sessions(
    dsn: str, selection: Selection, probes: Probes, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        before = selection.snapshot()
        expected = selection.branch
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            after = selection.snapshot()
            announced = conn.info.parameter_status("neonlocal.branch")
            cur = await conn.execute("SELECT name FROM branch_info")
            row = await cur.fetchone()
        probes.sessions += 1
        served = next((b for b, name in COMPUTES.items() if row == (name,)), f"unknown {row}")
        if announced != served:
            probes.wrong.append(f"ParameterStatus says {announced}, data says {served}")
        if before == after and not before[1]:
            if served != expected:
                probes.wrong.append(f"selected {expected}, landed on {served}")
        else:
            probes.during_flip += 1
        await asyncio.sleep(PROBE_EVERY_S)


@dataclass(frozen=True)
class BenchResult:
    returncode: int
    processed: int
    failed: int
    output: str


async def pgbench(compute: LocalCompute, port: int, *extra: str) -> BenchResult:
    env = {**os.environ, "PGSSLMODE": "disable", "PGAPPNAME": "soak"}
    proc = await asyncio.create_subprocess_exec(
        str(compute.bindir / "pgbench"),
        "-n",
        "-S",
        "-T",
        str(max(1, round(SOAK_S))),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-U",
        TEST_ROLE,
        *extra,
        TEST_DATABASE,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = await finish(proc)
    text = out.decode(errors="replace")
    processed = re.search(r"number of transactions actually processed: (\d+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    return BenchResult(
        proc.returncode if proc.returncode is not None else -1,
        int(processed.group(1)) if processed else 0,
        int(failed.group(1)) if failed else -1,
        text,
    )


# pytest's default timeout is for ordinary tests; the soak runs as long as it is told to.
@pytest.mark.timeout(SOAK_S + 240)
async def test_pgbench_survives_a_branch_flip_every_second(
    up: DaemonProcess, soak_computes: dict[str, LocalCompute], figures: Figures
) -> None:
    status = await asyncio.to_thread(up.status)
    port = int(status["listen"][0].rsplit(":", 1)[1])
    dsn = f"host=127.0.0.1 port={port} user={TEST_ROLE} dbname={TEST_DATABASE} sslmode=disable"
    pid = up.proc.pid
    selection, probes, stop = Selection(), Probes(), asyncio.Event()
    any_compute = soak_computes["a"]

    steady = asyncio.ensure_future(pgbench(any_compute, port, "-c", "2", "-j", "1"))
    churn = asyncio.ensure_future(pgbench(any_compute, port, "-C", "-c", "2", "-j", "1"))
    flipper = asyncio.ensure_future(flip_branches(up, selection, stop))
    prober = asyncio.ensure_future(probe_sessions(dsn, selection, probes, stop))
    tasks = [steady, churn, flipper, prober]
    rss_samples: list[int] = []

    async def sample_rss() -> None:
        # Four samples show the curve: a leak climbs steadily, a high-water mark levels off.
        for _ in range(4):
            await asyncio.sleep((SOAK_S - WARMUP_S) / 4)
            rss_samples.append(proc_rss_kib(pid))

    try:
        await asyncio.sleep(WARMUP_S)
        rss_start = proc_rss_kib(pid)
        tasks.append(asyncio.ensure_future(sample_rss()))
        async with asyncio.timeout(SOAK_S + 60):
            steady_result, churn_result = await asyncio.gather(steady, churn)
        stop.set()
        await asyncio.gather(flipper, prober)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
    rss_end = proc_rss_kib(pid)
    final = await asyncio.to_thread(up.status)

    for name, result in (("steady", steady_result), ("churn", churn_result)):
        assert result.returncode == 0, f"pgbench {name}:\n{result.output}"
        assert result.failed == 0, f"pgbench {name}:\n{result.output}"
        assert result.processed > 0, f"pgbench {name}:\n{result.output}"
        assert "aborted" not in result.output, f"pgbench {name}:\n{result.output}"
    assert selection.flip_failures == []
    assert selection.flips >= SOAK_S / FLIP_EVERY_S / 2
    assert probes.wrong == []
    assert probes.sessions > probes.during_flip
    assert rss_end - rss_start < RSS_GROWTH_LIMIT_KIB
    figures.record(
        duration_s=SOAK_S,
        flips=selection.flips,
        steady_transactions=steady_result.processed,
        churn_transactions=churn_result.processed,
        failed_transactions=steady_result.failed + churn_result.failed,
        probe_sessions=probes.sessions,
        probe_sessions_during_a_flip=probes.during_flip,
        wrong_branch=len(probes.wrong),
        sessions_total=final["sessions_total"],
        rss_kib_start=rss_start,
        rss_kib_samples=rss_samples,
        rss_kib_end=rss_end,
    )
