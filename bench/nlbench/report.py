"""Medians, ratios to direct, targets, and the markdown tables the run prints and saves."""

from __future__ import annotations

import platform
import statistics
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nlbench.paths import PathName
from nlbench.serverless import Way

PATHS = (PathName.DIRECT, PathName.NEONLOCAL, PathName.PGBOUNCER)


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    # Whether the neonlocal value meets the target, given the medians by path.
    meets: Callable[[Mapping[str, float]], bool] | None = None
    target: str = ""
    # Shown instead of numbers when nothing was measured (a feature this neonlocal lacks).
    missing: str = ""


def _ratio_at_least(bound: float) -> Callable[[Mapping[str, float]], bool]:
    return lambda m: m[PathName.NEONLOCAL] / m[PathName.DIRECT] >= bound


def _ratio_at_most(bound: float) -> Callable[[Mapping[str, float]], bool]:
    return lambda m: m[PathName.NEONLOCAL] / m[PathName.DIRECT] <= bound


def _value_at_most(bound: float) -> Callable[[Mapping[str, float]], bool]:
    return lambda m: m[PathName.NEONLOCAL] <= bound


def _within_of_direct(delta: float) -> Callable[[Mapping[str, float]], bool]:
    return lambda m: m[PathName.NEONLOCAL] - m[PathName.DIRECT] <= delta


METRICS = (
    Metric("select_tps", "pgbench -S, 8 clients", "tps", _ratio_at_least(0.80), ">= 0.80x"),
    Metric("select_unix_tps", "pgbench -S, 8 clients, to neonlocal's Unix socket", "tps"),
    Metric("tpcb_tps", "pgbench TPC-B-like, 8 clients", "tps", _ratio_at_least(0.85), ">= 0.85x"),
    Metric("select_cpu_us", "proxy CPU per pgbench -S transaction (user + system)", "µs"),
    Metric("select_unix_cpu_us", "the same, clients on neonlocal's Unix socket", "µs"),
    Metric("tpcb_cpu_us", "proxy CPU per TPC-B-like transaction (user + system)", "µs"),
    Metric(
        "connect_tps", "pgbench -S -C (connect per tx)", "tps", _ratio_at_least(0.90), ">= 0.90x"
    ),
    Metric(
        "connect_reuse_tps",
        "pgbench -S -C, neonlocal with reuse_sessions",
        "tps",
        _ratio_at_least(2.0),
        ">= 2.0x",
        missing="not implemented",
    ),
    Metric("copy_mbs", "COPY ... TO STDOUT (psql)", "MB/s", _ratio_at_least(1.0), ">= 1.0x"),
    Metric(
        "rtt_p50", "SELECT 1 round trip p50", "ms", _within_of_direct(0.1), "<= direct + 0.1 ms"
    ),
    Metric("rtt_p99", "SELECT 1 round trip p99", "ms"),
    Metric("ttfq_ms", "time to first query, 20 ms RTT", "ms", _ratio_at_most(1.0), "<= 1.0x"),
    Metric(
        "ttfq_reuse_ms",
        "time to first query, 20 ms RTT, neonlocal with reuse_sessions",
        "ms",
        _ratio_at_most(0.2),
        "<= 0.2x",
        missing="not implemented",
    ),
    Metric("rss_idle", "RSS idle", "MiB", _value_at_most(40), "<= 40 MiB"),
    Metric("rss_http_before", "RSS idle, a second daemon before any HTTP request", "MiB"),
    Metric(
        "rss_http_loaded",
        "RSS idle, that daemon after its first POST /sql (serverless side loaded)",
        "MiB",
    ),
    Metric("rss_http_added", "RSS added by loading the serverless side", "MiB"),
    Metric("rss_load", "RSS peak under pgbench -S (8 clients)", "MiB"),
    Metric("rss_1000", "RSS with 1,000 idle sessions", "MiB"),
    Metric(
        "rss_1000_added", "RSS added by 1,000 idle sessions", "MiB", _value_at_most(60), "<= 60 MiB"
    ),
    Metric("use_ms", "`neonlocal use` until confirmed", "ms", _value_at_most(300), "<= 300 ms"),
    Metric("help_ms", "`neonlocal --help` wall time", "ms", _value_at_most(150), "<= 150 ms"),
)


