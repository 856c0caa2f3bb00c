"""A branch name becomes an upstream Target: where to connect, how to verify, who to be.

TLS policy lives here and nowhere else: a pasted URL's ``sslmode`` never weakens
verification (Neon's own strings say ``sslmode=require``, which in libpq would skip the
certificate check). Only the ``tls`` key of a ``[branches.NAME]`` table can opt out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from neonlocal.config.errors import UnknownBranch
from neonlocal.config.values import TlsMode
from neonlocal.conninfo import ConnInfoError, parse_conninfo, validate_upstream
from neonlocal.protect import Protection

if TYPE_CHECKING:
    from neonlocal.config.values import BranchSettings, Settings

__all__ = ["Target", "TargetError", "build_target", "resolve_target"]


class Negotiation(Enum):
    """How the upstream TLS begins."""

    POSTGRES = "postgres"
    """An SSLRequest first, then the handshake: what every PostgreSQL speaks."""
    DIRECT = "direct"
    """PostgreSQL 17's direct TLS: the ClientHello first, one round trip less (as libpq's
    sslnegotiation=direct, with no fallback)."""
    AUTO = "auto"
    """Direct for Neon's hosts reached by their own name (Neon's edge accepts it), falling
    back to POSTGRES, once per host, if the server will not take a ClientHello. POSTGRES for
    any other host, and for one given a ``hostaddr``: something else may listen there."""


# Hosts whose servers are Neon's edge, which accepts direct TLS.
NEON_DOMAIN = ".neon.tech"


@dataclass(frozen=True)
class Target:
    """Everything needed to open one upstream session for a branch."""

    branch: str
    host: str
    port: int
    # Connect to hostaddr when set, but `host` still drives SNI and the certificate check.
    hostaddr: str | None
    user: str | None
    password: str | None = field(repr=False)
    database: str | None
    pin_user: bool
    pin_database: bool
    options: str | None
    tls: TlsMode
    # None means the system trust store; otherwise a CA bundle file.
    sslrootcert: str | None
    channel_binding: str
    application_name: str | None
    # The URL's sslnegotiation (libpq 17's keyword), AUTO when it has none.
    negotiation: Negotiation = Negotiation.AUTO
    # How the branch is guarded, and whether its sessions log in read-only (protect.py).
    protection: Protection = Protection.NONE
    read_only: bool = False

    @property
    def connect_host(self) -> str:
        """The address the TCP connection goes to."""
        return self.hostaddr or self.host

    @property
    def tries_direct_tls(self) -> bool:
        """Whether a connection opens with the ClientHello (AUTO may still fall back)."""
        if self.negotiation is Negotiation.AUTO:
            return self.hostaddr is None and self.host.lower().rstrip(".").endswith(NEON_DOMAIN)
        return self.negotiation is Negotiation.DIRECT

    @property
    def insecure(self) -> bool:
        """True when the target opted out of full certificate verification."""
        return self.tls is not TlsMode.VERIFY_FULL

    def describe(self) -> str:
        """``host:port`` for messages and status; never carries a secret."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class TargetError(ConnInfoError):
    """A branch's connection settings cannot make a Target; names the branch."""

    def __init__(self, branch: str, reason: str) -> None:
        super().__init__(f'branch "{branch}": {reason}')
        self.branch = branch
        self.reason = reason


def build_target(name: str, branch: BranchSettings) -> Target:
    """Turn one ``[branches.NAME]`` table into a Target; raises TargetError."""
    if branch.url is None:
        raise TargetError(name, "has no url; it is found through the Neon API")
    try:
        info = parse_conninfo(branch.url.get_secret_value())
        validate_upstream(info)
    except ConnInfoError as exc:
        raise TargetError(name, exc.message) from None
    assert info.host is not None  # validate_upstream guarantees it
    negotiation = Negotiation.AUTO
    if "sslnegotiation" in info.extra:
        # libpq 17 knows only these two; "auto" is ours, for a URL that does not say.
        try:
            negotiation = Negotiation(info.extra["sslnegotiation"])
        except ValueError:
            negotiation = Negotiation.AUTO
        if negotiation is Negotiation.AUTO:
            raise TargetError(name, 'sslnegotiation must be "postgres" or "direct"')
    if negotiation is Negotiation.DIRECT and branch.tls is TlsMode.DISABLE:
        raise TargetError(name, 'sslnegotiation=direct needs TLS; the branch has tls = "disable"')
    sslrootcert = info.sslrootcert if info.sslrootcert != "system" else None
    return Target(
        branch=name,
        host=info.host,
        port=info.port,
        hostaddr=info.hostaddr,
        user=branch.user if branch.user is not None else info.user,
        password=info.password,
        database=branch.database if branch.database is not None else info.dbname,
        pin_user=branch.user is not None,
        pin_database=branch.database is not None,
        options=info.options,
        tls=branch.tls,
        sslrootcert=sslrootcert,
        channel_binding=info.channel_binding or "prefer",
        application_name=info.application_name,
        negotiation=negotiation,
    )


def resolve_target(settings: Settings, name: str) -> Target:
    """The Target for a configured branch name; raises UnknownBranch or TargetError."""
    branch = settings.branches.get(name)
    if branch is None:
        raise UnknownBranch(name, list(settings.branches))
    return build_target(name, branch)
