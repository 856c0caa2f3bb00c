"""Cancel keys: we hand each client our own key and remember where its query really runs.

A client's CancelRequest names our key; we look up the session and, if it is running a
query, forward the upstream's real key to the upstream host the session is pinned to. A
cancel for an idle session or an unknown key is dropped, as pgbouncer does, so it can never
hit a later query.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Protocol

from neonlocal.targets import Target


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
        self._entries: dict[int, _Entry] = {}

    def issue(self, session: Cancellable) -> tuple[int, bytes]:
        """A fresh (process id, secret) pair for a client; 4-byte secret as protocol 3.0 has."""
        while True:
            pid = secrets.randbelow(2**31 - 1) + 1
            if pid not in self._entries:
                break
        secret = secrets.token_bytes(4)
        self._entries[pid] = _Entry(secret, session)
        return pid, secret

    def bind(self, pid: int, route: CancelRoute) -> None:
        entry = self._entries.get(pid)
        if entry is not None:
            entry.route = route

    def release(self, pid: int) -> None:
        self._entries.pop(pid, None)

    def lookup(self, pid: int, secret: bytes) -> CancelRoute | None:
        """The upstream to cancel, or None when the request must be dropped."""
        entry = self._entries.get(pid)
        if entry is None or not hmac.compare_digest(entry.secret, secret):
            return None
        if entry.route is None or not entry.session.busy:
            return None
        return entry.route

    def route_of(self, pid: int) -> CancelRoute | None:
        entry = self._entries.get(pid)
        return None if entry is None else entry.route

    def __len__(self) -> int:
        return len(self._entries)