# The serverless table: one-shot queries on the daemon's port, by way (columns), with the
# ratios of POST /sql to the two PostgreSQL-protocol ways measured in the same run.
ONESHOT_METRICS = (
    Metric("oneshot_p50", "one query at a time, 1 client: latency p50", "ms"),
    Metric("oneshot_p99", "one query at a time, 1 client: latency p99", "ms"),
    Metric("oneshot_qps", "queries per second, 8 clients", "queries/s"),
    Metric("oneshot_cpu_us", "daemon CPU per query, 8 clients (user + system)", "µs"),
)
WAYS = (Way.HTTP, Way.CONNECT, Way.KEPT)


@dataclass
class Results:
    """Samples by measurement and column: a path, or a way for the serverless table."""

    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, key: str, path: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(path, []).append(value)

    def medians(self, key: str) -> dict[str, float]:
        return {p: statistics.median(v) for p, v in self.samples.get(key, {}).items() if v}


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def table(results: Results, *, show_missing: bool = True) -> str:
    """The main table; ``show_missing``: rows of features this neonlocal lacks say so (a run
    of a few steps leaves them out instead)."""
    head = (
        "| measurement | unit | direct | neonlocal | pgbouncer | neonlocal/direct "
        "| pgbouncer/direct | target (neonlocal) | met |"
    )
    lines = [head, "|---|---|--:|--:|--:|--:|--:|---|---|"]
    for metric in METRICS:
        medians = results.medians(metric.key)
        if not medians:
            if metric.missing and show_missing:
                lines.append(
                    f"| {metric.title} | {metric.unit} | | {metric.missing} | | | "
                    f"| {metric.target} | - |"
                )
            continue
        cells = [_fmt(medians[p]) if p in medians else "" for p in PATHS]
        direct = medians.get(PathName.DIRECT)
        ratios = [
            f"{medians[p] / direct:.2f}x" if direct and p in medians else ""
            for p in (PathName.NEONLOCAL, PathName.PGBOUNCER)
        ]
        met = ""
        if metric.meets is not None and PathName.NEONLOCAL in medians:
            try:
                met = "yes" if metric.meets(medians) else "**no**"
            except KeyError:
                met = "?"
        lines.append(
            f"| {metric.title} | {metric.unit} | {' | '.join(cells)} | {' | '.join(ratios)} "
            f"| {metric.target} | {met} |"
        )
    return "\n".join(lines)


def oneshot_table(results: Results) -> str:
    """The serverless rows: ``POST /sql`` beside the same query over the PostgreSQL port."""
    head = f"| measurement | unit | {' | '.join(WAYS)} | /sql ÷ new connection | /sql ÷ kept |"
    lines = [head, "|---|---|--:|--:|--:|--:|--:|"]
    for metric in ONESHOT_METRICS:
        medians = results.medians(metric.key)
        if not medians:
            continue
        cells = [_fmt(medians[w]) if w in medians else "" for w in WAYS]
        http = medians.get(Way.HTTP)
        ratios = [
            f"{http / medians[w]:.2f}x" if http is not None and medians.get(w) else ""
            for w in (Way.CONNECT, Way.KEPT)
        ]
        lines.append(
            f"| {metric.title} | {metric.unit} | {' | '.join(cells)} | {' | '.join(ratios)} |"
        )
    return "\n".join(lines)


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return "unavailable"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def source_description(source: Path | None) -> str:
    """Which neonlocal the daemon runs: the installed one (with its git state) or ``source``."""
    if source is not None:
        return f"from {source}"
    import neonlocal

    package = Path(neonlocal.__file__).resolve().parent
    commit = _first_line(["git", "-C", str(package), "describe", "--always", "--dirty"])
    return f"{neonlocal.__version__} from {package} (git {commit or 'unknown'})"


def machine() -> dict[str, str]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import os

    loop = "asyncio"
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"  # type: ignore[attr-defined]
    except ImportError:
        pass
    return {
        "host": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory": _first_line(["sh", "-c", "free -m | awk '/Mem:/ {print $2 \" MiB\"}'"]),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "event loop in the daemon": loop,
        "pgbench": _first_line(["pgbench", "--version"]),
    }
