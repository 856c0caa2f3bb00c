"""Cancel keys: a client's key is the server's process id and a secret of ours.

The process id a client gets is the one the server (or Neon's edge) sent, so that what a
driver holds agrees with ``pg_backend_pid()``, NotificationResponse and
``pg_terminate_backend``. The secret is ours: a client's CancelRequest reaches us, and we
look up the session and, if it is running a query, forward the upstream's real key to the
upstream host the session is pinned to. A cancel for an idle session or an unknown key is
dropped, as pgbouncer does, so it can never hit a later query.

Two branches' servers may hand out the same process id, so an entry is found by the whole
key: the process id, then the secret, compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Final, Protocol

from neonlocal.targets import Target

# Our secrets are protocol 3.0's four bytes: clients speak 3.0 with us (pgwire/frontend.py).
# The server's own secret may be longer (up to 256 bytes in protocol 3.2).
SECRET_BYTES: Final = 4

CancelKey = tuple[int, bytes]


class Cancellable(Protocol):
    @property
    def busy(self) -> bool: ...


@dataclass(frozen=True)
class CancelRoute:
    target: Target
    process_id: int
    secret: bytes = field(repr=False)


@dataclass
class _Entry:
    secret: bytes
    session: Cancellable
    route: CancelRoute | None = None


class CancelRegistry:
    def __init__(self) -> None:
        self._entries: dict[int, list[_Entry]] = {}

    def issue(self, session: Cancellable, route: CancelRoute | None) -> CancelKey:
        """The key for a client served over ``route``: the server's process id and a fresh
        secret of ours. A server that sent no key gets a random process id instead."""
        pid = route.process_id if route is not None else secrets.randbelow(2**31 - 1) + 1
        entries = self._entries.setdefault(pid, [])
        while True:
            secret = secrets.token_bytes(SECRET_BYTES)
            if all(entry.secret != secret for entry in entries):
                break
        entries.append(_Entry(secret, session, route))
        return pid, secret

    def release(self, key: CancelKey) -> None:
        pid, secret = key
        entries = self._entries.get(pid, [])
        entries[:] = [entry for entry in entries if entry.secret != secret]
        if not entries:
            self._entries.pop(pid, None)

    def lookup(self, pid: int, secret: bytes) -> CancelRoute | None:
        """The upstream to cancel, or None when the request must be dropped."""
        entry = self._find(pid, secret)
        if entry is None or entry.route is None or not entry.session.busy:
            return None
        return entry.route

    def route_of(self, key: CancelKey) -> CancelRoute | None:
        entry = self._find(*key)
        return None if entry is None else entry.route

    def _find(self, pid: int, secret: bytes) -> _Entry | None:
        found = None
        for entry in self._entries.get(pid, ()):
            if hmac.compare_digest(entry.secret, secret):
                found = entry
        return found

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())
