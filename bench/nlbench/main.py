"""One benchmark run: set everything up, measure interleaved, print and save the table."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nlbench import report, workloads
from nlbench.net import free_port
from nlbench.paths import (
    ClientTarget,
    NeonlocalDaemon,
    PathName,
    PgBouncer,
    direct_target,
    find_pgbouncer,
    rss_kib,
    start_neonlocal,
    start_pgbouncer,
)
from nlbench.report import Results
from nlbench.server import DATABASE, ROLE, BenchServer, start_server

BENCH_DIR = Path(__file__).resolve().parent.parent
SERVER_ADDR = "127.0.0.9"
RTT_DELAY_MS = 10  # each way: a 20 ms round trip
IDLE_SESSIONS = 1000


@dataclass(frozen=True)
class Plan:
    seconds: int  # per pgbench run
    repetitions: int
    scale: int
    copy_mb: int
    round_trips: int
    connects: int  # time-to-first-query samples per repetition
    cli_runs: int

    @staticmethod
    def of(quick: bool) -> Plan:
        if quick:
            return Plan(seconds=3, repetitions=3, scale=10, copy_mb=100, round_trips=2000,
                        connects=4, cli_runs=5)  # fmt: skip
        return Plan(seconds=15, repetitions=5, scale=10, copy_mb=300, round_trips=10000,
                    connects=10, cli_runs=15)  # fmt: skip


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def rtt_relay(target: tuple[str, int]) -> Iterator[tuple[str, int]]:
    listen = (SERVER_ADDR, free_port(SERVER_ADDR))
    script = Path(__file__).resolve().parent / "rtt_relay.py"
    argv = [sys.executable, str(script), *map(str, (*listen, *target, RTT_DELAY_MS))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the RTT relay did not start")
        yield listen
    finally:
        proc.terminate()
        proc.wait()


class Bench:
    def __init__(
        self,
        plan: Plan,
        server: BenchServer,
        daemon: NeonlocalDaemon,
        bouncer: PgBouncer | None,
        slow: tuple[str, int],
    ) -> None:
        self.plan = plan
        self.server = server
        self.daemon = daemon
        self.bouncer = bouncer
        self.slow = slow
        self.results = Results()
        self.targets: list[ClientTarget] = [direct_target(server), daemon.target()]
        if bouncer is not None:
            self.targets.append(bouncer.target())

    def interleaved(self, key: str, run: Callable[[ClientTarget], float], title: str) -> None:
        for rep in range(self.plan.repetitions):
            for target in self.targets:
                value = run(target)
                self.results.add(key, target.path, value)
                say(f"{title} #{rep + 1} {target.path}: {value:.3f}")

    def pgbench(self) -> None:
        seconds = self.plan.seconds
        for key, run, title in (
            ("select_tps", workloads.SELECT_ONLY, "pgbench -S"),
            ("tpcb_tps", workloads.TPCB, "pgbench tpc-b"),
            ("connect_tps", workloads.CONNECT_PER_TX, "pgbench -S -C"),
        ):

            def measure(target: ClientTarget, run: workloads.PgbenchRun = run, key: str = key) -> float:
                if key == "select_tps" and target.path is PathName.NEONLOCAL:
                    with workloads.RssSampler(self.daemon.pid) as sampler:
                        tps = run(target, seconds)
                    self.results.add("rss_load", PathName.NEONLOCAL, sampler.peak_kib / 1024)
                    return tps
                return run(target, seconds)

            self.interleaved(key, measure, title)

    def copy(self) -> None:
        size = self.server.copy_bytes
        self.interleaved("copy_mbs", lambda t: workloads.copy_out(t, size), "COPY MB/s")

    def latency(self) -> None:
        for rep in range(self.plan.repetitions):
            for target in self.targets:
                p50, p99 = workloads.round_trips(target, self.plan.round_trips)
                self.results.add("rtt_p50", target.path, p50)
                self.results.add("rtt_p99", target.path, p99)
                say(f"SELECT 1 #{rep + 1} {target.path}: p50 {p50:.3f} ms, p99 {p99:.3f} ms")

    def connect_latency(self) -> None:
        self.daemon.use("slow")
        slow = [direct_target(self.server, addr=self.slow[0], port=self.slow[1]), self.daemon.target()]
        if self.bouncer is not None:
            slow.append(self.bouncer.target(f"{DATABASE}_slow"))
        try:
            for rep in range(self.plan.repetitions):
                for target in slow:
                    for _ in range(self.plan.connects):
                        value = workloads.time_to_first_query(target)
                        self.results.add("ttfq_ms", target.path, value)
                    say(f"time to first query #{rep + 1} {target.path}: {value:.1f} ms")
        finally:
            self.daemon.use("bench")

    def cli(self) -> None:
        for index in range(self.plan.cli_runs):
            value = self.daemon.use("bench-alt" if index % 2 == 0 else "bench") * 1000
            self.results.add("use_ms", PathName.NEONLOCAL, value)
        self.daemon.use("bench")
        for _ in range(self.plan.cli_runs):
            value = workloads.wall_time(self.daemon.cli("--help"), self.daemon.env) * 1000
            self.results.add("help_ms", PathName.NEONLOCAL, value)
        say(f"neonlocal use: {self.results.medians('use_ms')[PathName.NEONLOCAL]:.0f} ms, "
            f"--help: {self.results.medians('help_ms')[PathName.NEONLOCAL]:.0f} ms")  # fmt: skip

    def idle_rss(self) -> None:
        self.results.add("rss_idle", PathName.NEONLOCAL, rss_kib(self.daemon.pid) / 1024)
        if self.bouncer is not None:
            self.results.add("rss_idle", PathName.PGBOUNCER, rss_kib(self.bouncer.pid) / 1024)

    def many_sessions(self) -> None:
        before = rss_kib(self.daemon.pid)
        rss, opened = workloads.idle_sessions_rss(
            self.daemon.port, self.daemon.pid, ROLE, DATABASE, IDLE_SESSIONS
        )
        self.results.add("rss_1000", PathName.NEONLOCAL, rss / 1024)
        self.results.add("rss_1000_added", PathName.NEONLOCAL, (rss - before) / 1024)
        say(f"{IDLE_SESSIONS} idle sessions opened in {opened:.1f} s: RSS {before / 1024:.1f} "
            f"-> {rss / 1024:.1f} MiB")  # fmt: skip

    def warm_up(self) -> None:
        for target in self.targets:
            workloads.round_trips(target, 50)
            workloads.copy_out(target, self.server.copy_bytes)


def run(args: argparse.Namespace) -> int:
    plan = Plan.of(args.quick)
    started = datetime.datetime.now()
    info = report.machine()
    work = Path(tempfile.mkdtemp(prefix="neonlocal-bench-", dir="/tmp"))
    work.chmod(0o711)  # pgbouncer runs as the postgres user and needs its subdirectory
    server: BenchServer | None = None
    daemon: NeonlocalDaemon | None = None
    bouncer: PgBouncer | None = None
    results = Results()
    try:
        say(f"server: PostgreSQL on {SERVER_ADDR}, TLS + SCRAM, pgbench scale {plan.scale}, "
            f"COPY table {plan.copy_mb} MB")  # fmt: skip
        server = start_server(work, SERVER_ADDR, scale=plan.scale, copy_mb=plan.copy_mb)
        info["postgresql"] = server.version()
        info["COPY stream"] = f"{server.copy_bytes / 1e6:.0f} MB"
        with rtt_relay((server.addr, server.port)) as slow:
            daemon = start_neonlocal(work / "neonlocal", server, slow=slow, max_sessions=IDLE_SESSIONS + 50)
            binary = find_pgbouncer()
            if binary is None:
                say("pgbouncer is not installed (apt-get install pgbouncer): skipping its column")
                info["pgbouncer"] = "not installed: column skipped"
            else:
                bouncer = start_pgbouncer(binary, work / "pgbouncer", server, slow=slow)
                info["pgbouncer"] = f"{bouncer.version()}, session mode, server_tls_sslmode={bouncer.tls_mode}"
            bench = Bench(plan, server, daemon, bouncer, slow)
            bench.warm_up()
            bench.idle_rss()
            bench.pgbench()
            bench.copy()
            bench.latency()
            bench.connect_latency()
            bench.cli()
            bench.many_sessions()
            results = bench.results
    finally:
        if bouncer is not None:
            bouncer.stop()
        if daemon is not None:
            daemon.stop()
        if server is not None:
            server.destroy()
        shutil.rmtree(work, ignore_errors=True)
    text = render(args, plan, info, started, results)
    print(text)
    out_dir = BENCH_DIR / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{started:%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}.md"
    out.write_text(text)
    say(f"written to {out}")
    return 0


def render(
    args: argparse.Namespace,
    plan: Plan,
    info: dict[str, str],
    started: datetime.datetime,
    results: Results,
) -> str:
    command = "bench/run.py" + (" --quick" if args.quick else "")
    lines = [
        f"## neonlocal benchmark, {started:%Y-%m-%d %H:%M}",
        "",
        f"Command: `.venv/bin/python {command}`  ",
        f"Plan: {plan.repetitions} interleaved repetitions (direct, neonlocal, pgbouncer), "
        f"pgbench -T {plan.seconds} at scale {plan.scale}, {plan.round_trips} round trips, "
        f"{plan.connects} connects per repetition at {2 * RTT_DELAY_MS} ms RTT; medians.",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        report.table(results),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N: about 2-3 minutes")
    args = parser.parse_args(argv)
    return run(args)
