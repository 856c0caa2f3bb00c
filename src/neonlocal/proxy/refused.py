"""A login the upstream refused: what it means, whether to try again, and what to tell.

The session (proxy/session.py) decides what to do; this module only reads the refusal. The
rule it keeps: a hint names something the user can do (a role to connect as, the config
line whose password was refused, `neonlocal use NAME`), and never a secret.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from neonlocal.config.file import key_lines
from neonlocal.config.values import Settings
from neonlocal.neon.edge import EdgeMeaning, Retry, meaning_of
from neonlocal.pgwire import sqlstate
from neonlocal.pgwire.login import UpstreamLogin, UpstreamRejected
from neonlocal.targets import Target

# What the server answers our own login with when the password we hold is stale.
_STALE_PASSWORD_STATES: Final = (sqlstate.INVALID_PASSWORD, sqlstate.INVALID_AUTHORIZATION)

# Retrying a login the edge refused for a passing reason (neon/edge.py): the first pause,
# doubled each time up to the cap, with full jitter so a pool's connects spread out.
RETRY_FIRST_PAUSE_S: Final = 0.1
RETRY_MAX_PAUSE_S: Final = 2.0


@dataclass(frozen=True)
class Refused:
    """Who was refused where: what a hint may name."""

    branch: str | None
    target: Target | None
    user: str | None
    # Whether the login was ours, with the password from the branch URL or the API.
    ours: bool


def edge_meaning(rejected: UpstreamRejected) -> EdgeMeaning | None:
    return meaning_of(rejected.error.sqlstate, rejected.error.message)


def is_stale_password(login: UpstreamLogin, rejected: UpstreamRejected) -> bool:
    """Our own password refused during our own login: worth one refresh and retry."""
    meaning = edge_meaning(rejected)
    code = meaning.sqlstate if meaning is not None else rejected.error.sqlstate
    return rejected.during_auth and not login.relaying_auth and code in _STALE_PASSWORD_STATES


def retry_pause(
    retries: int, login: UpstreamLogin, rejected: UpstreamRejected, *, refreshed: bool
) -> float | None:
    """How long to wait before logging in again, or None when trying again cannot help."""
    meaning = edge_meaning(rejected)
    if meaning is None or login.client_saw_auth:
        return None  # a relayed client's proof is spent: a new login would ask it again
    if meaning.retry is Retry.TRANSIENT or (meaning.retry is Retry.AFTER_REFRESH and refreshed):
        ceiling = min(RETRY_MAX_PAUSE_S, RETRY_FIRST_PAUSE_S * 2**retries)
        return random.uniform(RETRY_FIRST_PAUSE_S / 2, ceiling)  # noqa: S311 - jitter
    return None


def login_hint(
    refused: Refused, code: str, meaning: EdgeMeaning | None, settings: Settings
) -> str | None:
    """What the user can do about a refused login, said in the client's HINT."""
    if code == sqlstate.INVALID_PASSWORD and refused.ours:
        return password_hint(refused.branch, settings)
    if meaning is not None and meaning.advice is not None:
        return meaning.advice
    return _role_hint(refused, code)


def password_hint(branch: str | None, settings: Settings) -> str:
    """Our own password was refused: say where it came from, so it can be put right."""
    table = settings.branches.get(branch or "")
    if table is not None and table.url is not None:
        return (
            f'the password in branch "{branch}"\'s URL{_where_in(settings, branch)}'
            " was refused: paste the branch's current connection string there"
        )
    return (
        "neonlocal logs in with the password the Neon API gave for this branch: if the "
        f"branch was reset or its password changed, `neonlocal use {branch}` fetches it again"
    )


def _role_hint(refused: Refused, code: str) -> str | None:
    """A client refused under a role of its own, where the branch URL names another whose
    password we hold: most often libpq's default role (the OS user) over TCP."""
    target = refused.target
    if refused.ours or not code.startswith("28") or target is None:
        return None
    if target.user is None or target.user == refused.user or target.password is None:
        return None
    return (
        f'neonlocal logs in for you as "{target.user}", the role in the branch URL: '
        f"connect with user={target.user} (psql -U {target.user})"
    )


def _where_in(settings: Settings, branch: str | None) -> str:
    """`` in /path/config.toml:12`` for a branch's url line, read when it is needed."""
    path = settings.config_path
    if path is None or branch is None:
        return ""
    try:
        lines = key_lines(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return f" in {path}"
    line = lines.get(("branches", branch, "url"))
    return f" in {path}:{line}" if line is not None else f" in {path}"
