"""Numbers and names shared by the daemon and the service files that run it.

One place, so the unit files and the daemon cannot drift apart: the tests check that
`TimeoutStopSec` / `ExitTimeOut` in the shipped units are `SHUTDOWN_DEADLINE_S` plus
`SERVICE_STOP_GRACE_S`.
"""

from __future__ import annotations

from typing import Final

SHUTDOWN_DEADLINE_S: Final = 30.0
"""How long a stopping daemon lets open sessions finish before ending them with 57P01."""

SERVICE_STOP_GRACE_S: Final = 5.0
"""Extra time the service manager waits beyond the deadline before it sends SIGKILL."""

SERVICE_NAME: Final = "neonlocal"
"""systemd unit stem: neonlocal.service, neonlocal.socket."""

LAUNCHD_LABEL: Final = "dev.neonlocal.neonlocal"
"""The LaunchAgent's label, in reverse-DNS form as launchd expects."""
