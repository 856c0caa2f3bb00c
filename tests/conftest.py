"""Shared fixtures: a test CA, Neon-like local computes (real PostgreSQL), and an SNI recorder.

Session-scoped computes are shared by every test and must never be stopped or altered; a test
that stops, restarts or breaks a compute makes its own with `make_compute`.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from fixtures.daemon import private_dir
from fixtures.pg import (
    REGION_WILDCARDS,
    ComputeFarm,
    MakeCompute,
    pg_unavailable_reason,
)
from fixtures.sni import SniRecorder
from neonlocal.localpg import LocalCompute, find_pg_bindir, initdb_template, make_base_dir
from neonlocal.tls.certs import CertificateAuthority, KeyPair

SNI_RECORDER_HOST = "127.0.0.5"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pg: needs real PostgreSQL server binaries (skipped when they are missing)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    pg_items = [item for item in items if item.get_closest_marker("pg") is not None]
    if not pg_items:
        return
    reason = pg_unavailable_reason()
    if reason is not None:
        skip = pytest.mark.skip(reason=f"PostgreSQL unavailable: {reason}")
        for item in pg_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that configures structlog (the CLI does) must not change what the next one logs."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    """Directory of the PostgreSQL server binaries; skips the test when there are none."""
    reason = pg_unavailable_reason()
    if reason is not None:
        pytest.skip(f"PostgreSQL unavailable: {reason}")
    return find_pg_bindir()


@pytest.fixture(scope="session")
def tls_dir() -> Iterator[Path]:
    """A directory for certificates that every OS user (postgres included) may read."""
    path = Path(tempfile.mkdtemp(prefix="neonlocal-test-tls-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def test_ca() -> CertificateAuthority:
    return CertificateAuthority.create("neonlocal test CA")


@pytest.fixture(scope="session")
def ca_file(test_ca: CertificateAuthority, tls_dir: Path) -> Path:
    """The test CA certificate as a world-readable PEM file (for sslrootcert=)."""
    path = tls_dir / "ca.crt"
    path.write_bytes(test_ca.cert_pem)
    path.chmod(0o644)
    return path


@pytest.fixture(scope="session")
def region_tls(test_ca: CertificateAuthority) -> KeyPair:
    """One wildcard certificate per region, as Neon's edge presents."""
    return test_ca.issue(REGION_WILDCARDS)


@pytest.fixture(scope="session")
def compute_farm(pg_bindir: Path, region_tls: KeyPair) -> Iterator[ComputeFarm]:
    """Creates computes from one initdb template; stops and deletes them all at session end."""
    base_dir = make_base_dir("neonlocal-test-pg-")
    try:
        farm = ComputeFarm(
            base_dir=base_dir,
            tls=region_tls,
            template=initdb_template(base_dir, pg_bindir),
            bindir=pg_bindir,
        )
        yield farm
        farm.destroy_all()
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def compute_main(compute_farm: ComputeFarm) -> LocalCompute:
    """Branch "main": ep-main-100001.us-east-2.aws.neon.tech, preferably on 127.0.0.2:5432."""
    return compute_farm.create(
        "main",
        endpoint_id="ep-main-100001",
        addr="127.0.0.2",
        items=("apple", "banana"),
    )


@pytest.fixture(scope="session")
def compute_dev(compute_farm: ComputeFarm) -> LocalCompute:
    """Branch "dev": ep-dev-200002.us-east-2.aws.neon.tech, preferably on 127.0.0.3:5432."""
    return compute_farm.create(
        "dev",
        endpoint_id="ep-dev-200002",
        addr="127.0.0.3",
        items=("apple", "banana", "cherry (dev only)"),
    )


@pytest.fixture(scope="session")
def computes(compute_main: LocalCompute, compute_dev: LocalCompute) -> dict[str, LocalCompute]:
    """Both shared branches by name: {"main": ..., "dev": ...}."""
    return {"main": compute_main, "dev": compute_dev}


@pytest.fixture
def make_compute(compute_farm: ComputeFarm) -> Iterator[MakeCompute]:
    """Factory for a test's own compute: make_compute(name, addr=None, items=...).

    Each gets its own loopback address (127.0.0.4 upwards) and is destroyed after the test,
    so it may be stopped, restarted or broken freely.
    """
    made: list[LocalCompute] = []

    def make(name: str, addr: str | None = None, **kwargs: object) -> LocalCompute:
        compute = compute_farm.create(name, addr=addr, **kwargs)  # type: ignore[arg-type]
        made.append(compute)
        return compute

    yield make
    for compute in made:
        compute_farm.destroy(compute)


@pytest.fixture(scope="session")
def _sni_server(region_tls: KeyPair, tls_dir: Path) -> Iterator[SniRecorder]:
    recorder = SniRecorder(SNI_RECORDER_HOST, region_tls, tls_dir)
    yield recorder
    recorder.close()


@pytest.fixture
def sni_recorder(_sni_server: SniRecorder) -> SniRecorder:
    """A TLS listener at .host/.port recording each client's SNI and ALPN, fresh per test."""
    _sni_server.clear()
    return _sni_server


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private directory for one test's config file, logs and control socket."""
    path = private_dir("neonlocal-test-")
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


@pytest.fixture
def tls_server_context(region_tls: KeyPair, workdir: Path) -> ssl.SSLContext:
    """A server context with the region's wildcard certificate, as a real compute has."""
    cert, key = workdir / "server.crt", workdir / "server.key"
    cert.write_bytes(region_tls.cert_pem)
    key.write_bytes(region_tls.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
