"""sslnegotiation=direct in a branch URL: the upstream TLS handshake without an SSLRequest.

PostgreSQL 15 (the test computes) does not speak direct TLS, but neonlocal's own listener
does, as PostgreSQL 17 and Neon's edge do: so one daemon is put in front of another, the
inner one serving the real compute.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from fixtures.daemon import LocalDaemon, branch_of_new_session, serving
from fixtures.pg import TEST_PASSWORD
from neonlocal.localpg import LocalCompute


@pytest.fixture
async def inner(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    """A daemon with local TLS (the default), serving the "main" compute."""
    home = workdir / "inner"
    home.mkdir(mode=0o700)
    async with serving(home, branch_urls) as running:
        yield running


def via(inner: LocalDaemon, negotiation: str) -> str:
    """A Neon-style URL for the inner daemon, trusting its generated CA."""
    query = {
        "sslmode": "verify-full",
        "sslrootcert": str(inner.config_path.parent / "tls" / "ca.crt"),
        "hostaddr": "127.0.0.1",
        "sslnegotiation": negotiation,
    }
    return (
        f"postgresql://neondb_owner:{TEST_PASSWORD}@localhost:{inner.port}/neondb?"
        + urllib.parse.urlencode(query, safe="/")
    )


@pytest.mark.parametrize("negotiation", ["direct", "postgres"])
async def test_the_upstream_tls_starts_as_the_branch_url_says(
    workdir: Path,
    inner: LocalDaemon,
    negotiation: str,
    capsys: pytest.CaptureFixture[str],
    no_unhandled_errors: list[object],
) -> None:
    """With sslnegotiation=direct the server sees a ClientHello first, and the session works."""
    async with serving(workdir, {"chained": via(inner, negotiation)}, branch="chained") as outer:
        assert await branch_of_new_session(outer) == "main"
    lines = [line for line in capsys.readouterr().out.splitlines() if "session_ready" in line]
    outer_line = next(line for line in lines if "branch=chained" in line)
    inner_line = next(line for line in lines if "branch=main" in line)
    direct = negotiation == "direct"
    assert f"tls_direct={direct}" in outer_line
    assert f"client_tls={'direct' if direct else 'ssl_request'}" in inner_line


async def test_direct_tls_to_a_server_without_it_says_what_to_change(
    workdir: Path, computes: dict[str, LocalCompute], ca_file: Path
) -> None:
    """PostgreSQL 16 and older hang up on a ClientHello: the client is told why, in one line."""
    url = computes["main"].url(ca_file=ca_file) + "&sslnegotiation=direct"
    async with serving(workdir, {"old": url}, branch="old") as daemon:
        with pytest.raises(asyncpg.PostgresError) as caught:
            await asyncpg.connect(daemon.url(sslmode="disable"))
        assert caught.value.sqlstate == "08006"
        assert "may not support sslnegotiation=direct" in str(caught.value)
