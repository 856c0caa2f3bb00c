"""Fixtures for end-to-end tests: a daemon in front of the shared computes."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fixtures.daemon import LocalDaemon, daemon_env, private_dir, running_daemon, write_config
from neonlocal.localpg import LocalCompute


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private directory for one test's config file and control socket."""
    path = private_dir("neonlocal-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def branch_urls(computes: dict[str, LocalCompute], ca_file: Path) -> dict[str, str]:
    """Connection strings for the two shared branches, as `neon connection-string` prints."""
    return {name: c.url(ca_file=ca_file) for name, c in computes.items()}


@pytest.fixture
async def daemon(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    """A daemon serving branch "main", with "dev" configured too."""
    config = write_config(workdir / "config.toml", branch_urls, branch="main")
    async with running_daemon(config, daemon_env(workdir)) as running:
        yield running
