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
from fixtures.dns import faked_dns, recorded_connects
from fixtures.pg import TEST_PASSWORD, endpoint_host
from neonlocal.localpg import LocalCompute
from neonlocal.tls.certs import KeyPair


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


# --- no sslnegotiation in the URL: direct TLS for Neon's hosts, learned once per host ------

NEON_NAMED = endpoint_host("ep-inner-600006")


def neon_style(host: str, port: int, ca_file: Path) -> str:
    """A URL as Neon prints it (no sslnegotiation, no hostaddr), for ``host``."""
    query = urllib.parse.urlencode({"sslmode": "require", "sslrootcert": str(ca_file)}, safe="/")
    return f"postgresql://neondb_owner:{TEST_PASSWORD}@{host}:{port}/neondb?{query}"


@pytest.fixture
async def neon_like_inner(
    workdir: Path, branch_urls: dict[str, str], region_tls: KeyPair
) -> AsyncIterator[LocalDaemon]:
    """A daemon that, like Neon's edge, presents the region's certificate and takes direct
    TLS; it serves the "main" compute."""
    home = workdir / "inner"
    home.mkdir(mode=0o700)
    (home / "edge.crt").write_bytes(region_tls.cert_pem)
    (home / "edge.key").write_bytes(region_tls.key_pem)
    (home / "edge.key").chmod(0o600)
    extra = f'[local]\ntls_cert = "{home / "edge.crt"}"\ntls_key = "{home / "edge.key"}"'
    async with serving(home, branch_urls, extra) as running:
        yield running


async def test_a_neon_host_gets_direct_tls_without_asking(
    workdir: Path,
    neon_like_inner: LocalDaemon,
    ca_file: Path,
    capsys: pytest.CaptureFixture[str],
    no_unhandled_errors: list[object],
) -> None:
    """A pasted Neon URL says nothing of sslnegotiation: its host is Neon's, so the daemon
    saves the SSLRequest round trip, on one connection per session."""
    async with faked_dns(NEON_NAMED) as dns:
        url = neon_style(NEON_NAMED, neon_like_inner.port, ca_file)
        async with (
            recorded_connects({neon_like_inner.port}, dns) as connects,
            serving(workdir, {"neon": url}, branch="neon") as outer,
        ):
            assert await branch_of_new_session(outer) == "main"
            assert await branch_of_new_session(outer) == "main"
    assert len(connects) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "session_ready" in line]
    assert all("tls_direct=True" in line for line in lines if "branch=neon" in line)
    assert all("client_tls=direct" in line for line in lines if "branch=main" in line)


async def test_a_neon_named_server_without_direct_tls_is_learned_once(
    workdir: Path,
    compute_main: LocalCompute,
    ca_file: Path,
    capsys: pytest.CaptureFixture[str],
    no_unhandled_errors: list[object],
) -> None:
    """PostgreSQL 16 and older hang up on a ClientHello: the first session retries with an
    SSLRequest at once, and later ones start with it. No client sees an error."""
    async with faked_dns(NEON_NAMED) as dns:
        dns.answer = compute_main.spec.listen_addr
        url = neon_style(NEON_NAMED, compute_main.spec.port, ca_file)
        async with (
            recorded_connects({compute_main.spec.port}, dns) as connects,
            serving(workdir, {"old": url}, branch="old") as daemon,
        ):
            assert await branch_of_new_session(daemon) == "main"
            assert len(connects) == 2  # the ClientHello refused, then the SSLRequest
            assert await branch_of_new_session(daemon) == "main"
            assert await branch_of_new_session(daemon) == "main"
            assert len(connects) == 4
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "session_ready" in line]
    assert len(lines) == 3
    assert all("tls_direct=False" in line for line in lines)
    assert out.count("direct_tls_refused") == 1
