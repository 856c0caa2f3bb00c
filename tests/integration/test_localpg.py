"""The local computes behave like Neon's: TLS-only, SCRAM, verifiable Neon-style certificates."""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path

import asyncpg
import psycopg
import pytest

from fixtures.pg import TEST_PASSWORD, MakeCompute, endpoint_host
from fixtures.sni import SSL_REQUEST_CODE, SniRecorder
from neonlocal.localpg import LocalCompute
from neonlocal.tls.certs import CertificateAuthority, KeyPair

LIBPQ_VERSION = psycopg.pq.version()


def _conninfo(compute: LocalCompute, ca_file: Path, **overrides: str) -> str:
    params = {
        "host": compute.spec.hostname,
        "hostaddr": compute.spec.listen_addr,
        "port": str(compute.spec.port),
        "user": compute.role,
        "password": compute.password,
        "dbname": compute.database,
        "sslmode": "verify-full",
        "sslrootcert": str(ca_file),
        "connect_timeout": "5",
    }
    params.update(overrides)
    return psycopg.conninfo.make_conninfo(**params)


@pytest.mark.pg
@pytest.mark.parametrize(
    ("branch", "labels"),
    [("main", ["apple", "banana"]), ("dev", ["apple", "banana", "cherry (dev only)"])],
)
def test_verified_tls_connection_reaches_the_right_branch(
    computes: dict[str, LocalCompute], ca_file: Path, branch: str, labels: list[str]
) -> None:
    """A client using host=<endpoint> hostaddr=<ip> verify-full lands on that branch's data."""
    compute = computes[branch]
    with psycopg.connect(_conninfo(compute, ca_file)) as conn:
        assert conn.execute("SELECT name FROM branch_info").fetchall() == [(branch,)]
        assert [r[0] for r in conn.execute("SELECT label FROM items ORDER BY id")] == labels
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)


@pytest.mark.pg
def test_url_connects_like_a_neon_connection_string(
    compute_main: LocalCompute, ca_file: Path
) -> None:
    """compute.url() is a complete libpq URL: TLS verified against the endpoint hostname."""
    url = compute_main.url(ca_file=ca_file)
    assert "sslmode=verify-full" in url
    with psycopg.connect(url, connect_timeout=5) as conn:
        assert conn.execute("SELECT name FROM branch_info").fetchone() == ("main",)
        assert conn.info.host == compute_main.spec.hostname


@pytest.mark.pg
def test_plaintext_tcp_connection_is_refused(compute_main: LocalCompute, ca_file: Path) -> None:
    """Like Neon, a compute refuses unencrypted TCP even with the right password."""
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(_conninfo(compute_main, ca_file, sslmode="disable"))


@pytest.mark.pg
async def test_wrong_password_fails_with_28p01(compute_main: LocalCompute, ca_file: Path) -> None:
    """A wrong password is rejected with SQLSTATE 28P01 (invalid_password)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    # asyncpg cannot separate host name from address (no hostaddr=), so it connects by IP and
    # cannot check the name; the chain is still verified. Hostname checks are tested below.
    context.check_hostname = False
    with pytest.raises(asyncpg.InvalidPasswordError) as excinfo:
        await asyncpg.connect(
            host=compute_main.spec.listen_addr,
            port=compute_main.spec.port,
            user=compute_main.role,
            password=TEST_PASSWORD + "-wrong",
            database=compute_main.database,
            ssl=context,
            timeout=5,
        )
    assert excinfo.value.sqlstate == "28P01"


@pytest.mark.pg
def test_server_offers_scram_sha_256_plus_over_tls(
    compute_main: LocalCompute, ca_file: Path
) -> None:
    """channel_binding=require succeeds: the server offers SCRAM-SHA-256-PLUS over TLS."""
    with psycopg.connect(_conninfo(compute_main, ca_file, channel_binding="require")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (compute_main.role,)


@pytest.mark.pg
def test_verify_full_rejects_a_hostname_outside_the_certificate(
    compute_main: LocalCompute, ca_file: Path
) -> None:
    """A host name the wildcard does not cover fails certificate verification."""
    other_region = endpoint_host("ep-main-100001", region="ap-southeast-1")
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(_conninfo(compute_main, ca_file, host=other_region))


@pytest.mark.pg
def test_verify_full_rejects_a_certificate_from_another_ca(
    compute_main: LocalCompute, tmp_path: Path
) -> None:
    """Trusting a different CA makes the compute's certificate fail verification."""
    stranger = tmp_path / "other-ca.crt"
    stranger.write_bytes(CertificateAuthority.create("some other CA").cert_pem)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(_conninfo(compute_main, stranger))


