"""The composition root of ``neonlocal up``: settings, server, watcher, control socket, signals.

A reload (file change, SIGHUP or ``neonlocal use``) either applies a complete new
configuration or keeps the last good one and reports why: the daemon never goes down over a
broken edit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from neonlocal import __version__
from neonlocal.admin import AdminError, AdminServer
from neonlocal.config import ConfigError, Settings, check_selected_branch, load_settings
from neonlocal.control import ControlServer
from neonlocal.defaults import SHUTDOWN_DEADLINE_S
from neonlocal.localtls import LocalTlsError, load_local_tls
from neonlocal.paths import control_socket_path
from neonlocal.proxy import tls
from neonlocal.proxy.server import Server, is_loopback
from neonlocal.sdnotify import Notifier
from neonlocal.selection import watch_file
from neonlocal.targets import Target, TargetError, UnknownBranch, resolve_target

log = structlog.get_logger("neonlocal.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message is one line for the user."""


def _fingerprint(path: Path, env: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    with contextlib.suppress(OSError):
        digest.update(path.read_bytes())
    for key in sorted(k for k in env if k.startswith("NEONLOCAL_")):
        digest.update(f"{key}={env[key]}".encode())
    return digest.hexdigest()


def _insecure_warning(name: str, target: Target) -> str:
    return (
        f'branch "{name}" uses tls = "{target.tls.value}": the upstream certificate is not '
        "fully verified"
    )


class Daemon:
    def __init__(
        self,
        config_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        sockets: Sequence[socket.socket] = (),
    ) -> None:
        self.config_path = config_path
        self.env = dict(os.environ if env is None else env)
        self._inherited = list(sockets)
        self.settings: Settings | None = None
        self.server: Server | None = None
        self.control: ControlServer | None = None
        self.admin: AdminServer | None = None
        self.config_error: str | None = None
        self.warnings: list[str] = []
        self.started_at = time.time()
        self._fingerprint = ""
        self._reload_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.notifier = Notifier.from_env(self.env)

    # --- start and stop --------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            settings = load_settings(self.config_path, self.env)
            check_selected_branch(settings)
            if settings.branch is not None:
                resolve_target(settings, settings.branch)
        except (ConfigError, TargetError) as exc:
            raise StartupError(f"neonlocal: {exc}") from None
        self._check_exposure(settings)
        self.settings = settings
        self._fingerprint = _fingerprint(self.config_path, self.env)
        self.server = Server(settings)
        if settings.local.tls:
            try:
                self.server.local_tls = load_local_tls(
                    self.config_path, settings.local.tls_cert, settings.local.tls_key
                )
            except LocalTlsError as exc:
                raise StartupError(str(exc)) from None
        self._apply_selection(settings)
        await self.server.start(self._inherited)
        control_path = control_socket_path(self.config_path, self.env, settings.control.socket)
        self.control = ControlServer(control_path, self.handle_control)
        try:
            await self.control.start()
        except RuntimeError as exc:
            await self.server.close()
            raise StartupError(str(exc)) from None
        await self._start_admin(settings)
        self._spawn(self._watch())
        selected = self.server.selected
        log.info(
            "daemon_started",
            version=__version__,
            listen=self.server.listening,
            branch=selected[0] if selected else None,
            upstream=selected[1].describe() if selected else None,
            config=str(self.config_path),
        )
        for warning in self.warnings:
            log.warning("insecure_target", detail=warning)
        self.notifier.ready(self._status_line())

    async def _start_admin(self, settings: Settings) -> None:
        assert self.server is not None
        assert self.control is not None
        address = settings.admin.address
        if address is None:
            return
        admin = AdminServer(*address, metrics=self.server.metrics, not_ready=self.not_ready_reason)
        try:
            await admin.start()
        except AdminError as exc:
            await self.control.close()
            await self.server.close()
            raise StartupError(str(exc)) from None
        self.admin = admin

    def not_ready_reason(self) -> str | None:
        """None when new sessions would be served, else why not (for ``/readyz``)."""
        if self.server is None or not self.server.accepting:
            return "not listening" if not self._stop.is_set() else "shutting down"
        if self.server.selected is None:
            return "no branch is selected"
        return None

    def _check_exposure(self, settings: Settings) -> None:
        exposed = [h for h in settings.listen.host if not is_loopback(h)]
        if not exposed:
            return
        if not settings.listen.allow_non_loopback:
            raise StartupError(
                f"neonlocal: refusing to listen on non-loopback address {exposed[0]}: set "
                "[listen] allow_non_loopback = true and a [local] password to expose the daemon"
            )
        if settings.local.password is None:
            raise StartupError(
                f"neonlocal: listening on {exposed[0]} needs a [local] password, so that "
                "other machines cannot use your database credentials"
            )
        log.warning("listening_beyond_loopback", addresses=exposed)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self, deadline: float | None = None) -> None:
        """Stop accepting, let sessions finish for ``deadline`` s (the setting), end the rest."""
        if deadline is None:
            deadline = self.settings.shutdown_deadline if self.settings else SHUTDOWN_DEADLINE_S
        self._stop.set()
        self.notifier.stopping()
        log.info("daemon_stopping", deadline_s=deadline)
        if self.control is not None:
            await self.control.close()
        if self.server is not None:
            await self.server.close(deadline)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        if self.admin is not None:
            # Last: /readyz says "shutting down" and /metrics stays readable while draining.
            await self.admin.close()
        log.info("daemon_stopped")

    # --- configuration ---------------------------------------------------------------------------

    def _apply_selection(self, settings: Settings) -> None:
        assert self.server is not None
        self.warnings = []
        for configured in settings.branches:
            with contextlib.suppress(TargetError):
                candidate = resolve_target(settings, configured)
                if candidate.insecure:
                    self.warnings.append(_insecure_warning(configured, candidate))
        name = settings.branch
        if name is None:
            self.server.unselect("neonlocal: no branch is selected; run `neonlocal use NAME`")
            return
        self.server.select(name, resolve_target(settings, name))

    async def reload(self, reason: str, *, force: bool = False) -> str | None:
        """Re-read the config; returns the problem if it was refused (and the old one kept)."""
        async with self._reload_lock:
            fingerprint = _fingerprint(self.config_path, self.env)
            if fingerprint == self._fingerprint and not force:
                return self.config_error
            self.notifier.reloading()
            try:
                return self._reload(reason, fingerprint)
            finally:
                self.notifier.ready(self._status_line())

    def _reload(self, reason: str, fingerprint: str) -> str | None:
        assert self.server is not None
        before = self.server.selected
        try:
            settings = load_settings(self.config_path, self.env)
            self._check_exposure(settings)
            check_selected_branch(settings)  # an unknown name, reported at its file:line
            if settings.branch is not None:
                resolve_target(settings, settings.branch)  # refuse before touching anything
        except (ConfigError, UnknownBranch, TargetError, StartupError) as exc:
            problem = str(exc)
            if isinstance(exc, UnknownBranch):
                problem = f"{self.config_path}: {problem}"
            self.config_error = problem.removeprefix("neonlocal: ")
            self._fingerprint = fingerprint
            log.error("config_rejected", problem=self.config_error, kept=_name(before))
            return self.config_error
        listen_changed = (settings.listen.host, settings.listen.port) != (
            self.settings.listen.host if self.settings else None,
            self.settings.listen.port if self.settings else None,
        )
        self.settings = settings
        self._fingerprint = fingerprint
        self.config_error = None
        tls.forget_contexts()
        self.server.update_settings(settings)
        self._apply_selection(settings)
        after = self.server.selected
        log.info("config_reloaded", reason=reason, branch=_name(after))
        if _name(before) != _name(after):
            log.info(
                "branch_switched",
                previous=_name(before),
                branch=_name(after),
                upstream=after[1].describe() if after else None,
            )
        if listen_changed:
            log.warning("listen_change_needs_restart", listen=self.server.listening)
        admin = self.admin
        if settings.admin.address != (admin and (admin.host, admin.requested_port)):
            log.warning("admin_change_needs_restart", admin=admin.address if admin else None)
        for warning in self.warnings:
            log.warning("insecure_target", detail=warning)
        return None

    async def _watch(self) -> None:
        try:
            async for _ in watch_file(self.config_path, self._stop):
                await self.reload("file changed")
        except Exception as exc:  # the watcher must never take the proxy down
            log.error("config_watch_failed", error=str(exc))

    # --- control -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.server is not None
        selected = self.server.selected
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config": str(self.config_path),
            "branch": _name(selected),
            "upstream_host": selected[1].describe() if selected else None,
            "listen": list(self.server.listening),
            "sessions": self.server.sessions_by_branch(),
            "sessions_total": self.server.sessions_total,
            "last_error": self.server.last_error,
            "config_error": self.config_error,
            "warnings": list(self.warnings),
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    async def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "reload":
            problem = await self.reload("control request", force=True)
            status = self.status()
            if problem is not None:
                return {"ok": False, "error": problem, **status}
            expected = request.get("branch")
            if expected is not None and status["branch"] != expected:
                return {
                    "ok": False,
                    "error": f'the daemon serves "{status["branch"]}", not "{expected}"',
                    **status,
                }
            terminated = 0
            if request.get("terminate") and self.server is not None:
                branch = status["branch"]
                terminated = self.server.terminate_sessions(
                    keep_branch=branch,
                    message=(
                        f'neonlocal switched to branch "{branch}"; reconnect to use it '
                        "(terminating connection due to administrator command)"
                    ),
                    reason=f"switched to {branch}",
                )
            return {"ok": True, "terminated": terminated, **status}
        return {"ok": False, "error": f"unknown control operation {op!r}"}

    def _status_line(self) -> str:
        if self.server is None or self.server.selected is None:
            return "no branch selected"
        name, target = self.server.selected
        return f"serving {name} ({target.describe()})"

    # --- signals -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, drain, stop. SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        await self.start()
        interrupts = 0

        def on_stop(signame: str) -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts > 1 and signame == "SIGINT":
                log.warning("forced_exit")
                os._exit(130)
            log.info("signal_received", signal=signame)
            self._stop.set()

        # remove_signal_handler resets to the default, not to what was there before us
        # (an embedding application's or a test runner's handler): keep and restore it.
        previous = {sig: signal.getsignal(sig) for sig in _HANDLED_SIGNALS}
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig.name)
            installed.append(sig)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: self._spawn(self.reload("SIGHUP", force=True))
        )
        installed.append(signal.SIGHUP)
        watchdog = self.notifier.watchdog_interval()
        if watchdog:
            self._spawn(self._watchdog(watchdog))
        try:
            await self._stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
                handler = previous[sig]
                if handler is not None:
                    signal.signal(sig, handler)
            await self.stop()

    async def _watchdog(self, interval: float) -> None:
        while not self._stop.is_set():
            self.notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)


_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _name(selected: tuple[str, Target] | None) -> str | None:
    return selected[0] if selected else None
