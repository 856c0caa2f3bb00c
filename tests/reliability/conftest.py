"""Fixtures of the reliability suite, and the figures it reports for RESULTS.md.

Each test records what it measured with ``figures.record(...)``; the figures are printed at
the end of the run and, when ``NEONLOCAL_RELIABILITY_RESULTS`` names a file, written there
as JSON, so a release run can copy them into RESULTS.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

RESULTS_ENV = "NEONLOCAL_RELIABILITY_RESULTS"
_FIGURES: dict[str, dict[str, Any]] = {}


class Figures:
    """What one test measured: sessions, durations, faults, fuzz cases, failures, RSS."""

    def __init__(self, test: str) -> None:
        self.test = test

    def record(self, **values: Any) -> None:
        _FIGURES.setdefault(self.test, {}).update(values)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node.nodeid.split("::", 1)[-1])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for test, values in _FIGURES.items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        terminalreporter.write_line(f"{test}: {shown}")
    target = os.environ.get(RESULTS_ENV)
    if target:
        Path(target).write_text(json.dumps(_FIGURES, indent=2, default=str) + "\n")
