"""The daemon's own TLS for local clients.

On first start the daemon makes a small CA and a server certificate for localhost,
127.0.0.1 and ::1, kept beside the config (``tls/``; keys 0600), and renews the server
certificate well before it expires. ``neonlocal trust`` shows how to make clients trust the
CA, so ``sslmode=verify-full`` against localhost works. A user may configure their own
certificate and key instead.

Every start reads the expiry of the certificate it already has; only making one needs
``cryptography``, so it is imported then and not before (README, "The daemon's memory").
"""

from __future__ import annotations

import datetime
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import x509 as asn1_x509

from neonlocal.children import child_argv, child_env
from neonlocal.errors import UserError

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# The local CA may only ever vouch for these: `neonlocal trust --install` puts it in libpq's
# trust file, and a leaked key must not be able to impersonate anything else.
LOCAL_CA_SCOPE = ("localhost", "127.0.0.0/8", "::1/128")
# PostgreSQL's ALPN protocol name; direct TLS (PostgreSQL 17) clients must agree on it.
LOCAL_ALPN = "postgresql"
CA_DAYS = 3650
SERVER_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)


class LocalTlsError(UserError):
    """The local certificate cannot be made or loaded; one line for the user."""


@dataclass(frozen=True)
class LocalTls:
    context: ssl.SSLContext
    certificate_der: bytes
    cert_path: Path
    ca_path: Path | None


def tls_dir(config_path: Path) -> Path:
    return config_path.parent / "tls"


def certificate_expiry(pem: str) -> datetime.datetime:
    """When a PEM certificate stops being valid (its notAfter), in UTC; ValueError if unreadable.

    asn1crypto reads it: scramp already has it loaded for channel binding, whereas
    ``cryptography`` would add several MB to a daemon that only needs this one date.
    """
    der = ssl.PEM_cert_to_DER_cert(pem)
    try:
        certificate = asn1_x509.Certificate.load(der)
        expiry = certificate["tbs_certificate"]["validity"]["not_after"].native
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"unreadable certificate: {exc}") from None
    if not isinstance(expiry, datetime.datetime):
        raise ValueError("certificate validity is not a time")
    return expiry.astimezone(datetime.UTC)


def _needs_new_server_cert(cert_path: Path, now: datetime.datetime) -> bool:
    try:
        expiry = certificate_expiry(cert_path.read_text())
    except (OSError, ValueError):
        return True
    return expiry - now < RENEW_BEFORE


def _check_pair(cert_path: Path, key_path: Path) -> None:
    """Refuse a certificate and key that do not belong together (ValueError), as loading
    them into ``cryptography`` would, without loading it: OpenSSL compares them."""
    try:
        # The password callback stops OpenSSL from prompting on the terminal for a key
        # that turns out to be encrypted: ours never are, so that is an error too.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            cert_path, key_path, password=lambda: b""
        )
    except ssl.SSLError as exc:
        raise ValueError(f"{cert_path} and {key_path}: {exc}") from None


def _files(directory: Path) -> tuple[Path, Path, Path, Path]:
    """The CA certificate and key, then the server certificate and key."""
    return (
        directory / "ca.crt",
        directory / "ca.key",
        directory / "server.crt",
        directory / "server.key",
    )


def _anything_to_make(directory: Path) -> bool:
    """Whether `ensure_generated` would make a certificate; ValueError for a CA whose
    certificate and key do not belong together, which it could not renew with."""
    ca_cert, ca_key, cert, key = _files(directory)
    if not (ca_cert.exists() and ca_key.exists()):
        return True
    _check_pair(ca_cert, ca_key)
    now = datetime.datetime.now(datetime.UTC)
    return _needs_new_server_cert(cert, now) or not key.exists()


def ensure_generated(directory: Path) -> tuple[Path, Path, Path]:
    """The CA and server certificate in ``directory``, made or renewed as needed."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_cert, ca_key, cert, key = _files(directory)
    if _anything_to_make(directory):
        from neonlocal.tls.certs import CertificateAuthority, KeyPair, write_keypair

        if ca_cert.exists() and ca_key.exists():
            pair = KeyPair(ca_cert.read_bytes(), ca_key.read_bytes())
            ca = CertificateAuthority.from_keypair(pair)
        else:
            ca = CertificateAuthority.create(
                "neonlocal local CA", days=CA_DAYS, only_names=LOCAL_CA_SCOPE
            )
            write_keypair(ca.as_keypair(), ca_cert, ca_key)
        # Always a new server certificate: a new CA (the old key was lost) could not vouch
        # for the old one.
        write_keypair(ca.issue(LOCAL_NAMES, days=SERVER_DAYS), cert, key)
    return cert, key, ca_cert


def _generated_apart(directory: Path) -> tuple[Path, Path, Path]:
    """`ensure_generated` for the daemon: what has to be made is made by a short-lived child
    process, so that ``cryptography`` never enters the daemon. Checking what is there needs
    only ``ssl``."""
    directory = directory.absolute()  # the child runs in it: a relative path would double
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_cert, _ca_key, cert, key = _files(directory)
    if not _anything_to_make(directory):
        return cert, key, ca_cert
    argv = child_argv("neonlocal.tls.local", str(directory))
    if argv is None:
        return ensure_generated(directory)
    try:
        done = subprocess.run(
            argv,
            cwd=directory,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ValueError(f"cannot run {sys.executable} to make the certificate: {exc}") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ValueError(lines[-1] if lines else f"exit status {done.returncode}")
    return cert, key, ca_cert


def load_local_tls(
    config_path: Path, cert_path: Path | None = None, key_path: Path | None = None
) -> LocalTls:
    ca_path: Path | None = None
    try:
        if cert_path is None or key_path is None:
            cert_path, key_path, ca_path = _generated_apart(tls_dir(config_path))
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


def _main(argv: list[str]) -> int:
    """``python -m neonlocal.tls.local DIR``: `ensure_generated`, for `_generated_apart`."""
    try:
        ensure_generated(Path(argv[0]))
    except (OSError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
