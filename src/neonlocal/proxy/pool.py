"""Opt-in session reuse (``[upstream] reuse_sessions``).

When a client leaves an idle session outside a transaction, its upstream session is reset
with ``DISCARD ALL`` and parked for a short time; the next client for the same branch, host,
role, database and startup parameters gets it without a new TCP + TLS + SCRAM handshake.

It never keeps a compute awake: nothing is sent to a parked session (no pings, no queries),
it is dropped when its idle time runs out, when the server closes or says anything, and
when the selection or credentials change. Only sessions the daemon logged in itself
(credentials mode) are reused: a relayed login proved the password to the server once, and
a later client must prove it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from neonlocal.pgwire.reset import ResetExchange, ResetResult
from neonlocal.proxy.drive import drive
from neonlocal.proxy.endpoint import Endpoint, PeerClosed
from neonlocal.targets import Target

log = structlog.get_logger("neonlocal.pool")

RESET_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PoolKey:
    branch: str
    host: str
    port: int
    hostaddr: str | None
    password_digest: int
    parameters: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, branch: str, target: Target, parameters: Mapping[str, str]) -> PoolKey:
        return cls(
            branch,
            target.host,
            target.port,
            target.hostaddr,
            hash(target.password),
            tuple(sorted(parameters.items())),
        )


@dataclass(eq=False)
class Parked:
    endpoint: Endpoint
    target: Target
    status_messages: bytes
    server_key: tuple[int, bytes] | None
    tls_version: str | None
    address: str
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class SessionPool:
    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._idle: dict[PoolKey, list[Parked]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.reused = 0

    def take(self, key: PoolKey) -> Parked | None:
        """A parked session for ``key`` that is still open, or None."""
        entries = self._idle.get(key)
        while entries:
            parked = entries.pop()
            self._unpark(parked)
            if not parked.endpoint.eof and not parked.endpoint.lost:
                self.reused += 1
                return parked
            parked.endpoint.close()
        self._idle.pop(key, None)
        return None

    def park(self, key: PoolKey, parked: Parked) -> None:
        """Reset ``parked`` in the background and keep it if the reset is clean."""
        task = asyncio.get_running_loop().create_task(self._reset_and_keep(key, parked))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reset_and_keep(self, key: PoolKey, parked: Parked) -> None:
        # The relay has let go of the endpoint: what the server sends now waits in recv().
        endpoint = parked.endpoint
        reset = ResetExchange()
        endpoint.write(ResetExchange.request())
        try:
            async with asyncio.timeout(RESET_TIMEOUT_S):
                await drive(reset, endpoint.recv, _ignore)
        except (TimeoutError, PeerClosed):
            endpoint.close()
            return
        if reset.result is not ResetResult.CLEAN:
            endpoint.close()
            return
        self._keep(key, parked)

    def _keep(self, key: PoolKey, parked: Parked) -> None:
        endpoint = parked.endpoint

        def spoil(_data: bytes = b"") -> None:
            # The server spoke unasked (a shutdown notice) or closed: never hand it out.
            self._drop(key, parked)

        def on_eof() -> bool:
            spoil()
            return False

        endpoint.on_data = spoil
        endpoint.on_lost = spoil
        endpoint.on_eof = on_eof
        parked._timer = asyncio.get_running_loop().call_later(
            self.idle_timeout, self._drop, key, parked
        )
        self._idle.setdefault(key, []).append(parked)

    def _unpark(self, parked: Parked) -> None:
        if parked._timer is not None:
            parked._timer.cancel()
            parked._timer = None
        parked.endpoint.on_data = None
        parked.endpoint.on_lost = None
        parked.endpoint.on_eof = None

    def _drop(self, key: PoolKey, parked: Parked) -> None:
        entries = self._idle.get(key, [])
        with contextlib.suppress(ValueError):
            entries.remove(parked)
        if not entries:
            self._idle.pop(key, None)
        self._unpark(parked)
        parked.endpoint.close()

    def clear(self, *, keep_branch: str | None = None, keep_target: Target | None = None) -> int:
        """Drop parked sessions, except those for ``keep_branch`` on ``keep_target``."""
        dropped = 0
        for key in list(self._idle):
            for parked in list(self._idle.get(key, [])):
                if keep_branch == key.branch and keep_target == parked.target:
                    continue
                self._drop(key, parked)
                dropped += 1
        if dropped:
            log.info("pool_cleared", sessions=dropped)
        return dropped

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        self.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)


def _ignore(_result: ResetResult) -> None:
    pass
