"""One benchmark run: set everything up, measure interleaved, print and save the table."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nlbench import report, serverless, workloads
from nlbench.net import free_port
from nlbench.paths import (
    ClientTarget,
    NeonlocalDaemon,
    PathName,
    PgBouncer,
    compile_bytecode,
    cpu_seconds,
    direct_target,
    find_pgbouncer,
    rss_kib,
    start_neonlocal,
    start_pgbouncer,
    supports_serverless,
    supports_session_reuse,
)
from nlbench.report import Results
from nlbench.server import DATABASE, ROLE, BenchServer, start_server

BENCH_DIR = Path(__file__).resolve().parent.parent
SERVER_ADDR = "127.0.0.9"
RTT_DELAY_MS = 10  # each way: a 20 ms round trip
IDLE_SESSIONS = 1000
CONNECT_PAUSE_S = 0.1
ONESHOT_CLIENTS = 8
PGBENCH_ACCOUNTS_PER_SCALE = 100_000
# Longer than the daemon's /sql link pool keeps an idle session (15 s).
POOL_DRAIN_S = 30.0


@dataclass(frozen=True)
class Plan:
    seconds: int  # per pgbench run
    repetitions: int
    scale: int
    copy_mb: int
    round_trips: int
    connects: int  # time-to-first-query samples per repetition
    cli_runs: int
    oneshots: int  # one-shot latency samples per way and repetition

    @staticmethod
    def of(quick: bool) -> Plan:
        if quick:
            return Plan(seconds=3, repetitions=3, scale=10, copy_mb=100, round_trips=2000,
                        connects=4, cli_runs=5, oneshots=300)  # fmt: skip
        return Plan(seconds=8, repetitions=7, scale=10, copy_mb=300, round_trips=10000,
                    connects=10, cli_runs=15, oneshots=1000)  # fmt: skip


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


@dataclass(frozen=True)
class Lane:
    """One target in an interleaved round, and the result rows its samples belong to."""

    target: ClientTarget
    keys: tuple[str, ...]
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.target.path}{self.label}"


class Bench:
    def __init__(
        self,
        plan: Plan,
        server: BenchServer,
        daemon: NeonlocalDaemon,
        reusing: NeonlocalDaemon | None,
        bouncer: PgBouncer | None,
        slow: tuple[str, int],
        fresh: NeonlocalDaemon | None = None,
    ) -> None:
        self.plan = plan
        self.server = server
        self.daemon = daemon
        # A second daemon with [upstream] reuse_sessions = true, when this neonlocal has it.
        self.reusing = reusing
        # A daemon with the default config that no HTTP request has reached: the serverless
        # rows load its serverless side, so the other rows' daemon never has it loaded.
        self.fresh = fresh
        self.bouncer = bouncer
        self.slow = slow
        self.results = Results()
        self.targets: list[ClientTarget] = [direct_target(server), daemon.target()]
        if bouncer is not None:
            self.targets.append(bouncer.target())

    def rounds(self, lanes: list[Lane], run: Callable[[ClientTarget], float], title: str) -> None:
        """``repetitions`` rounds of every lane in turn (A B C A B C ...)."""
        for rep in range(self.plan.repetitions):
            for lane in lanes:
                value = run(lane.target)
                for key in lane.keys:
                    self.results.add(key, lane.target.path, value)
                say(f"{title} #{rep + 1} {lane.name}: {value:.3f}")

    def lanes(self, key: str) -> list[Lane]:
        return [Lane(target, (key,)) for target in self.targets]

    def with_reuse(self, key: str, reuse_key: str, reuse_target: ClientTarget | None) -> list[Lane]:
        if self.reusing is None or reuse_target is None:
            return self.lanes(key)
        return self.with_extra(key, reuse_key, reuse_target, " (reuse_sessions)")

    def with_extra(self, key: str, extra_key: str, extra: ClientTarget, label: str) -> list[Lane]:
        """A second neonlocal lane with a row of its own: direct and pgbouncer samples count
        for both rows, each neonlocal lane for its own."""
        lanes = [
            Lane(t, (key,) if t.path is PathName.NEONLOCAL else (key, extra_key))
            for t in self.targets
        ]
        lanes.insert(2, Lane(extra, (extra_key,), label))
        return lanes

    def proxy_pid(self, path: PathName) -> int | None:
        if path is PathName.NEONLOCAL:
            return self.daemon.pid
        if path is PathName.PGBOUNCER and self.bouncer is not None:
            return self.bouncer.pid
        return None

    def pgbench_with_cpu(
        self, run: workloads.PgbenchRun, cpu_key: str, target: ClientTarget
    ) -> float:
        """tps; for a proxy also its CPU time per transaction (less noisy than tps)."""
        pid = self.proxy_pid(target.path)
        if pid is None:
            return run(target, self.plan.seconds)
        before = cpu_seconds(pid)
        tps, transactions = run.measure(target, self.plan.seconds)
        self.results.add(cpu_key, target.path, 1e6 * (cpu_seconds(pid) - before) / transactions)
        return tps

    def pgbench(self) -> None:
        seconds = self.plan.seconds

        unix = self.daemon.unix_target()

        def select_only(target: ClientTarget) -> float:
            if target.path is not PathName.NEONLOCAL:
                return self.pgbench_with_cpu(workloads.SELECT_ONLY, "select_cpu_us", target)
            cpu_key = "select_unix_cpu_us" if target is unix else "select_cpu_us"
            with workloads.RssSampler(self.daemon.pid) as sampler:
                tps = self.pgbench_with_cpu(workloads.SELECT_ONLY, cpu_key, target)
            self.results.add("rss_load", PathName.NEONLOCAL, sampler.peak_kib / 1024)
            return tps

        lanes = self.with_extra("select_tps", "select_unix_tps", unix, " (Unix socket)")
        self.rounds(lanes, select_only, "pgbench -S")
        self.rounds(
            self.lanes("tpcb_tps"),
            lambda t: self.pgbench_with_cpu(workloads.TPCB, "tpcb_cpu_us", t),
            "pgbench tpc-b",
        )
        reuse = self.reusing.target() if self.reusing is not None else None
        self.rounds(
            self.with_reuse("connect_tps", "connect_reuse_tps", reuse),
            lambda t: workloads.CONNECT_PER_TX(t, seconds),
            "pgbench -S -C",
        )

    def copy(self) -> None:
        size = self.server.copy_bytes
        self.rounds(self.lanes("copy_mbs"), lambda t: workloads.copy_out(t, size), "COPY MB/s")

    def latency(self) -> None:
        for rep in range(self.plan.repetitions):
            for target in self.targets:
                p50, p99 = workloads.round_trips(target, self.plan.round_trips)
                self.results.add("rtt_p50", target.path, p50)
                self.results.add("rtt_p99", target.path, p99)
                say(f"SELECT 1 #{rep + 1} {target.path}: p50 {p50:.3f} ms, p99 {p99:.3f} ms")

    def connect_latency(self) -> None:
        """Time to first query through the RTT relay. Connects are spaced out, as web
        requests are, so a reusing daemon has parked (reset) the session it just had."""
        daemons = [d for d in (self.daemon, self.reusing) if d is not None]
        for daemon in daemons:
            daemon.use("slow")
        direct = direct_target(self.server, addr=self.slow[0], port=self.slow[1])
        saved = self.targets
        self.targets = [direct, self.daemon.target()]
        if self.bouncer is not None:
            self.targets.append(self.bouncer.target(f"{DATABASE}_slow"))
        reuse = self.reusing.target() if self.reusing is not None else None
        if reuse is not None:
            workloads.time_to_first_query(reuse)  # leaves one session parked

        def median_connect(target: ClientTarget) -> float:
            values = []
            for _ in range(self.plan.connects):
                time.sleep(CONNECT_PAUSE_S)
                values.append(workloads.time_to_first_query(target))
            return workloads.median_of(values)

        try:
            self.rounds(
                self.with_reuse("ttfq_ms", "ttfq_reuse_ms", reuse),
                median_connect,
                "time to first query (ms)",
            )
        finally:
            self.targets = saved
            for daemon in daemons:
                daemon.use("bench")

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

    def oneshot(self) -> None:
        """One-shot queries: POST /sql beside the same query over the PostgreSQL port."""
        if self.fresh is None:
            return
        target = serverless.Target(
            self.fresh.port, ROLE, DATABASE, self.plan.scale * PGBENCH_ACCOUNTS_PER_SCALE
        )
        self.oneshot_rss(target)
        for rep in range(self.plan.repetitions):
            for way in serverless.Way:
                samples = sorted(serverless.latencies(way, target, self.plan.oneshots))
                p50, p99 = workloads.percentile(samples, 50), workloads.percentile(samples, 99)
                self.results.add("oneshot_p50", way, p50)
                self.results.add("oneshot_p99", way, p99)
                before = cpu_seconds(self.fresh.pid)
                count, elapsed = serverless.throughput(
                    way, target, ONESHOT_CLIENTS, self.plan.seconds
                )
                cpu_us = 1e6 * (cpu_seconds(self.fresh.pid) - before) / count
                self.results.add("oneshot_qps", way, count / elapsed)
                self.results.add("oneshot_cpu_us", way, cpu_us)
                say(f"one-shot #{rep + 1} {way}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, "
                    f"{count / elapsed:.0f} queries/s, {cpu_us:.0f} µs daemon CPU")  # fmt: skip

    def oneshot_rss(self, target: serverless.Target) -> None:
        """Idle RSS before and after the first POST /sql, both with no session open."""
        assert self.fresh is not None
        self.warm(self.fresh.target())
        pid = self.fresh.pid
        if not self.fresh.wait_idle(POOL_DRAIN_S):
            raise RuntimeError("the serverless lane's daemon kept sessions after its warm-up")
        before = rss_kib(pid)
        serverless.first_request(target)
        if not self.fresh.wait_idle(POOL_DRAIN_S):
            raise RuntimeError(f"POST /sql left a session open after {POOL_DRAIN_S:.0f} s")
        after = rss_kib(pid)
        self.results.add("rss_http_before", PathName.NEONLOCAL, before / 1024)
        self.results.add("rss_http_loaded", PathName.NEONLOCAL, after / 1024)
        self.results.add("rss_http_added", PathName.NEONLOCAL, (after - before) / 1024)
        say(f"RSS idle before the first POST /sql {before / 1024:.1f} MiB, "
            f"after it (its pooled session closed) {after / 1024:.1f} MiB")  # fmt: skip

    def warm(self, target: ClientTarget) -> None:
        workloads.round_trips(target, 50)
        workloads.copy_out(target, self.server.copy_bytes)

    def warm_up(self) -> None:
        for target in self.targets:
            self.warm(target)


STEPS: dict[str, Callable[[Bench], None]] = {
    "pgbench": Bench.pgbench,
    "copy": Bench.copy,
    "latency": Bench.latency,
    "connect": Bench.connect_latency,
    "cli": Bench.cli,
    "sessions": Bench.many_sessions,
    "serverless": Bench.oneshot,
}


def run(args: argparse.Namespace) -> int:
    plan = Plan.of(args.quick)
    started = datetime.datetime.now()
    info = report.machine()
    info["neonlocal"] = report.source_description(args.neonlocal_src)
    info["bytecode"] = compile_bytecode(args.neonlocal_src)
    if args.loop is not None:
        info["event loop in the daemon"] = f"{args.loop} (--loop)"
    work = Path(tempfile.mkdtemp(prefix="neonlocal-bench-", dir="/tmp"))
    work.chmod(0o711)  # pgbouncer runs as the postgres user and needs its subdirectory
    server: BenchServer | None = None
    daemon: NeonlocalDaemon | None = None
    reusing: NeonlocalDaemon | None = None
    bouncer: PgBouncer | None = None
    fresh: NeonlocalDaemon | None = None
    steps = [step for step in STEPS if not args.only or step in args.only]
    results = Results()
    try:
        say(f"server: PostgreSQL on {SERVER_ADDR}, TLS + SCRAM, pgbench scale {plan.scale}, "
            f"COPY table {plan.copy_mb} MB")  # fmt: skip
        server = start_server(work, SERVER_ADDR, scale=plan.scale, copy_mb=plan.copy_mb)
        info["postgresql"] = server.version()
        info["COPY stream"] = f"{server.copy_bytes / 1e6:.0f} MB"
        with rtt_relay((server.addr, server.port)) as slow:
            daemon = start_neonlocal(
                work / "neonlocal",
                server,
                slow=slow,
                max_sessions=IDLE_SESSIONS + 50,
                source=args.neonlocal_src,
                loop=args.loop,
            )
            if supports_session_reuse(args.neonlocal_src):
                reusing = start_neonlocal(
                    work / "neonlocal-reuse",
                    server,
                    slow=slow,
                    max_sessions=IDLE_SESSIONS + 50,
                    reuse_sessions=True,
                    source=args.neonlocal_src,
                    loop=args.loop,
                )
            else:
                say("this neonlocal has no [upstream] reuse_sessions: reuse rows not measured")
            binary = find_pgbouncer()
            if binary is None:
                say("pgbouncer is not installed (apt-get install pgbouncer): skipping its column")
                info["pgbouncer"] = "not installed: column skipped"
            else:
                bouncer = start_pgbouncer(binary, work / "pgbouncer", server, slow=slow)
                info["pgbouncer"] = (
                    f"{bouncer.version()}, session mode, server_tls_sslmode={bouncer.tls_mode}"
                )
            if "serverless" in steps and supports_serverless(args.neonlocal_src):
                fresh = start_neonlocal(
                    work / "neonlocal-serverless",
                    server,
                    slow=slow,
                    max_sessions=4 * ONESHOT_CLIENTS,
                    source=args.neonlocal_src,
                    loop=args.loop,
                )
            elif "serverless" in steps:
                say("this neonlocal does not serve POST /sql: serverless rows not measured")
            bench = Bench(plan, server, daemon, reusing, bouncer, slow, fresh)
            bench.warm_up()
            bench.idle_rss()
            for step in steps:
                STEPS[step](bench)
            results = bench.results
    finally:
        if bouncer is not None:
            bouncer.stop()
        for each in (daemon, reusing, fresh):
            if each is not None:
                each.stop()
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
    if args.neonlocal_src is not None:
        command += f" --neonlocal-src {args.neonlocal_src}"
    if args.loop is not None:
        command += f" --loop {args.loop}"
    command += "".join(f" --only {step}" for step in args.only or ())
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
        report.table(results, show_missing=not args.only),
        "",
    ]
    if results.medians("oneshot_p50"):
        lines += [*oneshot_note(plan), "", report.oneshot_table(results), ""]
    return "\n".join(lines)


def oneshot_note(plan: Plan) -> list[str]:
    return [
        "### The serverless side: one-shot queries on the daemon's port",
        "",
        f"`{serverless.QUERY}` with a random aid, three ways, through a second daemon "
        "(default config). `POST /sql`: the request @neondatabase/serverless sends for "
        "`neon()`, on a kept-alive connection per client as fetch keeps one; "
        "`new connection per query`: connect, startup, the query, Terminate (each a new "
        "upstream login); `kept connection`: the query on one open session. "
        f"{plan.oneshots} queries in a row from one client for the latencies, then "
        f"{ONESHOT_CLIENTS} clients for {plan.seconds} s; {plan.repetitions} interleaved "
        "rounds, medians. Ratios: POST /sql's median over the other way's.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N: about 2-3 minutes")
    parser.add_argument(
        "--neonlocal-src",
        type=Path,
        metavar="DIR",
        help="run the daemon from this src/ directory instead of the installed neonlocal "
        "(e.g. an export of the last commit, to compare before and after on one machine)",
    )
    parser.add_argument(
        "--loop",
        choices=["asyncio"],
        help="run the daemon on the standard asyncio loop even when uvloop is installed",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(STEPS),
        metavar="STEP",
        help=f"run only this step (repeatable; the idle RSS row always runs): {', '.join(STEPS)}",
    )
    args = parser.parse_args(argv)
    # A terminated run still stops its servers and removes its files (the finally blocks).
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    if args.neonlocal_src is not None:
        args.neonlocal_src = args.neonlocal_src.resolve()
        if not (args.neonlocal_src / "neonlocal" / "__init__.py").is_file():
            parser.error(f"{args.neonlocal_src} has no neonlocal package")
    return run(args)
