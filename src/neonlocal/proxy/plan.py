"""Where and how a session logs in upstream, decided once from its target and its client.

The role and database (the client's, unless the branch URL pins them), the startup
parameters to forward, and whether we hold the password (then we log in ourselves) or the
client's own login is relayed.

For Neon's own hosts the parameters are shaped for its edge (neon/edge.py): settings it would
drop silently travel in ``options``, so a client's TimeZone or search_path takes effect as it
would straight on PostgreSQL. A pooled (``-pooler``) host gets them as they are, as a direct
pooled connection would, and the caller warns that PgBouncer does not apply them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from neonlocal.neon.edge import (
    MAX_STARTUP_PACKET_BYTES,
    dropped_by_edge,
    fold_into_options,
    is_neon_host,
    is_pooler_host,
)
from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.login import Credentials
from neonlocal.pgwire.scram import ChannelBindingPolicy
from neonlocal.proxy.context import SessionRefused
from neonlocal.targets import Target
from neonlocal.workflows.protect import read_only_parameters

# Startup parameters that choose where a Neon session goes. To Neon's own names we route by
# SNI, so they go; to any other name (a custom domain, a CNAME, an IP) they are the only way
# the edge can tell the endpoint, so they stay.
_NEON_ROUTING_OPTIONS = ("endpoint=", "project=")


@dataclass(frozen=True)
class Plan:
    """Where and how a session logs in upstream."""

    target: Target
    user: str
    database: str
    parameters: dict[str, str]
    credentials: Credentials | None
    # Settings a pooled Neon host will not apply (PgBouncer behind the edge never sees them).
    ignored_by_pooler: tuple[str, ...] = ()


def strip_routing_options(options: str) -> str:
    words = [w for w in options.split() if not w.startswith(_NEON_ROUTING_OPTIONS)]
    # Neon also accepts "-c endpoint=..." style; drop a dangling "-c" left behind.
    cleaned: list[str] = []
    for word in words:
        if cleaned and cleaned[-1] == "-c" and word == "-c":
            continue
        cleaned.append(word)
    if cleaned and cleaned[-1] == "-c":
        cleaned.pop()
    return " ".join(cleaned)


def plan_login(
    target: Target, client_params: Mapping[str, str], *, os_user: str | None = None
) -> Plan:
    """Choose role, database, startup parameters and auth mode for a client on ``target``.

    ``os_user`` is the client's OS user when the kernel says it (our Unix socket): a role
    that is only libpq's default for that user becomes the branch URL's role.
    """
    user = target.user if target.pin_user and target.user else client_params["user"]
    if _only_libpq_default(user, target, os_user):
        assert target.user is not None
        user = target.user
    database = (
        target.database
        if target.pin_database and target.database
        else client_params.get("database") or target.database or user
    )
    params = {
        "user": user,
        "database": database,
        **_forwarded(target, client_params),
        **read_only_parameters(target),
    }
    ignored: tuple[str, ...] = ()
    if is_pooler_host(target.host):
        _refuse_unguardable(target)
        ignored = tuple(dropped_by_edge(params))
    elif is_neon_host(target.host):
        params = fold_into_options(params)
    if is_neon_host(target.host):
        _check_edge_limits(params)
    credentials = None
    if target.password is not None and (target.user is None or target.user == user):
        credentials = _credentials(target, user, target.password)
    return Plan(target, user, database, params, credentials, ignored)


def with_client_password(plan: Plan, password: str) -> Plan:
    """``plan`` logging in with a password the client gave us in clear (the serverless
    driver's way), where the branch URL has none for its role: the server checks it."""
    return replace(plan, credentials=_credentials(plan.target, plan.user, password))


def _credentials(target: Target, user: str, password: str) -> Credentials:
    return Credentials(
        user,
        password,
        ChannelBindingPolicy(target.channel_binding),
        neon_endpoint=_endpoint_id(target.host),
    )


def _only_libpq_default(user: str, target: Target, os_user: str | None) -> bool:
    return (
        os_user is not None
        and user == os_user
        and target.user is not None
        and target.user != user
        and target.password is not None
    )


def _refuse_unguardable(target: Target) -> None:
    """A read-only branch behind PgBouncer would be writable: its pool ignores the setting."""
    if target.read_only:
        raise SessionRefused(
            f'neonlocal: branch "{target.branch}" is protected (read-only), but its -pooler '
            "host (PgBouncer) ignores default_transaction_read_only: use the unpooled host, "
            f"or allow writes with `neonlocal use {target.branch} --write`",
            sqlstate.FEATURE_NOT_SUPPORTED,
        )


def _check_edge_limits(params: Mapping[str, str]) -> None:
    """Say what the edge would not: it hangs up on a startup packet over its limit."""
    size = len(codec.startup_message(params))
    if size > MAX_STARTUP_PACKET_BYTES:
        raise SessionRefused(
            f"neonlocal: the startup packet for this session would be {size} bytes; Neon's "
            f"edge accepts at most {MAX_STARTUP_PACKET_BYTES} and closes the connection "
            "without a word: send fewer or shorter settings (options, application_name)",
            sqlstate.PROTOCOL_VIOLATION,
        )


def _endpoint_id(host: str) -> str | None:
    """A Neon host's endpoint id: its first label (``-pooler`` included, as the edge reads it)."""
    return host.split(".", 1)[0].lower() if is_neon_host(host) else None


def _forwarded(target: Target, client_params: Mapping[str, str]) -> dict[str, str]:
    """The client's other parameters, with the URL's options and application name merged in."""
    params = {k: v for k, v in client_params.items() if k not in ("user", "database")}
    keep = (lambda o: o) if not is_neon_host(target.host) else strip_routing_options
    options = " ".join(
        o for o in (keep(target.options or ""), keep(params.pop("options", ""))) if o
    )
    if options:
        params["options"] = options
    if "application_name" not in params and target.application_name:
        params["application_name"] = target.application_name
    return params
