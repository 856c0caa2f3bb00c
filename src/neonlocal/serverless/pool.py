"""Idle ``/sql`` links kept for the next request to the same role and database.

Kept briefly and never pinged, so an idle link never keeps a compute awake: it closes after
``IDLE_TIMEOUT_S``. Links belong to the selection they opened under: when the selected branch
(or its credentials) changes, every idle link goes, so the next request reaches the new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

from neonlocal.serverless.link import Link

# How long an idle link stays open for the next request.
IDLE_TIMEOUT_S = 15.0
# Idle links kept per role, database and password.
MAX_IDLE_PER_KEY = 8


class LinkPool:
    def __init__(self) -> None:
        self._idle: dict[Hashable, list[tuple[Link, asyncio.TimerHandle]]] = {}
        self._selection: object = None

    def take(self, key: Hashable, selection: object) -> Link | None:
        self._follow(selection)
        idle = self._idle.get(key)
        while idle:
            link, timer = idle.pop()
            timer.cancel()
            if not link.closed:
                return link
        return None

    def give(self, key: Hashable, selection: object, link: Link) -> None:
        """Keep ``link`` for reuse if it is open, idle, and still on the selection."""
        self._follow(selection)
        idle = self._idle.setdefault(key, [])
        if link.closed or link.status != b"I" or selection != self._selection:
            link.end()
            return
        if len(idle) >= MAX_IDLE_PER_KEY:
            link.end()
            return
        timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT_S, self._expire, key, link)
        idle.append((link, timer))

    def _expire(self, key: Hashable, link: Link) -> None:
        idle = self._idle.get(key, [])
        self._idle[key] = [(kept, timer) for kept, timer in idle if kept is not link]
        link.end()

    def _follow(self, selection: object) -> None:
        if selection != self._selection:
            self.clear()
            self._selection = selection

    def clear(self) -> None:
        for idle in self._idle.values():
            for link, timer in idle:
                timer.cancel()
                link.end()
        self._idle.clear()
