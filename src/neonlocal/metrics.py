"""Prometheus metrics of one daemon: sessions, bytes, upstream connect latency, errors.

Each Server owns a Metrics with its own CollectorRegistry, so several daemons in one
process (the tests run many) never share counts. Nothing here runs per relayed chunk: bytes
are read from the endpoints' counters when a session ends, and the gauges that describe the
present (open sessions, selected branch) are computed from live state at scrape time, so
they cannot drift from what ``neonlocal status`` reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format that ``Metrics.exposition`` produces."""

# A warm Neon compute answers in milliseconds; a suspended one takes a few seconds to start,
# and connect_timeout (30 s by default) bounds the rest.
CONNECT_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ErrorKind(StrEnum):
    """Why a session failed, as the ``kind`` label of ``neonlocal_errors_total``."""

    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    """No connection to the branch: refused, timed out, name not resolved."""
    TLS = "tls"
    """The branch was reached but TLS failed: certificate, handshake, no TLS offered."""
    UPSTREAM_CLOSED = "upstream_closed"
    """The branch closed the connection during login."""
    AUTH = "auth"
    """A password was refused, locally or by the branch."""
    UPSTREAM_REJECTED = "upstream_rejected"
    """The branch refused the login for another reason (no such database, ...)."""
    PROTOCOL = "protocol"
    """The client broke the wire protocol."""
    STARTUP_TIMEOUT = "startup_timeout"
    """The client did not finish its startup in time."""
    TOO_MANY = "too_many"
    """``[listen] max_sessions`` was reached."""
    NO_BRANCH = "no_branch"
    """No branch is selected."""
    CANCEL_FAILED = "cancel_failed"
    """A cancel request could not be delivered to the branch."""


class Direction(StrEnum):
    """The ``direction`` label of ``neonlocal_bytes_total``."""

    TO_UPSTREAM = "to_upstream"
    TO_CLIENT = "to_client"


@dataclass(frozen=True)
class LiveState:
    """What the daemon serves right now, read at each scrape."""

    sessions_open: Mapping[str, int] = field(default_factory=dict)
    """Open sessions by branch; configured branches without sessions map to 0."""
    branch: str | None = None
    upstream: str | None = None
    """``host:port`` of the selected branch (never a secret)."""


class _LiveCollector(Collector):
    def __init__(self, live: Callable[[], LiveState]) -> None:
        self._live = live

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering does not call into the server before it exists.
        return [_open_family(), _branch_family()]

    def collect(self) -> Iterable[Metric]:
        state = self._live()
        sessions = _open_family()
        for branch, count in sorted(state.sessions_open.items()):
            sessions.add_metric([branch], count)
        selected = _branch_family()
        if state.branch is not None:
            selected.add_metric([state.branch, state.upstream or ""], 1)
        return [sessions, selected]


def _open_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "neonlocal_sessions_open", "Client sessions open now, by branch.", labels=["branch"]
    )


def _branch_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "neonlocal_branch_info",
        "The branch new sessions go to (value 1); absent when none is selected.",
        labels=["branch", "upstream"],
    )


class Metrics:
    """The counters a server updates, and the registry the admin listener exposes."""

    def __init__(self, live: Callable[[], LiveState] = LiveState) -> None:
        self.registry = CollectorRegistry()
        self._sessions = Counter(
            "neonlocal_sessions",
            "Client sessions routed to a branch since the daemon started.",
            ["branch"],
            registry=self.registry,
        )
        self._bytes = Counter(
            "neonlocal_bytes",
            "Bytes relayed between clients and branches, counted when each session ends.",
            ["branch", "direction"],
            registry=self.registry,
        )
        self._connect = Histogram(
            "neonlocal_upstream_connect_seconds",
            "Time to open a verified TLS connection to a branch (a waking compute is slow).",
            ["branch"],
            buckets=CONNECT_BUCKETS_S,
            registry=self.registry,
        )
        self._errors = Counter(
            "neonlocal_errors",
            "Sessions and cancel requests that failed, by kind.",
            ["kind"],
            registry=self.registry,
        )
        # Every kind present from the start, so a rate() over a fresh daemon sees 0, not gaps.
        for kind in ErrorKind:
            self._errors.labels(kind.value)
        self.registry.register(_LiveCollector(live))

    def session_opened(self, branch: str) -> None:
        self._sessions.labels(branch).inc()

    def session_closed(self, branch: str, *, to_upstream: int, to_client: int) -> None:
        self._bytes.labels(branch, Direction.TO_UPSTREAM.value).inc(to_upstream)
        self._bytes.labels(branch, Direction.TO_CLIENT.value).inc(to_client)

    def upstream_connected(self, branch: str, seconds: float) -> None:
        self._connect.labels(branch).observe(seconds)

    def error(self, kind: ErrorKind) -> None:
        self._errors.labels(kind.value).inc()

    def exposition(self) -> bytes:
        """The whole registry in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
