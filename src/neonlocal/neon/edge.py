"""What Neon's edge proxy says during a login, and what it means.

The edge sends every connect-time error as SQLSTATE XX000, keeping only the message — even a
wrong password or the compute's own "sorry, too many clients already" (``proxy/src/stream.rs``
and ``proxy/src/proxy/mod.rs`` in neondatabase/neon; see shared/neon-notes.md). A client
straight on PostgreSQL would get 28P01 or 53300, and drivers, pools and our own credential
refresh decide by that code. ``meaning_of`` gives an edge error back the SQLSTATE PostgreSQL
would have used, says whether retrying can help, and what a user can do about it.

The rule it keeps: only an XX000 is read by its text. A server that sent a real code (bare
PostgreSQL, or the compute once a session is relayed) meant it, and is passed on unchanged;
an XX000 text we do not know passes through as it is.

Nothing here imports asyncio, sockets or the API client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "EdgeMeaning",
    "Retry",
    "dropped_by_edge",
    "fold_into_options",
    "is_neon_host",
    "is_pooler_host",
    "meaning_of",
]

EDGE_SQLSTATE = "XX000"

# The host names the edge serves by SNI (``proxy/src/auth/credentials.rs`` takes the endpoint
# id from the first label when the rest is one of its certificate domains).
NEON_DOMAIN = ".neon.tech"


class Retry(Enum):
    """Whether connecting again can help, as Neon's own code and docs say."""

    NEVER = "never"
    TRANSIENT = "transient"
    """A rate limit, a permit or a compute that could not be reached: try again soon."""
    AFTER_REFRESH = "after_refresh"
    """A refused password: fetch the credentials again; the edge caches role secrets for up
    to four minutes, so a fresh password can be refused for a while."""


@dataclass(frozen=True)
class EdgeMeaning:
    """An edge error read by its text."""

    sqlstate: str
    retry: Retry = Retry.NEVER
    advice: str | None = None


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    meaning: EdgeMeaning


def _rule(
    pattern: str, sqlstate: str, retry: Retry = Retry.NEVER, advice: str | None = None
) -> _Rule:
    return _Rule(re.compile(pattern, re.IGNORECASE), EdgeMeaning(sqlstate, retry, advice))


_QUOTA_ADVICE = "check the project's quotas and the endpoint's state in the Neon console"

# The edge's texts (proxy/src/auth/backend/, proxy/src/control_plane/errors.rs,
# proxy/src/proxy/connect_compute.rs, proxy/src/rate_limiter/) and the compute's own startup
# errors it re-wraps, with the SQLSTATE PostgreSQL uses for the same failure (Appendix A).
_RULES: tuple[_Rule, ...] = (
    _rule(r"^password authentication failed for user", "28P01", Retry.AFTER_REFRESH),
    _rule(r"^Too many connections to this endpoint", "53300", Retry.TRANSIENT),
    _rule(r"^Too many connections attempts", "53300", Retry.TRANSIENT),
    _rule(r"^Failed to acquire permit to connect to the database", "53300", Retry.TRANSIENT),
    _rule(r"^sorry, too many clients already", "53300"),
    _rule(r"^remaining connection slots are reserved", "53300"),
    _rule(r"^too many connections for (role|database)", "53300"),
    _rule(r"^database \".*\" does not exist", "3D000"),
    _rule(r"^role \".*\" does not exist", "28000"),
    _rule(r"^Couldn't connect to compute node", "08001", Retry.TRANSIENT),
    _rule(
        r"^Control plane request failed: endpoint cannot be found",
        "08001",
        advice="the branch's compute no longer exists; `neonlocal use` the branch again",
    ),
    _rule(
        r"^Control plane request failed: endpoint is disabled",
        "08001",
        advice="enable the endpoint in the Neon console",
    ),
    _rule(
        r"^Control plane request failed: endpoint is temporarily unavailable",
        "57P03",
        advice=_QUOTA_ADVICE,
    ),
    _rule(r"quota|suspended|maintenance", "57P03", advice=_QUOTA_ADVICE),
    _rule(r"^Control plane request failed", "08001"),
    _rule(
        r"^This IP address .* is not allowed",
        "28000",
        advice="allow this IP address in the Neon console",
    ),
    _rule(r"^Endpoint ID is not specified", "08001"),
    _rule(r"^Inconsistent project name", "08001"),
    _rule(r"^connection is insecure", "08001"),
    _rule(r"^Authentication timed out", "08006"),
)


def meaning_of(sqlstate: str, message: str) -> EdgeMeaning | None:
    """The meaning of an error a login got, or None to pass it on as it came."""
    if sqlstate != EDGE_SQLSTATE:
        return None
    for rule in _RULES:
        if rule.pattern.search(message):
            return rule.meaning
    return None


def is_neon_host(host: str) -> bool:
    """Whether ``host`` is one of Neon's own names, served by its edge by SNI."""
    return host.lower().rstrip(".").endswith(NEON_DOMAIN)


def is_pooler_host(host: str) -> bool:
    """Neon's pooled (PgBouncer) endpoints put ``-pooler`` after the endpoint id."""
    return is_neon_host(host) and host.split(".", 1)[0].lower().endswith("-pooler")


# The edge closes the connection without a word on a StartupMessage longer than this
# (proxy/src/protocol2.rs, proxy/src/pqproto.rs: MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET_BYTES = 10_000

# What the edge passes from a StartupMessage to the compute (proxy/src/compute/mod.rs); the
# rest is dropped without a word. ``_pq_.`` names are protocol options, not settings.
EDGE_FORWARDS = frozenset({"user", "database", "application_name", "replication", "options"})
_PROTOCOL_OPTION_PREFIX = "_pq_."


def fold_into_options(parameters: dict[str, str]) -> dict[str, str]:
    """Startup parameters rewritten so that they survive the edge.

    A setting the edge would drop (TimeZone, DateStyle, search_path, ...) moves into
    ``options`` as ``-c name=value``, which the edge forwards and PostgreSQL applies exactly
    like a startup parameter (same context and source; a later setting of the same name wins,
    as in the StartupMessage, because options are read first and ours are appended).
    """
    kept = {k: v for k, v in parameters.items() if k in EDGE_FORWARDS or _is_protocol_option(k)}
    moved = [f"-c {_escape(k)}={_escape(v)}" for k, v in parameters.items() if k not in kept]
    if moved:
        kept["options"] = " ".join(filter(None, (parameters.get("options", ""), *moved)))
    return kept


def dropped_by_edge(parameters: dict[str, str]) -> list[str]:
    """The names of settings the edge would drop silently (what a pooler never receives)."""
    return sorted(k for k in parameters if k not in EDGE_FORWARDS and not _is_protocol_option(k))


def _is_protocol_option(name: str) -> bool:
    return name.startswith(_PROTOCOL_OPTION_PREFIX)


def _escape(text: str) -> str:
    # libpq's `options`: white space separates arguments unless escaped with a backslash, and
    # a backslash is written as two (PostgreSQL's pg_split_opts).
    return re.sub(r"([\\\s])", r"\\\1", text)
