"""A branch as it was at a past moment: ``main@-1h``, ``main@2026-12-01T10:00:00Z``,
``main@0/1DE2850`` (an LSN).

Served through the Neon API as a branch of its own, created from the parent at that
timestamp or LSN (``parent_timestamp`` / ``parent_lsn``), named for the moment
(``main@2026-12-01T10:00:00Z``) and given ``expires_at``, so that Neon deletes it even if the
daemon never can. The daemon deletes it as soon as nothing selects or pins it. The one rule:
only branches this process created are ever deleted; one found already there is left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from neonlocal.neon import DEFAULT_ANNOTATION, InvalidDuration, ResolutionError, parse_duration

if TYPE_CHECKING:
    from neonlocal.neon import Branch, NeonApi

__all__ = ["MOMENT_LIFETIME", "InvalidMoment", "Moment", "branch_at", "parse_moment"]

# How long Neon keeps a point-in-time branch if the daemon never deletes it.
MOMENT_LIFETIME: Final = timedelta(hours=4)
MOMENT_ANNOTATION: Final = {**DEFAULT_ANNOTATION, "purpose": "point-in-time"}
# PostgreSQL writes an LSN as two hexadecimal 32-bit halves: 0/1DE2850.
_LSN: Final = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")


class InvalidMoment(ResolutionError):
    """The text after ``@`` looks like a moment but is not one we understand (a resolution
    error, so that everything that reports those reports it)."""


@dataclass(frozen=True)
class Moment:
    """A parent branch and the point in its history to serve: a timestamp or an LSN."""

    parent: str
    timestamp: datetime | None = None
    lsn: str | None = None

    @property
    def branch_name(self) -> str:
        """The Neon branch's name: recognisable, and the same for the same moment."""
        if self.lsn is not None:
            return f"{self.parent}@{self.lsn}"
        assert self.timestamp is not None
        return f"{self.parent}@{self.timestamp:%Y-%m-%dT%H:%M:%SZ}"


def parse_moment(name: str, now: datetime) -> Moment | None:
    """``name`` as a moment, or None when it is a plain branch name.

    Only text after the last ``@`` that starts with ``-`` or a digit is taken for a moment
    (``dev@laptop`` stays a branch name); raises InvalidMoment when it is not a valid one.
    """
    parent, at, spec = name.rpartition("@")
    if not at or not parent or not spec or not (spec[0] == "-" or spec[0].isdigit()):
        return None
    if spec.startswith("-"):
        try:
            return Moment(parent, timestamp=_whole_seconds(now - parse_duration(spec[1:])))
        except InvalidDuration as exc:
            raise InvalidMoment(f'"{name}": {exc}') from None
    if _LSN.fullmatch(spec):
        return Moment(parent, lsn=spec.upper())
    when = _timestamp(spec)
    if when is None:
        raise InvalidMoment(
            f'"{name}": after "@" comes a moment: -1h (a time ago), an RFC 3339 time such as '
            "2026-12-01T10:00:00Z, or an LSN such as 0/1DE2850"
        )
    if when > now:
        raise InvalidMoment(f'"{name}": {spec} is in the future')
    return Moment(parent, timestamp=_whole_seconds(when))


def _timestamp(text: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.astimezone(UTC) if when.tzinfo is not None else None


def _whole_seconds(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(microsecond=0)


async def branch_at(
    api: NeonApi, project_id: str, moment: Moment, *, lifetime: timedelta = MOMENT_LIFETIME
) -> tuple[Branch, bool]:
    """The branch serving ``moment``: found by its name, else created now and waited for.

    Returns (branch, whether it was created here). Raises BranchNotFound for an unknown
    parent and ResolutionError for a time outside the project's history window.
    """
    from neonlocal.neon import BranchNotFound, find_branch

    try:
        return await find_branch(api, project_id, moment.branch_name), False
    except BranchNotFound:
        pass
    parent = await find_branch(api, project_id, moment.parent)
    if moment.timestamp is not None:
        await _check_history_window(api, project_id, moment, moment.timestamp)
    created = await api.create_branch(
        project_id,
        moment.branch_name,
        parent_id=parent.id,
        expires_at=datetime.now(UTC) + lifetime,
        annotation=MOMENT_ANNOTATION,
        parent_timestamp=moment.timestamp,
        parent_lsn=moment.lsn,
    )
    await api.wait_for_operations(project_id, created.operations)
    return created.branch, True


async def _check_history_window(
    api: NeonApi, project_id: str, moment: Moment, when: datetime
) -> None:
    """Say what the window is, rather than pass on whatever the API answers."""
    retention = (await api.get_project(project_id)).history_retention_seconds
    if retention is None:
        return
    start = datetime.now(UTC) - timedelta(seconds=retention)
    if when < start:
        raise ResolutionError(
            f"{moment.parent} at {when:%Y-%m-%d %H:%M:%S} UTC is outside the project's history "
            f"window ({_span(retention)}: nothing before {start:%Y-%m-%d %H:%M} UTC)"
        )


def _span(seconds: int) -> str:
    hours = seconds / 3600
    return f"{hours / 24:g} days" if hours >= 48 else f"{hours:g} hours"
