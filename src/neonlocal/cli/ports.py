"""What ``status`` and ``url`` say about pinned ports (``[ports]``, neonlocal/pinned.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neonlocal.cli.context import EXIT_USAGE, fail

if TYPE_CHECKING:
    from neonlocal.config.values import Settings

__all__ = ["branch_of_port", "port_lines"]


def port_lines(reply: dict[str, Any]) -> list[str]:
    """One ``status`` line per pinned port: port, branch, how it is guarded, sessions."""
    lines = []
    for row in reply.get("ports") or []:
        count = int(row.get("sessions") or 0)
        sessions = f"{count} session{'s' if count != 1 else ''}"
        guard = ", read-only" if row.get("read_only") else ""
        trouble = f"; {row['error']}" if row.get("error") else ""
        lines.append(
            f"port {row.get('port')}:  {row.get('branch')} "
            f"({row.get('upstream_host') or '-'}{guard}), {sessions}{trouble}"
        )
    return lines


def branch_of_port(settings: Settings, port: int) -> str:
    """The branch ``[ports]`` pins ``port`` to; ends the command when it pins none."""
    branch = settings.ports.get(str(port))
    if branch is None:
        pinned = ", ".join(sorted(settings.ports, key=int)) or "none"
        fail(f"port {port} is not in [ports] (pinned ports: {pinned})", EXIT_USAGE)
    return branch