@pytest.mark.pg
def test_python_strict_x509_verification_accepts_the_compute_certificate(
    compute_dev: LocalCompute, ca_file: Path
) -> None:
    """Python's ssl with VERIFY_X509_STRICT (3.13's default) accepts the compute's certificate."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    address = (compute_dev.spec.listen_addr, compute_dev.spec.port)
    with socket.create_connection(address, timeout=5) as raw:
        raw.sendall(struct.pack("!ii", 8, SSL_REQUEST_CODE))
        assert raw.recv(1) == b"S"
        with context.wrap_socket(raw, server_hostname=compute_dev.spec.hostname) as tls:
            assert tls.version() in {"TLSv1.2", "TLSv1.3"}
            peer = tls.getpeercert()
    assert peer is not None
    assert ("DNS", "*.us-east-2.aws.neon.tech") in peer["subjectAltName"]


def test_sni_recorder_records_the_endpoint_hostname_a_client_sends(
    sni_recorder: SniRecorder, ca_file: Path
) -> None:
    """The recorder sees the SNI (and ALPN) libpq sends, then hangs up."""
    hostname = endpoint_host("ep-sni-300003")
    conninfo = psycopg.conninfo.make_conninfo(
        host=hostname,
        hostaddr=sni_recorder.host,
        port=sni_recorder.port,
        user="neondb_owner",
        dbname="neondb",
        sslmode="verify-full",
        sslrootcert=str(ca_file),
        connect_timeout=5,
    )
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(conninfo)
    [hello] = sni_recorder.wait_for(1)
    assert hello.server_name == hostname
    assert hello.handshake_error is None  # the client accepted the wildcard certificate
    assert not hello.direct_tls
    # libpq sends ALPN "postgresql" from version 17 on.
    assert hello.alpn == ("postgresql" if LIBPQ_VERSION >= 170000 else None)


@pytest.mark.skipif(LIBPQ_VERSION < 170000, reason="direct TLS needs libpq 17+")
def test_sni_recorder_accepts_direct_tls(sni_recorder: SniRecorder, ca_file: Path) -> None:
    """PostgreSQL 17's direct TLS (no SSLRequest) is recorded too."""
    hostname = endpoint_host("ep-direct-400004", region="eu-central-1")
    conninfo = psycopg.conninfo.make_conninfo(
        host=hostname,
        hostaddr=sni_recorder.host,
        port=sni_recorder.port,
        sslmode="verify-full",
        sslnegotiation="direct",
        sslrootcert=str(ca_file),
        connect_timeout=5,
    )
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(conninfo)
    [hello] = sni_recorder.wait_for(1)
    assert hello.server_name == hostname
    assert hello.direct_tls


@pytest.mark.pg
def test_own_compute_can_be_stopped_and_started_again(
    make_compute: MakeCompute, ca_file: Path
) -> None:
    """A stopped compute refuses connections; started again, it serves the same data."""
    compute = make_compute("restartable")
    assert compute.is_running()
    compute.stop()
    assert not compute.is_running()
    with pytest.raises(psycopg.OperationalError, match="refused"):
        psycopg.connect(_conninfo(compute, ca_file))
    compute.start()
    with psycopg.connect(_conninfo(compute, ca_file)) as conn:
        assert conn.execute("SELECT name FROM branch_info").fetchone() == ("restartable",)


@pytest.mark.pg
def test_superuser_dsn_reaches_the_compute_over_its_unix_socket(
    compute_main: LocalCompute,
) -> None:
    """superuser_dsn() logs in as a superuser over the socket, for seeding test data."""
    with psycopg.connect(compute_main.superuser_dsn(), connect_timeout=5) as conn:
        assert conn.info.host == str(compute_main.socket_dir)
        assert conn.execute("SELECT current_setting('is_superuser')").fetchone() == ("on",)
        assert conn.execute("SELECT name FROM branch_info").fetchone() == ("main",)


@pytest.mark.pg
def test_password_never_appears_in_reprs_urls_or_server_log(
    compute_main: LocalCompute, ca_file: Path, region_tls: KeyPair
) -> None:
    """The compute's password stays out of its repr, password-less URLs and the server log."""
    with psycopg.connect(_conninfo(compute_main, ca_file)):
        pass
    assert TEST_PASSWORD in compute_main.url()  # the check below could fail
    assert TEST_PASSWORD not in repr(compute_main)
    assert TEST_PASSWORD not in compute_main.url(ca_file=ca_file, password=False)
    log = compute_main.server_log()
    assert "connection authorized: user=neondb_owner" in log
    assert TEST_PASSWORD not in log
    assert "PRIVATE KEY" not in repr(region_tls)
