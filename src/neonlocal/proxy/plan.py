"""Where and how a session logs in upstream, decided once from its target and its client.

The role and database (the client's, unless the branch URL pins them), the startup
parameters to forward, and whether we hold the password (then we log in ourselves) or the
client's own login is relayed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from neonlocal.pgwire.login import Credentials
from neonlocal.pgwire.scram import ChannelBindingPolicy
from neonlocal.targets import Target

# Startup parameters that choose where a Neon session goes; we route by SNI ourselves and a
# real PostgreSQL would reject them as unknown options.
_NEON_ROUTING_OPTIONS = ("endpoint=", "project=")


@dataclass(frozen=True)
class Plan:
    """Where and how a session logs in upstream."""

    target: Target
    user: str
    database: str
    parameters: dict[str, str]
    credentials: Credentials | None


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


def plan_login(target: Target, client_params: Mapping[str, str]) -> Plan:
    """Choose role, database, startup parameters and auth mode for a client on ``target``."""
    user = target.user if target.pin_user and target.user else client_params["user"]
    database = (
        target.database
        if target.pin_database and target.database
        else client_params.get("database") or target.database or user
    )
    params = {"user": user, "database": database, **_forwarded(target, client_params)}
    credentials = None
    if target.password is not None and (target.user is None or target.user == user):
        credentials = Credentials(
            user, target.password, ChannelBindingPolicy(target.channel_binding)
        )
    return Plan(target, user, database, params, credentials)


def _forwarded(target: Target, client_params: Mapping[str, str]) -> dict[str, str]:
    """The client's other parameters, with the URL's options and application name merged in."""
    params = {k: v for k, v in client_params.items() if k not in ("user", "database")}
    options = " ".join(
        o
        for o in (
            strip_routing_options(target.options or ""),
            strip_routing_options(params.pop("options", "")),
        )
        if o
    )
    if options:
        params["options"] = options
    if "application_name" not in params and target.application_name:
        params["application_name"] = target.application_name
    return params
