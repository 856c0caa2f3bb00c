"""Protected branches: which sessions log in read-only, and which switches need a yes.

``[branches.NAME] protect = true``, or Neon's own ``protected`` flag on a branch found through
the API: sessions log in with ``default_transaction_read_only = on`` (PostgreSQL then refuses
a write with 25006 itself) and ``neonlocal use NAME`` asks first. ``use NAME --write`` allows
writes until the selection changes. ``protect = "confirm"``: ``use`` asks first, sessions may
write. ``protect = false``: neither, whatever Neon says.

The one rule: protection is decided when a session logs in and costs nothing after that; the
relay stays a byte pipe. So it is a guard against mistakes, not against a hostile client,
which can ``SET default_transaction_read_only = off`` (README, "Team workflows").
"""

from __future__ import annotations

import enum
from dataclasses import replace
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from neonlocal.config.values import Settings
    from neonlocal.targets import Target

__all__ = [
    "READ_ONLY_PARAMETER",
    "READ_ONLY_SETTING",
    "Protection",
    "guarded",
    "protection_of",
    "read_only_parameters",
    "read_only_status",
]

# The ParameterStatus that tells a client its session is read-only (beside neonlocal.branch).
READ_ONLY_PARAMETER: Final = "neonlocal.read_only"
# The setting that makes PostgreSQL refuse writes (25006 read_only_sql_transaction).
READ_ONLY_SETTING: Final = "default_transaction_read_only"


class Protection(enum.StrEnum):
    """How a branch is guarded."""

    NONE = "none"
    READ_ONLY = "read_only"
    """Sessions are read-only unless `use NAME --write` allowed writes; `use` asks first."""
    CONFIRM = "confirm"
    """`use` asks first; sessions may write."""


def protection_of(name: str, settings: Settings, *, neon_protected: bool = False) -> Protection:
    """The protection of branch ``name``: its table's ``protect`` key, else Neon's flag."""
    table = settings.branches.get(name)
    configured = table.protect if table is not None else None
    if configured is None:
        return Protection.READ_ONLY if neon_protected else Protection.NONE
    if configured == "confirm":
        return Protection.CONFIRM
    return Protection.READ_ONLY if configured else Protection.NONE


def guarded(target: Target, protection: Protection, *, writes_allowed: bool) -> Target:
    """``target`` as sessions to a branch with this protection use it."""
    read_only = protection is Protection.READ_ONLY and not writes_allowed
    return replace(target, protection=protection, read_only=read_only)


def read_only_parameters(target: Target) -> dict[str, str]:
    """Startup settings that make a session to ``target`` read-only, if it is to be."""
    return {READ_ONLY_SETTING: "on"} if target.read_only else {}


def read_only_status(target: Target | None) -> dict[str, str]:
    """The ParameterStatus a session to a protected branch gets; none for other branches."""
    if target is None or target.protection is Protection.NONE:
        return {}
    return {READ_ONLY_PARAMETER: "on" if target.read_only else "off"}
