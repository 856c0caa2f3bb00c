"""Fixtures of the reliability suite, and the figures it reports for RESULTS.md.

Each test records what it measured with ``figures.record(...)``; the figures are printed at
the end of the run and, when ``NEONLOCAL_RELIABILITY_RESULTS`` names a file, written there
as JSON, so a release run can copy them into RESULTS.md.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import private_dir
from neonlocal.localpg import LocalCompute

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


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private directory for one test's config file, logs and control socket."""
    path = private_dir("neonlocal-rel-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def branch_urls(computes: dict[str, LocalCompute], ca_file: Path) -> dict[str, str]:
    """Connection strings for the two shared branches, as `neon connection-string` prints."""
    return {name: c.url(ca_file=ca_file) for name, c in computes.items()}


@pytest.fixture
async def no_unhandled_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Fails the test if any task of the in-process daemon died with an unhandled exception."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    gc.collect()  # "Task exception was never retrieved" is reported when the task is freed
    loop.set_exception_handler(previous)
    assert seen == []
