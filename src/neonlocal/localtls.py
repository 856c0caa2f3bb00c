"""The daemon's own TLS for local clients.

On first start the daemon makes a small CA and a server certificate for localhost,
127.0.0.1 and ::1, kept beside the config (``tls/``; keys 0600), and renews the server
certificate well before it expires. ``neonlocal trust`` shows how to make clients trust the
CA, so ``sslmode=verify-full`` against localhost works. A user may configure their own
certificate and key instead.
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from neonlocal.certs import CertificateAuthority, KeyPair, write_keypair

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# The local CA may only ever vouch for these: `neonlocal trust --install` puts it in libpq's
# trust file, and a leaked key must not be able to impersonate anything else.
LOCAL_CA_SCOPE = ("localhost", "127.0.0.0/8", "::1/128")
# PostgreSQL's ALPN protocol name; direct TLS (PostgreSQL 17) clients must agree on it.
LOCAL_ALPN = "postgresql"
CA_DAYS = 3650
SERVER_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)


class LocalTlsError(Exception):
    """The local certificate cannot be made or loaded; one line for the user."""


@dataclass(frozen=True)
class LocalTls:
    context: ssl.SSLContext
    certificate_der: bytes
    cert_path: Path
    ca_path: Path | None


def tls_dir(config_path: Path) -> Path:
    return config_path.parent / "tls"


def _needs_new_server_cert(cert_path: Path, now: datetime.datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return True
    return cert.not_valid_after_utc - now < RENEW_BEFORE


def ensure_generated(directory: Path) -> tuple[Path, Path, Path]:
    """The CA and server certificate in ``directory``, made or renewed as needed."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_cert, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key = directory / "server.crt", directory / "server.key"
    now = datetime.datetime.now(datetime.UTC)
    new_ca = not (ca_cert.exists() and ca_key.exists())
    if new_ca:
        ca = CertificateAuthority.create(
            "neonlocal local CA", days=CA_DAYS, only_names=LOCAL_CA_SCOPE
        )
        write_keypair(ca.as_keypair(), ca_cert, ca_key)
    else:
        ca = CertificateAuthority.from_keypair(KeyPair(ca_cert.read_bytes(), ca_key.read_bytes()))
    # A new CA (its key was lost) cannot vouch for the old server certificate.
    if new_ca or _needs_new_server_cert(cert, now) or not key.exists():
        write_keypair(ca.issue(LOCAL_NAMES, days=SERVER_DAYS), cert, key)
    return cert, key, ca_cert


def load_local_tls(
    config_path: Path, cert_path: Path | None = None, key_path: Path | None = None
) -> LocalTls:
    ca_path: Path | None = None
    try:
        if cert_path is None or key_path is None:
            cert_path, key_path, ca_path = ensure_generated(tls_dir(config_path))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_path, key_path)
        # A client offering only other protocols gets no ALPN (Python's ssl cannot refuse it
        # in the handshake); a direct TLS session then checks for it and ends.
        ctx.set_alpn_protocols([LOCAL_ALPN])
        der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise LocalTlsError(f"neonlocal: cannot set up local TLS ({cert_path}): {exc}") from None
    return LocalTls(ctx, der, cert_path, ca_path)


def install_for_libpq(ca_path: Path, home: Path, *, system_cas: Path | None = None) -> Path:
    """Append our CA to ~/.postgresql/root.crt (libpq's default sslrootcert); idempotent.

    A root.crt that did not exist starts with ``system_cas`` (the system's trust bundle):
    once the file exists, libpq verifies ``sslmode=require`` connections against it too, and
    Neon's publicly signed certificates must keep passing.
    """
    target = home / ".postgresql" / "root.crt"
    target.parent.mkdir(mode=0o700, exist_ok=True)
    pem = ca_path.read_text()
    existing = target.read_text() if target.exists() else ""
    if not existing and system_cas is not None:
        existing = system_cas.read_text()
        target.write_text(existing)
    if pem.strip() not in existing:
        with target.open("a") as out:
            if existing and not existing.endswith("\n"):
                out.write("\n")
            out.write(pem)
    os.chmod(target, 0o600)
    return target
