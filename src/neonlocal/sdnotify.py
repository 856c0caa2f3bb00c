"""A small client of systemd's `NOTIFY_SOCKET` datagram protocol (no libsystemd).

The service manager passes a datagram socket address in `NOTIFY_SOCKET`; each message is
one datagram of newline-separated `KEY=VALUE` assignments (`READY=1`, `STATUS=...`). Outside
systemd the variable is unset and every method is a no-op, so the daemon calls them
unconditionally.

Sending never raises: a service manager that went away must not take the daemon with it.
Each method returns whether the datagram was handed to the kernel.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

# Long enough for any healthy service manager; short enough that a wedged one cannot stall
# the event loop for noticeable time (the send is synchronous, like sd_notify's).
_SEND_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class Notifier:
    """Where to send notifications, and the watchdog interval the manager asked for.

    Build it with `Notifier.from_env(os.environ)` at the composition root.
    """

    address: str | None
    """A filesystem path, or an abstract socket name starting with NUL; None when disabled."""
    watchdog_usec: int | None = None
    """`WATCHDOG_USEC` when it is meant for this process, else None."""

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, pid: int | None = None) -> Notifier:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from `env`.

        `pid` defaults to this process: a watchdog request addressed to another PID (the
        variable leaked from a parent) is ignored, as sd_watchdog_enabled does.
        """
        return cls(
            address=_parse_address(env.get("NOTIFY_SOCKET", "")),
            watchdog_usec=_parse_watchdog(env, os.getpid() if pid is None else pid),
        )

    @property
    def enabled(self) -> bool:
        """True when a service manager is listening for notifications."""
        return self.address is not None

    def ready(self, status: str | None = None) -> bool:
        """Tell the manager start-up (or a reload) has finished: `READY=1`."""
        return self.send({"READY": "1"} | _status(status))

    def status(self, text: str) -> bool:
        """Set the one-line status `systemctl status` shows."""
        return self.send(_status(text))

    def reloading(self, status: str | None = None) -> bool:
        """Announce a reload; systemd >= 253 wants the monotonic timestamp alongside.

        Follow it with `ready()` once the new configuration is in effect.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send({"RELOADING": "1", "MONOTONIC_USEC": str(now_usec)} | _status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Announce that shutdown has begun: `STOPPING=1`."""
        return self.send({"STOPPING": "1"} | _status(status))

    def watchdog(self) -> bool:
        """Ping the watchdog: `WATCHDOG=1`."""
        return self.send({"WATCHDOG": "1"})

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half the manager's timeout), or None if not asked."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, fields: Mapping[str, str]) -> bool:
        """Send one datagram with `fields` as `KEY=VALUE` lines; False if it was not sent."""
        if self.address is None or not fields:
            return False
        message = "".join(f"{key}={value}\n" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.connect(self.address)
                sock.send(message.encode())
        except OSError:
            return False
        return True


def _parse_address(raw: str) -> str | None:
    # systemd accepts an absolute path or "@name" for the abstract namespace; anything else
    # (unset, relative, vsock: in newer releases) is not something we can reach.
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    return None


def _parse_watchdog(env: Mapping[str, str], pid: int) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid is not None:
        try:
            if int(watchdog_pid) != pid:
                return None
        except ValueError:
            return None
    return usec


def _status(text: str | None) -> dict[str, str]:
    if text is None:
        return {}
    # A newline would end the STATUS= line and start another assignment, so a branch name
    # like "x\nSTOPPING=1" could steer the service manager.
    return {"STATUS": " ".join(text.splitlines())}
