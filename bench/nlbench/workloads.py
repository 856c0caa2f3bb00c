"""What is measured over each path. Every function returns named numbers for one run."""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from nlbench.paths import ClientTarget, rss_kib
from nlbench.server import COPY_TABLE

_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


class WorkloadError(RuntimeError):
    pass


@dataclass(frozen=True)
class PgbenchRun:
    """One pgbench invocation: ``args`` go before the conninfo."""

    args: tuple[str, ...]

    def __call__(self, target: ClientTarget, seconds: int) -> float:
        return self.measure(target, seconds)[0]

    def measure(self, target: ClientTarget, seconds: int) -> tuple[float, int]:
        """(tps, transactions processed)."""
        argv = ["pgbench", "-n", *self.args, "-T", str(seconds), target.conninfo]
        out = subprocess.run(argv, capture_output=True, text=True, env=target.env(), check=False)
        if out.returncode != 0:
            raise WorkloadError(f"pgbench {' '.join(self.args)} over {target.path}: {out.stderr}")
        failed = _FAILED.search(out.stdout)
        if failed and int(failed.group(1)):
            raise WorkloadError(f"pgbench over {target.path}: {failed.group(0)}")
        match = _TPS.search(out.stdout)
        processed = _PROCESSED.search(out.stdout)
        if match is None or processed is None:
            raise WorkloadError(f"no tps in pgbench output over {target.path}: {out.stdout}")
        return float(match.group(1)), int(processed.group(1))


SELECT_ONLY = PgbenchRun(("-S", "-c", "8", "-j", "2"))
TPCB = PgbenchRun(("-c", "8", "-j", "2"))
CONNECT_PER_TX = PgbenchRun(("-S", "-C", "-c", "8", "-j", "2"))


def copy_out(target: ClientTarget, copy_bytes: int) -> float:
    """MB/s (10^6 bytes) of ``COPY bench_copy TO STDOUT`` through psql into /dev/null."""
    argv = ["psql", "-X", "-q", "-c", f"COPY {COPY_TABLE} TO STDOUT", target.conninfo]
    began = time.perf_counter()
    with open("/dev/null", "wb") as sink:
        out = subprocess.run(
            argv, stdout=sink, stderr=subprocess.PIPE, env=target.env(), check=False
        )
    elapsed = time.perf_counter() - began
    if out.returncode != 0:
        raise WorkloadError(f"COPY over {target.path}: {out.stderr.decode(errors='replace')}")
    return copy_bytes / elapsed / 1e6


def round_trips(target: ClientTarget, count: int) -> tuple[float, float]:
    """p50 and p99 in ms of ``SELECT 1`` on one open connection (after a warm-up)."""
    with psycopg.connect(target.conninfo, password=target.password, autocommit=True) as conn:
        cur = conn.cursor()
        for _ in range(min(200, count)):
            cur.execute("SELECT 1")
            cur.fetchone()
        samples: list[float] = []
        clock = time.perf_counter_ns
        for _ in range(count):
            began = clock()
            cur.execute("SELECT 1")
            cur.fetchone()
            samples.append((clock() - began) / 1e6)
    samples.sort()
    return percentile(samples, 50), percentile(samples, 99)


def percentile(ordered: list[float], pct: float) -> float:
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def time_to_first_query(target: ClientTarget) -> float:
    """ms from nothing to the first query's answer on a fresh connection."""
    began = time.perf_counter()
    with psycopg.connect(target.conninfo, password=target.password, autocommit=True) as conn:
        conn.execute("SELECT 1").fetchone()
        elapsed = time.perf_counter() - began
    return elapsed * 1000


class RssSampler:
    """The peak RSS of a process while something runs (a thread polling /proc)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
            self._stop.wait(self.interval)


def startup_packet(user: str, database: str) -> bytes:
    """A protocol 3.0 startup packet for ``user`` and ``database``, nothing else."""
    body = b"\x00\x03\x00\x00" + b"user\x00" + user.encode() + b"\x00"
    body += b"database\x00" + database.encode() + b"\x00\x00"
    return (len(body) + 4).to_bytes(4, "big") + body


async def read_until_ready(reader: asyncio.StreamReader, what: str) -> None:
    """Read the server's messages up to ReadyForQuery; an ErrorResponse is ``what`` refused."""
    while True:
        kind = await reader.readexactly(1)
        length = int.from_bytes(await reader.readexactly(4), "big")
        payload = await reader.readexactly(length - 4)
        if kind == b"E":
            raise WorkloadError(f"{what} refused: {payload!r}")
        if kind == b"Z":
            return


async def _open_idle_sessions(
    port: int, user: str, database: str, count: int
) -> list[asyncio.StreamWriter]:
    """Open ``count`` sessions (plaintext, trust) and leave each idle after ReadyForQuery.

    A minimal client keeps the bench process light: a startup packet, then read to 'Z'.
    """
    startup = startup_packet(user, database)
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(16)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(startup)
            await read_until_ready(reader, "session")

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


def idle_sessions_rss(
    port: int, pid: int, user: str, database: str, count: int, settle: float = 2.0
) -> tuple[int, float]:
    """RSS (KiB) of ``pid`` with ``count`` idle sessions open through it; seconds to open them."""

    async def run() -> tuple[int, float]:
        began = time.perf_counter()
        writers = await _open_idle_sessions(port, user, database, count)
        opened = time.perf_counter() - began
        await asyncio.sleep(settle)
        rss = rss_kib(pid)
        for writer in writers:
            writer.write(b"X\x00\x00\x00\x04")
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        return rss, opened

    return asyncio.run(run())


def wall_time(argv: list[str], env: dict[str, str] | None = None) -> float:
    began = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - began


def median_of(samples: list[float]) -> float:
    return statistics.median(samples)


Workload = Callable[[ClientTarget], dict[str, float]]
