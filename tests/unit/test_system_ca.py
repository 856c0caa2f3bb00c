"""Which CAs the daemon trusts when nothing names one: the system's, read only as needed.

Each test builds its own "system store" (a hashed directory as update-ca-certificates
writes, or a bundle file) and hands it to the code the way OpenSSL reports it, then makes
real TLS handshakes against servers whose certificates chain to roots inside or outside it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from neon_standin import NeonStandIn
from neonlocal.config.values import BranchSettings, Secret
from neonlocal.neon import ApiUnreachable, NeonApi
from neonlocal.proxy import tls
from neonlocal.targets import build_target
from neonlocal.tls.certs import CertificateAuthority
from neonlocal.tls.system_ca import system_context

HOST = "ep-trust-100001.us-east-2.aws.neon.tech"


@pytest.fixture(scope="module")
def roots() -> dict[str, CertificateAuthority]:
    names = ("system root one", "system root two", "chosen root", "outside root")
    return {name: CertificateAuthority.create(name) for name in names}


def hashed_store(directory: Path, *cas: CertificateAuthority) -> Path:
    """A directory as `update-ca-certificates` leaves /etc/ssl/certs: PEMs under hash links."""
    directory.mkdir()
    for number, ca in enumerate(cas):
        pem = directory / f"root-{number}.pem"
        pem.write_bytes(ca.cert_pem)
        subject_hash = subprocess.run(
            ["openssl", "x509", "-noout", "-subject_hash", "-in", str(pem)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (directory / f"{subject_hash}.0").symlink_to(pem.name)
    return directory


def bundle(path: Path, *cas: CertificateAuthority) -> Path:
    path.write_bytes(b"".join(ca.cert_pem for ca in cas))
    return path


def openssl_paths(cafile: Path | None, capath: Path | None) -> ssl.DefaultVerifyPaths:
    """What ssl.get_default_verify_paths() would report for such a system."""
    return ssl.DefaultVerifyPaths(
        str(cafile) if cafile else None,
        str(capath) if capath else None,
        "SSL_CERT_FILE",
        str(cafile),
        "SSL_CERT_DIR",
        str(capath),
    )


@pytest.fixture
def system_store(
    tmp_path: Path, roots: dict[str, CertificateAuthority], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """This machine's CA store, for the code under test: a hashed directory of two roots."""
    store = hashed_store(tmp_path / "certs", roots["system root one"], roots["system root two"])
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: openssl_paths(None, store))
    tls.forget_contexts()
    yield store
    tls.forget_contexts()


def server_context(ca: CertificateAuthority, tmp_path: Path, host: str = HOST) -> ssl.SSLContext:
    pair = ca.issue([host])
    cert, key = tmp_path / f"{host}.crt", tmp_path / f"{host}.key"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> None:
    """One TLS handshake between the two contexts; raises what the client's side raised."""
    ours, theirs = socket.socketpair()

    def serve() -> None:
        try:
            with server.wrap_socket(theirs, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass  # the client refused us: what the test is about

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(ours, server_hostname=HOST):
            pass
    finally:
        thread.join(10)
        theirs.close()


def trusted(context: ssl.SSLContext) -> set[str]:
    """The roots the context holds in memory right now."""
    return {dict(part[0] for part in ca["subject"])["commonName"] for ca in context.get_ca_certs()}


def test_the_system_store_is_read_only_for_the_root_a_handshake_needs(
    system_store: Path, roots: dict[str, CertificateAuthority], tmp_path: Path
) -> None:
    context = system_context()
    assert trusted(context) == set()  # nothing held before a server asks

    handshake(context, server_context(roots["system root two"], tmp_path))

    assert trusted(context) == {"system root two"}


def test_a_server_whose_root_the_system_does_not_hold_is_refused(
    system_store: Path, roots: dict[str, CertificateAuthority], tmp_path: Path
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(system_context(), server_context(roots["outside root"], tmp_path))


def test_a_system_without_a_hashed_directory_has_its_bundle_loaded(
    tmp_path: Path, roots: dict[str, CertificateAuthority]
) -> None:
    plain = tmp_path / "no-hash-links"
    plain.mkdir()
    (plain / "README").write_text("not a certificate")
    ca_bundle = bundle(tmp_path / "ca-bundle.crt", roots["system root one"])

    context = system_context(openssl_paths(ca_bundle, plain))

    assert trusted(context) == {"system root one"}
    handshake(context, server_context(roots["system root one"], tmp_path))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context, server_context(roots["outside root"], tmp_path))


def test_ssl_cert_file_is_trusted_as_openssl_and_libpq_trust_it(
    tmp_path: Path, roots: dict[str, CertificateAuthority], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle(tmp_path / "chosen.pem", roots["chosen root"])))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    context = system_context()  # the real ssl.get_default_verify_paths(), reading the variable

    assert "chosen root" in trusted(context)
    handshake(context, server_context(roots["chosen root"], tmp_path))


def test_a_branch_without_sslrootcert_verifies_against_the_system_store(
    system_store: Path, roots: dict[str, CertificateAuthority], tmp_path: Path
) -> None:
    target = build_target("b", BranchSettings(url=Secret(f"postgresql://u:pw@{HOST}/db")))
    context = tls.client_context(target)

    handshake(context, server_context(roots["system root one"], tmp_path))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context, server_context(roots["outside root"], tmp_path))
    assert trusted(context) == {"system root one"}


# --- the Neon API ---------------------------------------------------------------------------


def test_the_neon_api_is_trusted_through_the_system_store_not_a_bundle_of_its_own(
    system_store: Path, roots: dict[str, CertificateAuthority], tmp_path: Path
) -> None:
    """As behind a company's TLS-inspecting proxy: its root is in the system store only."""
    api_tls = server_context(roots["system root one"], tmp_path, host="127.0.0.1")

    async def fetch(api: NeonStandIn) -> str:
        async with NeonApi(api.api_key, api.base_url) as client:
            return (await client.get_project(api.project_id)).id

    with NeonStandIn(tls=api_tls) as api:
        assert api.base_url.startswith("https://")
        assert asyncio.run(fetch(api)) == api.project_id


def test_an_untrusted_neon_api_certificate_is_one_clear_error_without_retries(
    system_store: Path, roots: dict[str, CertificateAuthority], tmp_path: Path
) -> None:
    api_tls = server_context(roots["outside root"], tmp_path, host="127.0.0.1")
    waits: list[float] = []

    async def record_wait(seconds: float) -> None:
        waits.append(seconds)

    async def fetch(api: NeonStandIn) -> None:
        async with NeonApi(api.api_key, api.base_url, sleep=record_wait) as client:
            await client.get_project(api.project_id)

    with NeonStandIn(tls=api_tls) as api:
        with pytest.raises(ApiUnreachable) as raised:
            asyncio.run(fetch(api))

        assert str(raised.value) == (
            f"cannot reach the Neon API at {api.base_url}: its TLS certificate is not trusted "
            "by this system's CA store (unable to get local issuer certificate)"
        )
        assert waits == []  # given up at once: a retry would meet the same certificate
        assert api.requests_to("*") == []
