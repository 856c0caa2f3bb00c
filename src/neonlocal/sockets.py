"""Socket activation: take over listening sockets a service manager opened for us.

With `neonlocal.socket` enabled, systemd binds 127.0.0.1:5432 itself and starts the daemon
on the first connection, passing the sockets as file descriptors 3, 4, ... and describing
them in `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` (the sd_listen_fds protocol). The
daemon then serves on those instead of binding.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from neonlocal.errors import UserError

LISTEN_FDS_START = 3
"""The first inherited descriptor, fixed by the protocol."""

_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SocketActivationError(UserError):
    """The service manager's `LISTEN_*` variables or descriptors are not usable."""


@dataclass(frozen=True)
class InheritedSocket:
    """One socket handed over by the service manager, with the name the unit gave it."""

    name: str
    """`FileDescriptorName=` of the socket unit (systemd defaults it to the unit's name)."""
    sock: socket.socket


def inherited_sockets(
    env: MutableMapping[str, str], *, unset_environment: bool = True
) -> list[socket.socket]:
    """The listening sockets passed to this process, non-blocking and close-on-exec.

    Returns an empty list when the process was not socket-activated, including when
    `LISTEN_PID` names another process (the variables leaked from a parent). With
    `unset_environment` the variables are removed from `env` afterwards, whatever the
    outcome, so children we start do not mistake the sockets for theirs — pass `os.environ`
    to affect the real environment, as sd_listen_fds(1) does.

    Raises SocketActivationError when the variables are malformed or a descriptor is not a
    socket.
    """
    return [
        inherited.sock
        for inherited in inherited_named_sockets(env, unset_environment=unset_environment)
    ]


def inherited_named_sockets(
    env: MutableMapping[str, str], *, unset_environment: bool = True
) -> list[InheritedSocket]:
    """Like `inherited_sockets`, keeping each socket's name from `LISTEN_FDNAMES`."""
    try:
        return _adopt(env)
    finally:
        if unset_environment:
            for variable in _VARIABLES:
                env.pop(variable, None)


def _adopt(env: Mapping[str, str]) -> list[InheritedSocket]:
    raw_pid = env.get("LISTEN_PID")
    raw_count = env.get("LISTEN_FDS")
    if raw_pid is None or raw_count is None:
        return []
    pid = _positive_int("LISTEN_PID", raw_pid)
    if pid != os.getpid():
        return []
    count = _positive_int("LISTEN_FDS", raw_count)
    names = _names(env.get("LISTEN_FDNAMES"), count)
    adopted: list[InheritedSocket] = []
    try:
        for offset, name in enumerate(names):
            adopted.append(InheritedSocket(name, _adopt_fd(LISTEN_FDS_START + offset)))
    except SocketActivationError:
        # Detach rather than close: the descriptors still belong to the process, and a
        # caller that reports the error and exits should not have them closed under it.
        for inherited in adopted:
            inherited.sock.detach()
        raise
    return adopted


def _positive_int(variable: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SocketActivationError(f"{variable}={raw!r} is not a number") from None
    if value <= 0:
        raise SocketActivationError(f"{variable}={raw!r} must be positive")
    return value


def _names(raw: str | None, count: int) -> list[str]:
    if raw is None:
        # What systemd itself reports for a descriptor without a name.
        return ["unknown"] * count
    names = raw.split(":")
    if len(names) != count:
        raise SocketActivationError(
            f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS is {count}"
        )
    return names


def _adopt_fd(fd: int) -> socket.socket:
    try:
        # Let the kernel tell family and type: the unit decides what it listens on.
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise SocketActivationError(
            f"inherited descriptor {fd} is not a usable socket: {exc.strerror}"
        ) from None
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock
