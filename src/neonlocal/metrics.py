"""Prometheus metrics of one daemon: sessions, bytes, upstream connect latency, errors.

Each Server owns a Metrics, so several daemons in one process (the tests run many) never
share counts. Nothing here runs per relayed chunk: bytes are read from the endpoints'
counters when a session ends, and the gauges that describe the present (open sessions,
selected branch) are computed from live state at scrape time, so they cannot drift from
what ``neonlocal status`` reports.

The counts are plain ints and floats in dicts. prometheus_client, with http.server, wsgiref,
gzip and more behind it, is about 2 MB (README, "The daemon's memory"), so it is imported on
the first scrape only, to format what these dicts hold; a daemon nobody scrapes never loads
it. Everything here runs on the daemon's event loop thread, so no locks.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from prometheus_client.core import Metric

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format that ``Metrics.exposition`` produces."""

# A warm Neon compute answers in milliseconds; a suspended one takes a few seconds to start,
# and connect_timeout (30 s by default) bounds the rest.
CONNECT_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The `le` labels as prometheus_client writes them ("1.0", not "1"), so series keep their names.
_BUCKET_LABELS: Final = (*(repr(bound) for bound in CONNECT_BUCKETS_S), "+Inf")


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


class _Counter:
    """One counter: its value for each set of label values, and when that set was first
    counted (prometheus_client's ``_created`` series, which /metrics has always shown)."""

    __slots__ = ("created", "values")

    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], int] = {}
        self.created: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: int = 1) -> None:
        values = self.values
        if labels in values:
            values[labels] += amount
        else:
            values[labels] = amount
            self.created[labels] = time.time()


class _ConnectHistogram:
    """The connect latency by branch, in the buckets of ``CONNECT_BUCKETS_S``."""

    __slots__ = ("counts", "created", "sums")

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        """Per bucket, not cumulative (a scrape adds them up); the last one is +Inf."""
        self.sums: dict[str, float] = {}
        self.created: dict[str, float] = {}

    def observe(self, branch: str, seconds: float) -> None:
        counts = self.counts.get(branch)
        if counts is None:
            counts = self.counts[branch] = [0] * (len(CONNECT_BUCKETS_S) + 1)
            self.sums[branch] = 0.0
            self.created[branch] = time.time()
        # The first bound >= seconds, since a bucket counts observations `le` its bound.
        counts[bisect_left(CONNECT_BUCKETS_S, seconds)] += 1
        self.sums[branch] += seconds


def _created_series() -> bool:
    """Whether ``_created`` samples are shown: prometheus_client's own switch, read the same way."""
    flag = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False")
    return flag.lower() not in ("true", "1", "t")


class Metrics:
    """The counts a server updates, which the admin listener's /metrics exposes."""

    def __init__(self, live: Callable[[], LiveState] = LiveState) -> None:
        self._live = live
        self._sessions = _Counter()
        self._bytes = _Counter()
        self._connect = _ConnectHistogram()
        self._errors = _Counter()
        # Every kind present from the start, so a rate() over a fresh daemon sees 0, not gaps.
        for kind in ErrorKind:
            self._errors.inc((kind.value,), 0)

    def session_opened(self, branch: str) -> None:
        self._sessions.inc((branch,))

    def session_closed(self, branch: str, *, to_upstream: int, to_client: int) -> None:
        self._bytes.inc((branch, Direction.TO_UPSTREAM.value), to_upstream)
        self._bytes.inc((branch, Direction.TO_CLIENT.value), to_client)

    def upstream_connected(self, branch: str, seconds: float) -> None:
        self._connect.observe(branch, seconds)

    def error(self, kind: ErrorKind) -> None:
        self._errors.inc((kind.value,))

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (``CONTENT_TYPE``)."""
        # Here and in collect() only: the first scrape pays for loading prometheus_client.
        from prometheus_client import generate_latest

        return generate_latest(self)

    def collect(self) -> Iterable[Metric]:
        """The metric families as of now; this makes a Metrics a prometheus_client Collector."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        created = _created_series()

        def counter(name: str, help_text: str, labels: list[str], counts: _Counter) -> Metric:
            family = CounterMetricFamily(name, help_text, labels=labels)
            for values, value in counts.values.items():
                family.add_metric(values, value, counts.created[values] if created else None)
            return family

        connect = HistogramMetricFamily(
            "neonlocal_upstream_connect_seconds",
            "Time to open a verified TLS connection to a branch (a waking compute is slow).",
            labels=["branch"],
        )
        for branch, counts in self._connect.counts.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(_BUCKET_LABELS, counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            connect.add_metric([branch], buckets, self._connect.sums[branch])
            if created:
                connect.add_sample(
                    f"{connect.name}_created", {"branch": branch}, self._connect.created[branch]
                )

        state = self._live()
        sessions_open = GaugeMetricFamily(
            "neonlocal_sessions_open", "Client sessions open now, by branch.", labels=["branch"]
        )
        for branch, count in sorted(state.sessions_open.items()):
            sessions_open.add_metric([branch], count)
        selected = GaugeMetricFamily(
            "neonlocal_branch_info",
            "The branch new sessions go to (value 1); absent when none is selected.",
            labels=["branch", "upstream"],
        )
        if state.branch is not None:
            selected.add_metric([state.branch, state.upstream or ""], 1)

        return [
            counter(
                "neonlocal_sessions",
                "Client sessions routed to a branch since the daemon started.",
                ["branch"],
                self._sessions,
            ),
            counter(
                "neonlocal_bytes",
                "Bytes relayed between clients and branches, counted when each session ends.",
                ["branch", "direction"],
                self._bytes,
            ),
            connect,
            counter(
                "neonlocal_errors",
                "Sessions and cancel requests that failed, by kind.",
                ["kind"],
                self._errors,
            ),
            sessions_open,
            selected,
        ]
