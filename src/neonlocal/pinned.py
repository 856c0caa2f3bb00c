"""Pinned ports: extra local ports, each serving one fixed branch while the main port
follows ``neonlocal use`` (``[ports] 5433 = "main"``).

Each pinned port is a Server of its own (proxy/server.py) whose selection is its branch: its
own listeners, sessions, cancel keys and session pool. The one rule: a port opens and closes
with its line in the config, live, and sessions on a port that closes or is pointed at
another branch are drained as a switch drains them (57P01 once idle outside a transaction).

Sessions to a pinned port are never writable by ``use NAME --write``: that allows writes on
the main port's selection only, so a port pinned to a protected branch stays read-only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import structlog

from neonlocal.errors import UserError
from neonlocal.neon.errors import NeonApiError
from neonlocal.protect import guarded
from neonlocal.proxy.server import CredentialRefresher, ListenError, Server

if TYPE_CHECKING:
    from neonlocal.config.values import Settings
    from neonlocal.targets import Target
    from neonlocal.tls.local import LocalTls

__all__ = ["PinnedPorts", "pinned_ports"]

log = structlog.get_logger("neonlocal.pinned")

# A branch name -> its Target, resolved as the main port's would be.
Resolve = Callable[[str, "Settings"], Awaitable["Target"]]


def pinned_ports(settings: Settings) -> dict[int, str]:
    """``[ports]`` as port number -> branch name (the schema checked the numbers)."""
    return {int(port): branch for port, branch in settings.ports.items()}


@dataclass
class _Port:
    port: int
    branch: str
    server: Server
    problem: str | None = None


class PinnedPorts:
    """The pinned ports of one daemon; ``apply`` makes them what the settings say."""

    def __init__(
        self,
        resolve: Resolve,
        *,
        refresher: CredentialRefresher | None = None,
        local_tls: Callable[[], LocalTls | None] = lambda: None,
    ) -> None:
        self._resolve = resolve
        self._refresher = refresher
        self._local_tls = local_tls
        self._ports: dict[int, _Port] = {}
        # Ports closing while their sessions drain; each ends on its own.
        self._retiring: set[asyncio.Task[None]] = set()
        # Ports that could not be bound: port -> (branch, why); tried again on each reload.
        self._unbound: dict[int, tuple[str, str]] = {}

    async def apply(self, settings: Settings) -> None:
        """Open, re-point and close ports as ``settings`` say; what fails shows in ``status``."""
        wanted = pinned_ports(settings)
        for port in [p for p in self._ports if p not in wanted]:
            self._retire(self._ports.pop(port), settings.shutdown_deadline)
        self._unbound = {}
        for port, branch in sorted(wanted.items()):
            entry = self._ports.get(port)
            if entry is None:
                try:
                    entry = await self._open(port, branch, settings)
                except ListenError as exc:
                    self._note_unbound(port, branch, exc)
                    continue
            else:
                entry.server.update_settings(_on_port(settings, port))
            await self._point(entry, branch, settings)

    def _note_unbound(self, port: int, branch: str, exc: ListenError) -> None:
        # The server's advice is about [listen] port; here it is this [ports] line.
        reason = exc.message.removeprefix("neonlocal: ").split("; choose another port")[0]
        self._unbound[port] = (branch, f"{reason}; pin {branch} to another port")
        log.error("pinned_port_failed", port=port, branch=branch, error=reason)

    async def _open(self, port: int, branch: str, settings: Settings) -> _Port:
        server = Server(_on_port(settings, port))
        server.local_tls = self._local_tls()
        server.credential_refresher = self._refresh
        await server.start()
        entry = self._ports[port] = _Port(port, branch, server)
        log.info("pinned_port_opened", port=port, branch=branch, listen=server.listening)
        return entry

    async def _point(self, entry: _Port, branch: str, settings: Settings) -> None:
        """Serve ``branch`` on the port; sessions on the branch it served before drain."""
        previous, entry.branch = entry.branch, branch
        try:
            target = _pinned(await self._resolve(branch, settings))
        except (UserError, NeonApiError) as exc:
            entry.problem = f"port {entry.port} serves branch {branch}: {exc}"
            entry.server.unselect(f"neonlocal: {entry.problem}")
            log.error("pinned_port_unresolved", port=entry.port, branch=branch, error=str(exc))
        else:
            entry.problem = None
            entry.server.select(branch, target)
        if previous != branch:
            moved = entry.server.move_sessions(
                "drain",
                keep_branch=branch,
                message=f'neonlocal: port {entry.port} now serves branch "{branch}"; '
                "reconnect to use it (terminating connection due to administrator command)",
                reason=f"port {entry.port} switched to {branch}",
            )
            log.info("pinned_port_switched", port=entry.port, branch=branch, moved=moved)

    async def _refresh(self, branch: str, stale: Target) -> Target | None:
        if self._refresher is None:
            return None
        fresh = await self._refresher(branch, stale)
        return _pinned(fresh) if fresh is not None else None

    def _retire(self, entry: _Port, deadline: float) -> None:
        """Stop accepting on a removed port now; its sessions drain, then it is gone."""
        task = asyncio.get_running_loop().create_task(self._close_port(entry, deadline))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_port(self, entry: _Port, deadline: float) -> None:
        server = entry.server
        await server.close_listeners()
        server.move_sessions(
            "drain",
            keep_branch="",  # no branch has an empty name: every session drains
            message=f"neonlocal: port {entry.port} was removed from [ports] "
            "(terminating connection due to administrator command)",
            reason=f"port {entry.port} removed",
        )
        log.info("pinned_port_closed", port=entry.port, branch=entry.branch)
        await server.close(deadline)

    def status(self) -> list[dict[str, Any]]:
        """Each pinned port: its branch, upstream, sessions, and what is wrong, if anything."""
        rows = {
            port: {"port": port, "branch": branch, "upstream_host": None, "read_only": None}
            | {"sessions": 0, "listen": [], "error": why}
            for port, (branch, why) in self._unbound.items()
        }
        for port, entry in self._ports.items():
            selected = entry.server.selected
            rows[port] = {
                "port": port,
                "branch": entry.branch,
                "upstream_host": selected[1].describe() if selected else None,
                "read_only": selected[1].read_only if selected else None,
                "sessions": len(entry.server.sessions),
                "listen": list(entry.server.listening),
                "error": entry.problem,
            }
        return [rows[port] for port in sorted(rows)]

    async def close(self, deadline: float) -> None:
        """Stop every port: sessions get ``deadline`` seconds to end, then are ended."""
        entries, self._ports = list(self._ports.values()), {}
        closing = [entry.server.close(deadline) for entry in entries]
        await asyncio.gather(*closing, *self._retiring)


def _on_port(settings: Settings, port: int) -> Settings:
    return replace(settings, listen=replace(settings.listen, port=port))


def _pinned(target: Target) -> Target:
    """A pinned port's target: protected as configured, whatever `use --write` allowed."""
    return guarded(target, target.protection, writes_allowed=False)
