"""Fixtures for end-to-end tests: a daemon in front of the shared computes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, write_config


@pytest.fixture
async def daemon(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    """A daemon serving branch "main", with "dev" configured too."""
    config = write_config(workdir / "config.toml", branch_urls, branch="main")
    async with running_daemon(config, daemon_env(workdir)) as running:
        yield running
