"""The daemon's generated local CA and certificate: private keys, the right names, renewal."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from neonlocal.tls.certs import CertificateAuthority, KeyPair, write_keypair
from neonlocal.tls.local import (
    LOCAL_ALPN,
    RENEW_BEFORE,
    LocalTlsError,
    ensure_generated,
    install_for_libpq,
    load_local_tls,
    tls_dir,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_keys_are_private_and_the_directory_too(tmp_path: Path) -> None:
    cert, key, ca = ensure_generated(tmp_path / "tls")
    assert mode(tmp_path / "tls") == 0o700
    assert mode(key) == 0o600
    assert mode(tmp_path / "tls" / "ca.key") == 0o600
    # Certificates are public; clients read them.
    assert mode(cert) & 0o077 != 0o077
    assert certificate(ca).subject == certificate(cert).issuer


def test_the_server_certificate_names_localhost_and_both_loopback_addresses(
    tmp_path: Path,
) -> None:
    cert, _key, _ca = ensure_generated(tmp_path)
    names = certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(names.value.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


def test_a_certificate_expiring_within_30_days_is_renewed_by_the_same_ca(
    tmp_path: Path,
) -> None:
    cert, key, ca_path = ensure_generated(tmp_path)
    ca = CertificateAuthority.from_keypair(
        KeyPair((tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes())
    )
    days_left = RENEW_BEFORE.days - 1
    write_keypair(ca.issue(["localhost", "127.0.0.1", "::1"], days=days_left), cert, key)
    expiring = certificate(cert).not_valid_after_utc
    ca_before = ca_path.read_bytes()

    ensure_generated(tmp_path)

    renewed = certificate(cert)
    assert renewed.not_valid_after_utc - expiring > datetime.timedelta(days=300)
    assert ca_path.read_bytes() == ca_before
    assert mode(key) == 0o600
    renewed.verify_directly_issued_by(certificate(ca_path))


def test_a_valid_certificate_and_the_ca_are_kept_across_restarts(tmp_path: Path) -> None:
    """Clients that trusted the CA (or pinned nothing) keep working after a restart."""
    first = [p.read_bytes() for p in ensure_generated(tmp_path)]
    second = [p.read_bytes() for p in ensure_generated(tmp_path)]
    assert first == second


def test_an_existing_ca_signs_a_replacement_for_a_lost_server_certificate(
    tmp_path: Path,
) -> None:
    cert, key, ca = ensure_generated(tmp_path)
    ca_before = ca.read_bytes()
    cert.unlink()
    key.unlink()
    ensure_generated(tmp_path)
    assert ca.read_bytes() == ca_before
    certificate(cert).verify_directly_issued_by(certificate(ca))


def test_a_new_ca_gets_a_new_server_certificate(tmp_path: Path) -> None:
    """Had the CA's key been lost, the old server certificate could not be trusted through it."""
    cert, _key, ca = ensure_generated(tmp_path)
    (tmp_path / "ca.key").unlink()
    ensure_generated(tmp_path)
    certificate(cert).verify_directly_issued_by(certificate(ca))


def test_load_local_tls_serves_the_generated_certificate_beside_the_config(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.toml"
    local = load_local_tls(config)
    assert local.cert_path == tls_dir(config) / "server.crt"
    assert local.ca_path == tls_dir(config) / "ca.crt"
    assert local.certificate_der == ssl.PEM_cert_to_DER_cert(local.cert_path.read_text())
    assert local.context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert LOCAL_ALPN == "postgresql"


def test_a_configured_certificate_is_used_as_it_is(tmp_path: Path) -> None:
    pair = CertificateAuthority.create("my CA").issue(["localhost"])
    cert, key = tmp_path / "mine.crt", tmp_path / "mine.key"
    write_keypair(pair, cert, key)
    local = load_local_tls(tmp_path / "config.toml", cert, key)
    assert local.cert_path == cert
    assert local.ca_path is None
    assert not tls_dir(tmp_path / "config.toml").exists()


def test_a_missing_configured_key_is_one_clear_error(tmp_path: Path) -> None:
    pair = CertificateAuthority.create("my CA").issue(["localhost"])
    cert = tmp_path / "mine.crt"
    cert.write_bytes(pair.cert_pem)
    with pytest.raises(LocalTlsError, match="cannot set up local TLS") as caught:
        load_local_tls(tmp_path / "config.toml", cert, tmp_path / "missing.key")
    assert "BEGIN" not in str(caught.value)


def test_install_for_libpq_appends_once_and_keeps_what_was_there(tmp_path: Path) -> None:
    _cert, _key, ca = ensure_generated(tmp_path / "tls")
    home = tmp_path / "home"
    other = CertificateAuthority.create("a company CA").cert_pem.decode()
    (home / ".postgresql").mkdir(parents=True)
    (home / ".postgresql" / "root.crt").write_text(other.rstrip("\n"))  # no final newline

    target = install_for_libpq(ca, home)
    install_for_libpq(ca, home)

    text = target.read_text()
    assert text.startswith(other.rstrip("\n") + "\n")
    assert text.count(ca.read_text()) == 1
    assert mode(target) == 0o600
    loaded = ssl.create_default_context(cafile=target).get_ca_certs()
    assert len(loaded) == 2


def test_a_new_root_crt_starts_with_the_system_cas(tmp_path: Path) -> None:
    """libpq checks sslmode=require against root.crt once it exists: Neon must still pass."""
    _cert, _key, ca = ensure_generated(tmp_path / "tls")
    system = tmp_path / "system.pem"
    system.write_bytes(CertificateAuthority.create("a public root").cert_pem)
    (tmp_path / "home").mkdir()

    target = install_for_libpq(ca, tmp_path / "home", system_cas=system)

    assert target == tmp_path / "home" / ".postgresql" / "root.crt"
    assert mode(target.parent) == 0o700
    assert target.read_text() == system.read_text() + ca.read_text()


def test_the_local_ca_cannot_vouch_for_anything_but_localhost(tmp_path: Path) -> None:
    """A leaked local CA key, trusted for localhost, still cannot impersonate a Neon host."""
    ensure_generated(tmp_path)
    ca = CertificateAuthority.from_keypair(
        KeyPair((tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes())
    )
    forged = ca.issue(["ep-main-100001.us-east-2.aws.neon.tech"])
    cert_file, key_file = tmp_path / "forged.crt", tmp_path / "forged.key"
    write_keypair(forged, cert_file, key_file)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(
        c_in, c_out, server_hostname="ep-main-100001.us-east-2.aws.neon.tech"
    )
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls_client, tls_server, (c_in, c_out, s_in, s_out))


def _handshake(
    client: ssl.SSLObject, server: ssl.SSLObject, bios: tuple[ssl.MemoryBIO, ...]
) -> None:
    """Run a TLS handshake between two in-memory ends until it ends or fails."""
    c_in, c_out, s_in, s_out = bios
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
