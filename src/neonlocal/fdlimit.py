"""Room for ``max_sessions``: each session holds two sockets (the client's and the upstream's).

Processes start with a low soft limit on open files (256 on macOS, 1024 on most Linux
desktops) and a much higher hard one; without raising it, the daemon fails with "Too many
open files" at a few hundred sessions, far below the default ``max_sessions``.
"""

from __future__ import annotations

import resource

import structlog

log = structlog.get_logger("neonlocal.fdlimit")

# Descriptors besides sessions: listeners, control socket, watcher, log files, cancels.
_SPARE = 64


def descriptors_needed(max_sessions: int) -> int:
    return 2 * max_sessions + _SPARE


def ensure_room_for(max_sessions: int) -> int:
    """Raise the soft open-files limit toward what ``max_sessions`` needs; returns the limit.

    Never lowers it; logs a warning when the hard limit leaves too little room.
    """
    needed = descriptors_needed(max_sessions)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("open_files_limit_not_raised", limit=soft, wanted=target, reason=str(exc))
    if soft < needed:
        log.warning(
            "open_files_limit_low",
            limit=soft,
            sessions_possible=max(0, (soft - _SPARE) // 2),
            max_sessions=max_sessions,
            hint="raise it with `ulimit -n` (or LimitNOFILE= in the service unit)",
        )
    return soft
