"""What /metrics shows for recorded events, and that a daemon nobody scrapes never loads
prometheus_client (issue 5: idle RSS; it brings http.server, wsgiref, gzip and more)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from neonlocal.metrics import ErrorKind, LiveState, Metrics

# What the daemon showed for the events of `_recorded` when prometheus_client's own
# Counter and Histogram kept the counts, with the _created series switched off.
BEFORE = """\
# HELP neonlocal_sessions_total Client sessions routed to a branch since the daemon started.
# TYPE neonlocal_sessions_total counter
neonlocal_sessions_total{branch="main"} 1.0
# HELP neonlocal_bytes_total Bytes relayed between clients and branches, counted when each session ends.
# TYPE neonlocal_bytes_total counter
neonlocal_bytes_total{branch="main",direction="to_upstream"} 1234.0
neonlocal_bytes_total{branch="main",direction="to_client"} 56789.0
# HELP neonlocal_upstream_connect_seconds Time to open a verified TLS connection to a branch (a waking compute is slow).
# TYPE neonlocal_upstream_connect_seconds histogram
neonlocal_upstream_connect_seconds_bucket{branch="main",le="0.005"} 1.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="0.01"} 1.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="0.025"} 1.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="0.05"} 1.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="0.1"} 1.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="0.25"} 1.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="0.5"} 1.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="1.0"} 2.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="2.5"} 2.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="5.0"} 2.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="10.0"} 2.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="30.0"} 2.0
neonlocal_upstream_connect_seconds_bucket{branch="main",le="+Inf"} 3.0
neonlocal_upstream_connect_seconds_count{branch="main"} 3.0
neonlocal_upstream_connect_seconds_sum{branch="main"} 45.705
# HELP neonlocal_errors_total Sessions and cancel requests that failed, by kind.
# TYPE neonlocal_errors_total counter
neonlocal_errors_total{kind="upstream_unreachable"} 1.0
neonlocal_errors_total{kind="tls"} 0.0
neonlocal_errors_total{kind="upstream_closed"} 0.0
neonlocal_errors_total{kind="auth"} 2.0
neonlocal_errors_total{kind="upstream_rejected"} 0.0
neonlocal_errors_total{kind="protocol"} 0.0
neonlocal_errors_total{kind="startup_timeout"} 0.0
neonlocal_errors_total{kind="too_many"} 0.0
neonlocal_errors_total{kind="no_branch"} 0.0
neonlocal_errors_total{kind="cancel_failed"} 0.0
# HELP neonlocal_sessions_open Client sessions open now, by branch.
# TYPE neonlocal_sessions_open gauge
neonlocal_sessions_open{branch="dev"} 0.0
neonlocal_sessions_open{branch="main"} 1.0
# HELP neonlocal_branch_info The branch new sessions go to (value 1); absent when none is selected.
# TYPE neonlocal_branch_info gauge
neonlocal_branch_info{branch="main",upstream="ep-x.us-east-2.aws.neon.tech:5432"} 1.0
"""  # noqa: E501 - the lines as scraped

_CREATED = re.compile(r"^(neonlocal_\w+)_created\{(.*)\} (\S+)$")


def _recorded() -> Metrics:
    live = LiveState({"main": 1, "dev": 0}, "main", "ep-x.us-east-2.aws.neon.tech:5432")
    metrics = Metrics(lambda: live)
    metrics.error(ErrorKind.AUTH)
    metrics.error(ErrorKind.UPSTREAM_UNREACHABLE)
    metrics.error(ErrorKind.AUTH)
    metrics.session_opened("main")
    metrics.session_closed("main", to_upstream=1234, to_client=56789)
    # On a bucket's bound (it counts as `le`), in a later bucket, and past the last one.
    metrics.upstream_connected("main", 0.005)
    metrics.upstream_connected("main", 0.7)
    metrics.upstream_connected("main", 45.0)
    return metrics


def test_recorded_events_render_as_prometheus_client_rendered_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROMETHEUS_DISABLE_CREATED_SERIES", "true")
    assert _recorded().exposition().decode() == BEFORE


def test_each_series_shows_when_it_was_first_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_DISABLE_CREATED_SERIES", raising=False)
    start = time.time()
    metrics = _recorded()
    end = time.time()
    text = metrics.exposition().decode()

    created = {
        m[1] + "{" + m[2] + "}": float(m[3]) for m in map(_CREATED.match, text.splitlines()) if m
    }
    assert set(created) == {
        'neonlocal_sessions{branch="main"}',
        'neonlocal_bytes{branch="main",direction="to_upstream"}',
        'neonlocal_bytes{branch="main",direction="to_client"}',
        'neonlocal_upstream_connect_seconds{branch="main"}',
        *(f'neonlocal_errors{{kind="{kind.value}"}}' for kind in ErrorKind),
    }
    assert all(start <= stamp <= end for stamp in created.values()), created
    # Everything else is what it was with the _created series switched off.
    rest = [line for line in text.splitlines(keepends=True) if "_created" not in line]
    assert "".join(rest) == BEFORE


_PROBE = """
import json, sys
import neonlocal.metrics, neonlocal.proxy.server
idle = sorted(m for m in sys.modules if m.split(".")[0] in ("prometheus_client", "wsgiref")
              or m == "http.server")
neonlocal.metrics.Metrics().exposition()
print(json.dumps({"idle": idle, "scraped": "prometheus_client" in sys.modules}))
"""


def test_prometheus_client_is_loaded_by_the_first_scrape_only() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(result.stdout)
    assert loaded == {"idle": [], "scraped": True}
