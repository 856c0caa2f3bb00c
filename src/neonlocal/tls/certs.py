"""A small certificate authority: issue server certificates for hostnames and write them to disk.

The daemon uses it for its own local TLS certificate; the offline demo and the tests use it to
give local PostgreSQL clusters Neon-like certificates (one wildcard per region).

Certificates are built to pass strict verifiers: Python's ``ssl`` with ``VERIFY_X509_STRICT``
(the default from 3.13) and libpq's ``sslmode=verify-full``. That needs a critical
BasicConstraints and KeyUsage on every certificate, key identifiers (SKI/AKI) and, on leaves,
the names in a SubjectAltName extension — CommonName alone is ignored by modern clients.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "KeyPair", "write_keypair"]

# Clocks of a client and a freshly started server may disagree by a little.
_BACKDATE = datetime.timedelta(hours=1)
# X.509 caps CommonName at 64 characters; long names still work through the SAN.
_MAX_CN = 64


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key (unencrypted, so never shown in reprs)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: generation takes microseconds, and every TLS stack we meet supports it.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_name(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def _constraint(name: str) -> x509.GeneralName:
    """A permitted subtree: a host name, or an IP address/network ("127.0.0.0/8")."""
    try:
        return x509.IPAddress(ipaddress.ip_network(name, strict=False))
    except ValueError:
        return x509.DNSName(name)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise ValueError(f"certificate validity must be at least one day, got {days}")
    now = datetime.datetime.now(datetime.UTC)
    return now - _BACKDATE, now + datetime.timedelta(days=days)


class CertificateAuthority:
    """A self-signed CA held in memory; `issue` signs server certificates with it."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self._cert = cert

    def __repr__(self) -> str:
        return f"CertificateAuthority(subject={self._cert.subject.rfc4514_string()!r})"

    @classmethod
    def create(
        cls,
        common_name: str = "neonlocal test CA",
        days: int = 365,
        *,
        only_names: Sequence[str] = (),
    ) -> CertificateAuthority:
        """A self-signed CA; ``only_names`` limits what it may ever vouch for (name
        constraints), so a leaked key of a CA trusted for localhost cannot sign for others."""
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:_MAX_CN])])
        not_before, not_after = _validity(days)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # path_length=0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
        )
        if only_names:
            cert = cert.add_extension(
                x509.NameConstraints(
                    permitted_subtrees=[_constraint(n) for n in only_names],
                    excluded_subtrees=None,
                ),
                critical=True,
            )
        return cls(key, cert.sign(key, hashes.SHA256()))

    @classmethod
    def from_keypair(cls, pair: KeyPair) -> CertificateAuthority:
        """Load a CA saved earlier with `as_keypair` (so a daemon can keep one CA across runs)."""
        key = serialization.load_pem_private_key(pair.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("CA key must be an elliptic-curve key")
        cert = x509.load_pem_x509_certificate(pair.cert_pem)
        if cert.public_key() != key.public_key():
            raise ValueError("CA certificate and key do not belong together")
        return cls(key, cert)

    def as_keypair(self) -> KeyPair:
        return KeyPair(cert_pem=self.cert_pem, key_pem=_key_pem(self._key))

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, hostnames: Sequence[str], days: int = 90) -> KeyPair:
        """Sign a server certificate for `hostnames` (DNS names, wildcards, or IP addresses)."""
        if isinstance(hostnames, str):
            # A bare string is a sequence of one-letter names: certainly a mistake.
            raise TypeError("hostnames must be a sequence of names, not a single string")
        if not hostnames:
            raise ValueError("a certificate needs at least one hostname")
        key = _new_key()
        not_before, not_after = _validity(days)
        issuer_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0][:_MAX_CN])])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(min(not_after, self._cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([_general_name(h) for h in hostnames]),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return KeyPair(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key)
        )


def _atomic_write(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    # Mode and owner are set on the temporary file before the rename, so the final path never
    # exists with looser permissions or the wrong owner, not even for an instant.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _owner_ids(owner: str) -> tuple[int, int]:
    import pwd  # POSIX-only; imported here so the module still loads elsewhere

    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise ValueError(f"no such OS user: {owner!r}") from None
    return entry.pw_uid, entry.pw_gid


def write_keypair(pair: KeyPair, cert_path: Path, key_path: Path, owner: str | None = None) -> None:
    """Write certificate (0644) and key (0600, as PostgreSQL demands) atomically.

    `owner` (an OS user name) becomes the owner of both files, with that user's primary group;
    changing owners needs root.
    """
    ids = _owner_ids(owner) if owner is not None else None
    _atomic_write(Path(key_path), pair.key_pem, 0o600, ids)
    _atomic_write(Path(cert_path), pair.cert_pem, 0o644, ids)
