"""The composition root of ``neonlocal up``: settings, server, watcher, control socket, signals.

A start and a reload (file change, SIGHUP or ``neonlocal use``) take the same two steps:
load, check and resolve the config without touching what is served, then apply it. So a
reload either applies a complete new configuration or keeps the last good one and reports
why: the daemon never goes down over a broken edit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import os
import signal
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import structlog

from neonlocal import __version__
from neonlocal.apikey import ApiKeyError, config_relative
from neonlocal.config.errors import ConfigError, UnknownBranch
from neonlocal.config.file import switch_branch
from neonlocal.config.loader import SettingsLoader
from neonlocal.config.values import (
    SessionsOnSwitch,
    Settings,
    check_selected_branch,
    is_loopback,
)
from neonlocal.control import ControlServer
from neonlocal.defaults import SHUTDOWN_DEADLINE_S
from neonlocal.errors import StartupError
from neonlocal.fdlimit import ensure_room_for
from neonlocal.filewatch import watch_file
from neonlocal.gitfollow import FollowSkipped, GitFollower, GitFollowError, neon_branch_for
from neonlocal.metrics import ErrorKind
from neonlocal.neon import ApiUnreachable, NeonApiError
from neonlocal.paths import control_socket_path
from neonlocal.pgwire import sqlstate
from neonlocal.pinned import PinnedPorts
from neonlocal.proxy import tls
from neonlocal.proxy.context import SessionRefused
from neonlocal.proxy.server import Server
from neonlocal.proxy.unix import socket_hint
from neonlocal.resolver import (
    API_RETRY,
    EphemeralSpec,
    Resolution,
    TargetResolver,
    create_branch,
    delete_branch_within,
)
from neonlocal.sdnotify import Notifier
from neonlocal.targets import Target, TargetError, resolve_target
from neonlocal.tls.local import load_local_tls

if TYPE_CHECKING:
    from neonlocal.admin import AdminServer
    from neonlocal.neon import Branch

log = structlog.get_logger("neonlocal.daemon")

# Deleting an ephemeral branch gets at least this long, even with a shorter deadline, and
# at most this much of the deadline is kept from draining sessions for it.
EPHEMERAL_DELETE_MIN_S = 5.0
EPHEMERAL_DELETE_RESERVE_S = 10.0
# A selected branch the API could not be asked about is retried with backoff up to this.
RESOLVE_RETRY_MAX_S = 60.0
# How long what `use` said about its switch (and the switch it made) count as this switch's.
SWITCH_INTENT_S = 10.0
# Deleting a point-in-time branch nothing serves any more (moments.py) tries this long.
MOMENT_DELETE_BUDGET_S = 30.0


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


@dataclass(frozen=True)
class _Checked:
    """A configuration loaded, checked and resolved, not yet served."""

    settings: Settings
    resolution: Resolution | None
    # On a start only: the API could not be asked; the daemon serves and keeps trying.
    unreachable: ApiUnreachable | None = None


class Daemon:
    def __init__(
        self,
        config_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        sockets: Sequence[socket.socket] = (),
        ephemeral: EphemeralSpec | None = None,
        loader: SettingsLoader | None = None,
    ) -> None:
        self.config_path = config_path
        # `up --ephemeral`: the branch created for this daemon replaces the file's `branch`.
        self.ephemeral = ephemeral
        self.ephemeral_branch: Branch | None = None
        self.resolver: TargetResolver | None = None
        self._pending_resolution: asyncio.Task[None] | None = None
        self.env = dict(os.environ if env is None else env)
        self.loader = loader or SettingsLoader(config_path, self.env)
        self._inherited = list(sockets)
        self.settings: Settings | None = None
        self.server: Server | None = None
        self.control: ControlServer | None = None
        self.admin: AdminServer | None = None
        self.config_error: str | None = None
        self.warnings: list[str] = []
        # What `neonlocal use --keep/--terminate` asked for the switch it is about to write:
        # (branch, mode, until when it holds), read by whichever reload sees the switch.
        self._switch_intent: tuple[str, SessionsOnSwitch, float] | None = None
        # The last switch: its branch, the mode applied and the sessions it moved, by branch.
        self.last_switch: dict[str, Any] | None = None
        self.started_at = time.time()
        self._fingerprint = ""
        # The settings the daemon started with: what its listeners, admin and git follower
        # still use, whatever the file says now (those need a restart).
        self._started_with: Settings | None = None
        self.restart_needed: list[str] = []
        self._reload_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.notifier = Notifier.from_env(self.env)
        # [ports]: extra local ports, each pinned to one branch (pinned.py).
        self.ports = PinnedPorts(
            self._pinned_target,
            refresher=self._refresh_credentials,
            local_tls=lambda: self.server.local_tls if self.server is not None else None,
        )

    # --- start and stop --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load, check and resolve the config, then serve it; raises StartupError."""
        try:
            checked = await self._load_checked(first=True)
        except (ConfigError, TargetError, UnknownBranch, NeonApiError, ApiKeyError) as exc:
            raise StartupError(f"neonlocal: {exc}") from None
        settings = checked.settings
        follower = self._git_follower(settings)
        self._started_with = settings
        self._apply(checked, _fingerprint(self.config_path, self.env))
        assert self.server is not None
        await self.server.start(self._inherited)
        await self.ports.apply(settings)
        self._drop_unused_moments()
        await self._start_control(settings)
        await self._start_admin(settings)
        self._spawn(self._watch())
        if follower is not None:
            self._spawn(follower.run(self._stop))
            log.info("git_follow_started", repo=str(follower.repo))
        self._log_started()
        self.notifier.ready(self._status_line())

    async def _start_control(self, settings: Settings) -> None:
        assert self.server is not None
        control_path = control_socket_path(self.config_path, self.env, settings.control.socket)
        self.control = ControlServer(control_path, self.handle_control)
        try:
            await self.control.start()
        except StartupError:
            await self.server.close()
            raise

    def _log_started(self) -> None:
        assert self.server is not None
        selected = self.server.selected
        log.info(
            "daemon_started",
            version=__version__,
            listen=self.server.listening,
            branch=selected[0] if selected else None,
            upstream=selected[1].describe() if selected else None,
            config=str(self.config_path),
            database_url=self._database_url(),
        )
        unix = self.server.unix_socket
        hint = socket_hint(unix) if unix is not None else None
        if hint is not None:
            log.warning("unix_socket_not_where_libpq_looks", socket=str(unix), detail=hint)
        for warning in self.warnings:
            log.warning("insecure_target", detail=warning)

    def _database_url(self) -> str | None:
        """The DATABASE_URL for an app, as `neonlocal url` prints it (no password in it)."""
        assert self.server is not None
        try:
            port = self.server.port
        except (IndexError, OSError):  # no TCP listener (a Unix socket only)
            return None
        selected = self.server.selected
        target = selected[1] if selected else None
        user = quote((target and target.user) or "neondb_owner", safe="")
        database = quote((target and target.database) or "neondb", safe="")
        return f"postgresql://{user}@localhost:{port}/{database}"

    async def _start_admin(self, settings: Settings) -> None:
        assert self.server is not None
        assert self.control is not None
        address = settings.admin.address
        if address is None:
            return
        # Only now: the HTTP server and the metrics exposition stay out of a daemon without it.
        from neonlocal.admin import AdminServer

        admin = AdminServer(*address, metrics=self.server.metrics, not_ready=self.not_ready_reason)
        try:
            await admin.start()
        except StartupError:
            await self.control.close()
            await self.server.close()
            raise
        self.admin = admin

    def not_ready_reason(self) -> str | None:
        """None when new sessions would be served, else why not (for ``/readyz``)."""
        if self.server is None or not self.server.accepting:
            return "not listening" if not self._stop.is_set() else "shutting down"
        if self.server.selected is None:
            return "no branch is selected"
        return None

    def _check_exposure(self, settings: Settings) -> None:
        # The settings refuse a non-loopback address without allow_non_loopback and a
        # local password; what remains is to say so in the log.
        exposed = [h for h in settings.listen.host if not is_loopback(h)]
        if exposed:
            log.warning("listening_beyond_loopback", addresses=exposed)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self, deadline: float | None = None) -> None:
        """Stop accepting, let sessions finish for ``deadline`` s (the setting), end the rest."""
        if deadline is None:
            deadline = self.settings.shutdown_deadline if self.settings else SHUTDOWN_DEADLINE_S
        self._stop.set()
        self.notifier.stopping()
        log.info("daemon_stopping", deadline_s=deadline)
        open_sessions = len(self.server.sessions) if self.server is not None else 0
        if open_sessions and deadline > 0:
            log.info(
                "draining",
                sessions=open_sessions,
                deadline_s=deadline,
                detail="waiting for open sessions to end; Ctrl-C again to stop now",
            )
        if self.control is not None:
            await self.control.close()
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + deadline
        if self.server is not None:
            # An ephemeral branch is deleted after the sessions end, within the same deadline.
            reserve = min(EPHEMERAL_DELETE_RESERVE_S, deadline / 2) if self.ephemeral_branch else 0
            await asyncio.gather(
                self.server.close(deadline - reserve), self.ports.close(deadline - reserve)
            )
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        await self._delete_ephemeral(max(ends_at - loop.time(), EPHEMERAL_DELETE_MIN_S))
        if self.resolver is not None:
            await self.resolver.forget_moments(
                set(), max(ends_at - loop.time(), EPHEMERAL_DELETE_MIN_S)
            )
        if self.resolver is not None:
            await self.resolver.aclose()
        if self.admin is not None:
            # Last: /readyz says "shutting down" and /metrics stays readable while draining.
            await self.admin.close()
        log.info("daemon_stopped")

    # --- configuration ---------------------------------------------------------------------------
    # A start and a reload run the same two steps: _load_checked, which changes nothing the
    # daemon serves, and _apply. A reload whose first step fails keeps the last good config.

    async def _load_checked(self, *, first: bool) -> _Checked:
        """Load the file, check it and resolve the branch it selects.

        The resolver is asked about the new settings and keeps its own until ``_apply``.
        Raises ConfigError, UnknownBranch, TargetError, NeonApiError or ApiKeyError; on the
        ``first`` load (a start) an unreachable API is not one of them: the daemon serves
        anyway (clients get the reason) and keeps trying, as the network may be late.
        """
        if not first:
            self._refuse_an_emptied_file()
        settings = await self.loader.load()
        self._check_exposure(settings)
        if self.ephemeral is None:
            check_selected_branch(settings)  # an unknown name, reported at its file:line
        if first:
            self.resolver = TargetResolver(settings, self.env, retry=API_RETRY)
            if self.ephemeral is not None:
                await self._create_ephemeral(self.ephemeral)
        assert self.resolver is not None
        name = self._wanted_branch(settings)
        if name is None:
            return _Checked(settings, None)
        try:
            resolution = await self.resolver.resolve(name, settings=settings)
        except ApiUnreachable as exc:
            if not first:
                raise
            return _Checked(settings, None, unreachable=exc)
        return _Checked(settings, resolution)

    def _refuse_an_emptied_file(self) -> None:
        """A file that was emptied is a broken edit (a truncating save, a stray `>`), not a
        wish to serve nothing: the last good configuration stays."""
        try:
            empty = not self.config_path.read_bytes().strip()
        except OSError:
            return  # the loader says what is wrong with it
        if empty:
            raise ConfigError(
                self.config_path,
                None,
                "the file is empty; still serving the last good configuration "
                "(to select no branch, remove the `branch` line instead)",
            )

    def _apply(self, checked: _Checked, fingerprint: str) -> None:
        """Serve ``checked``: the settings, the selected branch and the warnings about them."""
        assert self.resolver is not None
        settings = checked.settings
        self.resolver.update_settings(settings)
        self.settings = settings
        self._fingerprint = fingerprint
        self.config_error = None
        ensure_room_for(settings.listen.max_sessions)
        if self.server is None:
            self.server = self._new_server(settings)
        else:
            tls.forget_contexts()
            self.server.update_settings(settings)
        self._apply_selection(settings, checked.resolution)
        if checked.unreachable is not None:
            self._resolve_later(self._wanted_branch(settings) or "", checked.unreachable)

    def _new_server(self, settings: Settings) -> Server:
        server = Server(settings)
        server.credential_refresher = self._refresh_credentials
        if settings.local.tls:
            server.local_tls = load_local_tls(
                self.config_path, settings.local.tls_cert, settings.local.tls_key
            )
        return server

    def _apply_selection(self, settings: Settings, resolution: Resolution | None) -> None:
        assert self.server is not None
        if self._pending_resolution is not None:
            self._pending_resolution.cancel()
            self._pending_resolution = None
        self.warnings = []
        for configured in settings.branches:
            with contextlib.suppress(TargetError):
                candidate = resolve_target(settings, configured)
                if candidate.insecure:
                    self.warnings.append(_insecure_warning(configured, candidate))
        if resolution is None or resolution.name != self._writable_branch():
            self._end_write_grant()
        if resolution is None:
            self.server.unselect("neonlocal: no branch is selected; run `neonlocal use NAME`")
            return
        self.server.select(resolution.name, resolution.target)
        self._note_resolution(resolution)

    async def reload(self, reason: str, *, force: bool = False) -> str | None:
        """Re-read the config; returns the problem if it was refused (and the old one kept)."""
        async with self._reload_lock:
            fingerprint = _fingerprint(self.config_path, self.env)
            if fingerprint == self._fingerprint and not force:
                return self.config_error
            self.notifier.reloading()
            try:
                return await self._reload(reason, fingerprint)
            finally:
                self.notifier.ready(self._status_line())

    async def _reload(self, reason: str, fingerprint: str) -> str | None:
        assert self.server is not None
        assert self.settings is not None
        before, previous = self.server.selected, self.settings
        try:
            checked = await self._load_checked(first=False)
        except (ConfigError, UnknownBranch, TargetError, NeonApiError, ApiKeyError) as exc:
            problem = str(exc)
            if isinstance(exc, UnknownBranch):
                problem = f"{self.config_path}: {problem}"
            self.config_error = problem.removeprefix("neonlocal: ")
            self._fingerprint = fingerprint
            log.error("config_rejected", problem=self.config_error, kept=_name(before))
            return self.config_error
        self._apply(checked, fingerprint)
        await self.ports.apply(checked.settings)
        self._drop_unused_moments()
        log.info("config_reloaded", reason=reason, branch=_name(self.server.selected))
        self._log_changes(previous, before)
        self._move_sessions(before)
        for warning in self.warnings:
            log.warning("insecure_target", detail=warning)
        return None

    def _log_changes(self, previous: Settings, before: tuple[str, Target] | None) -> None:
        """Say what a reload switched, and what it changed that only a restart applies."""
        assert self.server is not None
        assert self.settings is not None
        settings, after = self.settings, self.server.selected
        if _name(before) != _name(after):
            log.info(
                "branch_switched",
                previous=_name(before),
                branch=_name(after),
                upstream=after[1].describe() if after else None,
            )
        listen = (settings.listen.host, settings.listen.port)
        if listen != (previous.listen.host, previous.listen.port):
            log.warning("listen_change_needs_restart", listen=self.server.listening)
        if (previous.git.follow, previous.git.repo) != (settings.git.follow, settings.git.repo):
            log.warning("git_change_needs_restart", follow=settings.git.follow)
        admin = self.admin
        if settings.admin.address != (admin and (admin.host, admin.requested_port)):
            log.warning("admin_change_needs_restart", admin=admin.address if admin else None)
        if self._started_with is not None:
            self.restart_needed = _restart_needed(self._started_with, settings)

    def _move_sessions(self, before: tuple[str, Target] | None) -> None:
        """After a switch: sessions still on another branch follow ``[switch] sessions``."""
        assert self.server is not None
        after = self.server.selected
        if after is None or _name(before) == after[0]:
            return
        name = after[0]
        mode = self._switch_mode(name)
        moved = self.server.move_sessions(
            mode,
            keep_branch=name,
            message=(
                f'neonlocal switched to branch "{name}"; reconnect to use it '
                "(terminating connection due to administrator command)"
            ),
            reason=f"switched to {name}",
        )
        self.last_switch = {
            "branch": name,
            "sessions": mode,
            "moved": moved,
            "at": time.monotonic(),
        }
        if moved:
            log.info("sessions_moved", branch=name, mode=mode, sessions=moved)

    def _switch_mode(self, name: str) -> SessionsOnSwitch:
        assert self.settings is not None
        intent, self._switch_intent = self._switch_intent, None
        if intent is not None and intent[0] == name and time.monotonic() < intent[2]:
            return intent[1]
        return self.settings.switch.sessions

    async def _watch(self) -> None:
        try:
            async for _ in watch_file(self.config_path, self._stop):
                await self.reload("file changed")
        except Exception as exc:  # the watcher must never take the proxy down
            log.error("config_watch_failed", error=str(exc))

    # --- branches found through the Neon API ----------------------------------------------------

    def _wanted_branch(self, settings: Settings) -> str | None:
        if self.ephemeral_branch is not None:
            return self.ephemeral_branch.name
        return settings.branch

    def _note_resolution(self, resolution: Resolution) -> None:
        if resolution.neon is None or resolution.from_cache:
            return
        log.info(
            "branch_resolved",
            branch=resolution.name,
            branch_id=resolution.neon.branch_id,
            upstream=resolution.target.describe(),
            compute=resolution.neon.endpoint_state.value,
        )
        if resolution.compute_suspended:
            # Nothing pings the compute to wake it early: that would keep it awake.
            log.info(
                "compute_waking",
                branch=resolution.name,
                upstream=resolution.target.describe(),
                compute=resolution.neon.endpoint_state.value,
                detail="the compute is suspended; the first connection wakes it and waits",
            )

    def _drop_unused_moments(self) -> None:
        """Point-in-time branches that nothing selects or pins any more are deleted."""
        if self.resolver is None or self.settings is None:
            return
        keep = set(self.settings.ports.values())
        selected = self._wanted_branch(self.settings)
        if selected is not None:
            keep.add(selected)
        self._spawn(self.resolver.forget_moments(keep, MOMENT_DELETE_BUDGET_S))

    async def _pinned_target(self, name: str, settings: Settings) -> Target:
        """The Target a port pinned to ``name`` serves; raises as ``resolve`` does."""
        assert self.resolver is not None
        return (await self.resolver.resolve(name, settings=settings)).target

    async def _refresh_credentials(self, branch: str, stale: Target) -> Target | None:
        """The server refused our password (a reset, a rotation): ask the API once more."""
        assert self.resolver is not None
        assert self.server is not None
        try:
            return await self.resolver.refresh(branch, stale)
        except (NeonApiError, ApiKeyError) as exc:
            message = (
                f'neonlocal: branch "{branch}" ({stale.describe()}) refused the password '
                f"neonlocal holds, and fetching a new one failed: {exc}"
            )
            log.warning("credentials_refresh_failed", branch=branch, error=str(exc))
            self.server.record_error(message)
            raise SessionRefused(message, sqlstate.INVALID_PASSWORD, ErrorKind.AUTH) from None

    def _resolve_later(self, name: str, problem: NeonApiError) -> None:
        assert self.server is not None
        self.server.unselect(f'neonlocal: branch "{name}": {problem}; neonlocal keeps trying')
        log.warning("branch_unresolved", branch=name, error=str(problem), action="retrying")
        task = asyncio.get_running_loop().create_task(self._retry_resolution(name))
        self._pending_resolution = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry_resolution(self, name: str) -> None:
        assert self.resolver is not None
        assert self.server is not None
        delay = 1.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            try:
                resolution = await self.resolver.resolve(name)
            except ApiUnreachable:
                delay = min(delay * 2, RESOLVE_RETRY_MAX_S)
                continue
            except (NeonApiError, ApiKeyError) as exc:
                self._pending_resolution = None
                self.server.unselect(f'neonlocal: branch "{name}": {exc}')
                log.error("branch_unresolved", branch=name, error=str(exc))
                return
            self._pending_resolution = None
            self.server.select(name, resolution.target)
            self._note_resolution(resolution)
            self.notifier.ready(self._status_line())
            return

    async def _create_ephemeral(self, spec: EphemeralSpec) -> None:
        assert self.resolver is not None
        name = spec.new_name()
        try:
            project = self.resolver.require_project()
            api = await self.resolver.api()
            branch = await create_branch(
                api,
                project,
                name,
                parent=spec.parent,
                expires_in=spec.expires_in,
                annotation=spec.annotation,
            )
        except (NeonApiError, ApiKeyError) as exc:
            raise StartupError(f"neonlocal: cannot create an ephemeral branch: {exc}") from None
        self.ephemeral_branch = branch
        log.info(
            "ephemeral_branch_created",
            branch=name,
            branch_id=branch.id,
            expires_at=branch.expires_at.isoformat() if branch.expires_at else None,
        )

    async def _delete_ephemeral(self, budget: float) -> None:
        branch, self.ephemeral_branch = self.ephemeral_branch, None
        if branch is None or self.resolver is None:
            return
        expires = branch.expires_at.isoformat() if branch.expires_at else None
        try:
            project = self.resolver.require_project()
            api = await self.resolver.api()
        except (NeonApiError, ApiKeyError) as exc:
            log.warning("ephemeral_branch_left", branch=branch.name, error=str(exc))
            return
        if await delete_branch_within(api, project, branch.id, budget):
            log.info("ephemeral_branch_deleted", branch=branch.name, branch_id=branch.id)
        else:
            log.warning(
                "ephemeral_branch_left",
                branch=branch.name,
                branch_id=branch.id,
                expires_at=expires,
                detail="Neon deletes it when it expires",
            )

    # --- git following -------------------------------------------------------------------------

    def _git_follower(self, settings: Settings) -> GitFollower | None:
        if not settings.git.follow:
            return None
        if self.ephemeral is not None:
            log.warning("git_follow_off", reason="up --ephemeral serves its own branch")
            return None
        repo = settings.git.repo
        path = config_relative(settings, repo) if repo is not None else Path.cwd()
        try:
            return GitFollower(path, self._follow_checkout)
        except GitFollowError as exc:
            raise StartupError(f"neonlocal: [git] follow: {exc}") from None

    async def _follow_checkout(self, git_branch: str) -> None:
        """HEAD moved to ``git_branch``: select its Neon branch as `neonlocal use` would."""
        assert self.resolver is not None
        try:
            name = await neon_branch_for(self.resolver, git_branch)
        except FollowSkipped as exc:
            log.info("git_follow_skipped", git_branch=git_branch, reason=str(exc))
            return
        except (NeonApiError, ApiKeyError) as exc:
            log.warning("git_follow_failed", git_branch=git_branch, error=str(exc))
            return
        await asyncio.to_thread(switch_branch, self.config_path, name)
        problem = await self.reload(f"git checkout {git_branch}", force=True)
        if problem is not None:
            log.warning("git_follow_failed", git_branch=git_branch, branch=name, error=problem)
            return
        log.info("git_followed", git_branch=git_branch, branch=name)

    # --- control -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.server is not None
        selected = self.server.selected
        unix = self.server.unix_socket
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config": str(self.config_path),
            "branch": _name(selected),
            "upstream_host": selected[1].describe() if selected else None,
            "read_only": selected[1].read_only if selected else None,
            "listen": list(self.server.listening),
            "ports": self.ports.status(),
            "sessions": self.server.sessions_by_branch(),
            "sessions_total": self.server.sessions_total,
            "unix_socket": str(unix) if unix is not None else None,
            "unix_socket_hint": socket_hint(unix) if unix is not None else None,
            # Sessions whose login waits for Neon to wake the branch's compute.
            "sessions_waking": len(self.server.waking),
            "last_error": self.server.last_error,
            "last_error_at": _timestamp(self.server.last_error_at),
            "config_error": self.config_error,
            "warnings": list(self.warnings) + [f"restart needed: {c}" for c in self.restart_needed],
            "ephemeral_branch": self.ephemeral_branch.name if self.ephemeral_branch else None,
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    async def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "reload":
            self._grant_writes(request)
            problem = await self.reload("control request", force=True)
            status = self.status()
            if problem is not None:
                self._end_write_grant()
                return {"ok": False, "error": problem, **status}
            expected = request.get("branch")
            if expected is not None and status["branch"] != expected:
                self._end_write_grant()
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
            return {"ok": True, "terminated": terminated, "switch": self._recent_switch(), **status}
        if op == "switching":
            return self._expect_switch(request.get("branch"), request.get("sessions"))
        if op == "can_use":
            return await self._can_use(request.get("branch"))
        return {"ok": False, "error": f"unknown control operation {op!r}"}

    def _grant_writes(self, request: dict[str, Any]) -> None:
        """`use NAME --write` lets sessions to protected NAME write until the selection
        changes; any other `use` ends such a grant (protect.py)."""
        name = request.get("branch")
        if self.resolver is not None and isinstance(name, str):
            self.resolver.allow_writes(name if request.get("write") else None)

    def _writable_branch(self) -> str | None:
        return self.resolver.writable if self.resolver is not None else None

    def _end_write_grant(self) -> None:
        if self.resolver is not None and self.resolver.writable is not None:
            log.info("writes_allowed_ended", branch=self.resolver.writable)
            self.resolver.allow_writes(None)

    def _expect_switch(self, name: object, mode: object) -> dict[str, Any]:
        """`use --keep/--terminate` says, before it writes the file, what the switch it is
        about to make should do to open sessions: the reload that sees it may come from the
        file watcher, before the CLI's own reload request."""
        if not isinstance(name, str) or mode not in ("drain", "keep", "terminate"):
            return {"ok": False, "error": "switching needs a branch and sessions mode"}
        sessions: SessionsOnSwitch = mode  # checked just above
        self._switch_intent = (name, sessions, time.monotonic() + SWITCH_INTENT_S)
        return {"ok": True}

    def _recent_switch(self) -> dict[str, Any] | None:
        """The switch the CLI's reload request confirms: the last one, if it just happened."""
        switch = self.last_switch
        if switch is None or time.monotonic() - switch["at"] > SWITCH_INTENT_S:
            return None
        return {k: v for k, v in switch.items() if k != "at"}

    async def _can_use(self, name: object) -> dict[str, Any]:
        """Whether `neonlocal use NAME` may write NAME into the config: checked here.

        The daemon holds the checked config and the API client, so the CLI need not load
        the config schema (pydantic) or httpx, nor ask the API what the daemon then asks
        again. It answers only for the file it has loaded and accepted; otherwise
        ("fallback") the CLI checks everything itself, config errors included.
        """
        if (
            not isinstance(name, str)
            or self.resolver is None
            or self.config_error is not None
            or self.ephemeral is not None
            or _fingerprint(self.config_path, self.env) != self._fingerprint
        ):
            return {"ok": False, "fallback": True}
        try:
            # Fresh from the API: a user switching branches wants them as they are now,
            # and the reload that follows finds this answer instead of asking again.
            resolution = await self.resolver.resolve(name, fresh=True)
        except TargetError as exc:
            return {"ok": False, "error": str(exc), "usage": True}
        except (UnknownBranch, NeonApiError, ApiKeyError) as exc:
            return {"ok": False, "error": str(exc)}
        self._note_resolution(resolution)
        notes = []
        if resolution.compute_suspended:
            notes.append("its compute is suspended; the first connection wakes it")
        return {
            "ok": True,
            "upstream": resolution.target.describe(),
            "notes": notes,
            "protection": resolution.target.protection.value,
        }

    def _status_line(self) -> str:
        if self.server is None or self.server.selected is None:
            return "no branch selected"
        name, target = self.server.selected
        return f"serving {name} ({target.describe()})"

    # --- signals -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, drain, stop. SIGHUP reloads."""
        try:
            await self.start()
        except BaseException:
            # Whatever stopped the start, a branch made for this daemon must not outlive it.
            await self._delete_ephemeral(EPHEMERAL_DELETE_MIN_S)
            if self.resolver is not None:
                await self.resolver.aclose()
            raise
        with self._signals_handled():
            watchdog = self.notifier.watchdog_interval()
            if watchdog:
                self._spawn(self._watchdog(watchdog))
            try:
                await self._stop.wait()
            finally:
                # Still ours while draining: a second Ctrl-C must reach on_stop.
                await self.stop()

    @contextlib.contextmanager
    def _signals_handled(self) -> Iterator[None]:
        """SIGTERM and SIGINT stop (a second SIGINT exits at once), SIGHUP reloads."""
        loop = asyncio.get_running_loop()
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
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_stop, sig.name)
                installed.append(sig)
            loop.add_signal_handler(
                signal.SIGHUP, lambda: self._spawn(self.reload("SIGHUP", force=True))
            )
            installed.append(signal.SIGHUP)
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
                handler = previous[sig]
                if handler is not None:
                    signal.signal(sig, handler)

    async def _watchdog(self, interval: float) -> None:
        while not self._stop.is_set():
            self.notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)


_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _name(selected: tuple[str, Target] | None) -> str | None:
    return selected[0] if selected else None


def _restart_needed(running: Settings, wanted: Settings) -> list[str]:
    """What the file now says that only a restart applies: ``[listen] port 6543 -> 6544``."""
    pairs = (
        ("[listen] host", running.listen.host, wanted.listen.host),
        ("[listen] port", running.listen.port, wanted.listen.port),
        ("[listen] unix_socket_dir", running.listen.unix_socket_dir, wanted.listen.unix_socket_dir),
        ("[admin] listen", running.admin.listen, wanted.admin.listen),
        ("[git] follow", running.git.follow, wanted.git.follow),
        ("[git] repo", running.git.repo, wanted.git.repo),
        ("[control] socket", running.control.socket, wanted.control.socket),
    )
    return [f"{key} {_shown(old)} -> {_shown(new)}" for key, old, new in pairs if old != new]


def _shown(value: object) -> str:
    if isinstance(value, tuple | list):
        return ", ".join(str(v) for v in value) or "(none)"
    return (
        "(none)" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _timestamp(when: float | None) -> str | None:
    """A wall-clock time for `status`, local and to the second (ISO 8601)."""
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when).astimezone().isoformat(timespec="seconds")
