"""The listeners and the set of live sessions.

The server owns every listening socket and every session task. It knows the currently
selected target (set by the daemon on start and on each reload) and counts sessions per
branch for ``status``. To its sessions it is a ``SessionContext`` (proxy/context.py), and
they are ``LiveSession``s to it: neither reads the other's insides.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from neonlocal.config.values import SessionsOnSwitch, Settings
from neonlocal.errors import UserError
from neonlocal.metrics import ErrorKind, LiveState, Metrics
from neonlocal.pgwire import sqlstate
from neonlocal.pgwire.codec import CancelRequest
from neonlocal.pgwire.scram import ScramSecret
from neonlocal.proxy.addresses import AddressBook
from neonlocal.proxy.cancel import CancelKey, CancelRegistry, CancelRoute
from neonlocal.proxy.context import (
    CANCEL_WAIT_S,
    FAILURE_MEMORY_S,
    MAX_CONCURRENT_LOGINS,
    STARTUP_TIMEOUT_S,
    TERMINATE_GRACE_S,
    LiveSession,
    SaslOffers,
    SessionRefused,
    SessionReport,
)
from neonlocal.proxy.endpoint import Endpoint
from neonlocal.proxy.listener import TcpListener, bind_tcp
from neonlocal.proxy.pool import SessionPool
from neonlocal.proxy.session import Session
from neonlocal.proxy.unix import listen_unix
from neonlocal.proxy.upstream import UpstreamError, send_cancel
from neonlocal.targets import Target
from neonlocal.tls.local import LocalTls

if TYPE_CHECKING:
    from neonlocal.serverless.gateway import Gateway

log = structlog.get_logger("neonlocal.server")

# (branch, target whose password was refused) -> a target with fresh credentials, or None.
CredentialRefresher = Callable[[str, Target], Awaitable[Target | None]]


class ListenError(UserError):
    """A listening address could not be bound."""


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cancels = CancelRegistry()
        self.sessions: set[LiveSession] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        # TCP listeners accept themselves, to see PostgreSQL 17 direct TLS (listener.py).
        self._tcp: list[TcpListener] = []
        self._selected: tuple[str, Target] | None = None
        self._selection_error: str | None = None
        self.local_secret: ScramSecret | None = None
        self.listening: list[str] = []
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._last_error_branch: str | None = None
        self.sessions_total = 0
        self.accepting = False
        self.credential_refresher: CredentialRefresher | None = None
        self.local_tls: LocalTls | None = None
        self.pool: SessionPool | None = None
        self._configure_pool()
        self._unix_path: Path | None = None
        self._scram_cache: dict[str, ScramSecret] = {}
        self.sasl_offers: SaslOffers = {}
        self._login_slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._failures: dict[tuple[str, str, int], tuple[float, SessionRefused]] = {}
        # Sessions whose login waits for a compute to wake, for `status`.
        self.waking: set[int] = set()
        self._warned: set[tuple[str, ...]] = set()
        self.addresses = AddressBook()
        self.metrics = Metrics(self._live_state)
        self._set_local_password()
        # The serverless driver's side, made when the first HTTP request arrives.
        self._serverless: Gateway | None = None

    # --- configuration ---------------------------------------------------------------------------

    def _set_local_password(self) -> None:
        password = self.settings.local.password
        self.local_secret = (
            ScramSecret.from_password(password.get_secret_value()) if password else None
        )

    def scram_secret_for(self, password: str) -> ScramSecret:
        """SCRAM keys for a branch password, derived once (PBKDF2 is slow by design)."""
        secret = self._scram_cache.get(password)
        if secret is None:
            if len(self._scram_cache) > 64:
                self._scram_cache.clear()
            secret = self._scram_cache[password] = ScramSecret.from_password(password)
        return secret

    def _configure_pool(self) -> None:
        upstream = self.settings.upstream
        if upstream.reuse_sessions and self.pool is None:
            self.pool = SessionPool(upstream.reuse_idle_timeout)
        elif not upstream.reuse_sessions and self.pool is not None:
            self.pool.clear()
            self.pool = None
        elif self.pool is not None:
            self.pool.idle_timeout = upstream.reuse_idle_timeout

    def update_settings(self, settings: Settings) -> None:
        old = self.settings.local.password
        self.settings = settings
        new = settings.local.password
        if (old and old.get_secret_value()) != (new and new.get_secret_value()):
            self._set_local_password()
        self._configure_pool()

    def select(self, branch: str, target: Target) -> None:
        if self.pool is not None and self._selected != (branch, target):
            # A new selection or new credentials: sessions kept for reuse go.
            self.pool.clear(keep_branch=branch, keep_target=target)
        self._selected = (branch, target)
        self._selection_error = None

    def unselect(self, reason: str) -> None:
        """No usable target: new sessions are refused with ``reason``."""
        self._selected = None
        self._selection_error = reason

    @property
    def selected(self) -> tuple[str, Target] | None:
        return self._selected

    async def refresh_credentials(self, branch: str, stale: Target) -> Target | None:
        """A target with fresh credentials after the server refused ``stale``'s, or None.

        Static targets from the config file cannot be refreshed; the daemon installs a
        refresher when branches are resolved through the Neon API.
        """
        if self.credential_refresher is None:
            return None
        fresh = await self.credential_refresher(branch, stale)
        if fresh is not None and self._selected is not None and self._selected[0] == branch:
            self._selected = (branch, fresh)
        return fresh

    def current_target(self) -> tuple[str, Target]:
        if self._selected is None:
            raise SessionRefused(
                self._selection_error or "neonlocal: no branch is selected",
                sqlstate.UNABLE_TO_CONNECT,
                ErrorKind.NO_BRANCH,
                hint="Select one with `neonlocal use NAME`; `neonlocal status` shows the state.",
            )
        return self._selected

    # --- listening -----------------------------------------------------------------------------

    async def start(self, sockets: Sequence[socket.socket] = ()) -> None:
        """Listen on ``sockets`` (handed over by a service manager), else on ``[listen]``."""
        if sockets:
            await self._listen_inherited(sockets)
        else:
            await self._listen_configured()
        self.accepting = True

    async def _listen_inherited(self, sockets: Sequence[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self._listen_tcp(sock)
            else:
                self._servers.append(await loop.create_server(self._protocol, sock=sock))
            name = sock.getsockname()
            self.listening.append(
                format_address(name[0], name[1]) if isinstance(name, tuple) else str(name)
            )

    async def _listen_configured(self) -> None:
        listen = self.settings.listen
        port = listen.port
        for host in listen.host:
            try:
                bound_sockets = bind_tcp(host, port)
            except OSError as exc:
                if host == "::1" and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    log.info("listen_skipped", address=format_address(host, port), reason=str(exc))
                    continue
                await self.close_listeners()
                raise ListenError(_listen_problem(host, port, exc)) from None
            for sock in bound_sockets:
                self._listen_tcp(sock)
            bound = bound_sockets[0].getsockname()
            if port == 0:
                port = bound[1]  # tests ask for any free port; keep the same one on every host
            self.listening.append(format_address(host, bound[1]))
        if not self._tcp:
            raise ListenError("neonlocal: no address to listen on; check [listen] host")
        await self._start_unix_listener(port)

    async def _start_unix_listener(self, port: int) -> None:
        unix = await listen_unix(self._protocol, self.settings.listen.unix_socket_dir, port)
        if unix is not None:
            srv, self._unix_path = unix
            self._servers.append(srv)
            self.listening.append(str(self._unix_path))

    def _listen_tcp(self, sock: socket.socket) -> None:
        listener = TcpListener(
            sock,
            self._protocol,
            tls_context=self._direct_tls_context,
            on_refused=self._connection_refused,
            startup_timeout=STARTUP_TIMEOUT_S,
            http_factory=self._http_protocol,
        )
        listener.start()
        self._tcp.append(listener)

    def _direct_tls_context(self) -> ssl.SSLContext | None:
        return None if self.local_tls is None else self.local_tls.context

    def _connection_refused(self, reason: str, kind: ErrorKind) -> None:
        """A connection that ended before it became a session (TLS failed, never spoke)."""
        self.metrics.error(kind)
        log.info("connection_refused", reason=reason)

    @property
    def port(self) -> int:
        if self._tcp:
            return int(self._tcp[0].socket.getsockname()[1])
        return int(self._servers[0].sockets[0].getsockname()[1])

    @property
    def unix_socket(self) -> Path | None:
        return self._unix_path

    def _protocol(self, startup_deadline: float | None = None) -> Endpoint:
        """A client connection's protocol; the TCP listener says by when (loop time) the
        client must have sent its startup packet, the Unix socket's server makes it at accept."""
        if startup_deadline is None:
            startup_deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
        endpoint = Endpoint()
        endpoint.on_connect = lambda made: self._accept(made, startup_deadline)
        return endpoint

    def _http_protocol(self) -> asyncio.Protocol:
        if self._serverless is None:
            # Imported here: a daemon no HTTP client talks to does not carry it (README).
            from neonlocal.serverless.gateway import Gateway

            self._serverless = Gateway(self)
        from neonlocal.serverless.http import HttpConnection

        return HttpConnection(self._serverless)

    def _accept(self, endpoint: Endpoint, startup_deadline: float) -> None:
        self.start_session(Session(self, endpoint, startup_deadline=startup_deadline))

    def start_session(self, session: Session) -> None:
        """Run ``session`` as one of ours (tracked, drained on shutdown)."""
        task = asyncio.get_running_loop().create_task(session.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_listeners(self) -> None:
        self.accepting = False
        for listener in self._tcp:
            listener.close()
        for srv in self._servers:
            srv.close()
        for listener in self._tcp:
            await listener.wait_closed()
        for srv in self._servers:
            await srv.wait_closed()
        self._tcp.clear()
        self._servers.clear()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()
            self._unix_path = None

    # --- sessions ------------------------------------------------------------------------------

    def admit(self, session: LiveSession) -> None:
        limit = self.settings.listen.max_sessions
        if len(self.sessions) >= limit:
            raise SessionRefused(
                f"sorry, too many clients already: neonlocal serves at most {limit} sessions "
                "([listen] max_sessions)",
                sqlstate.TOO_MANY_CONNECTIONS,
                ErrorKind.TOO_MANY,
            )
        self.sessions.add(session)

    def release(self, session: LiveSession) -> None:
        self.sessions.discard(session)

    def report(self, session_id: int) -> SessionReport:
        return SessionReport(
            session_id,
            self.metrics,
            record_error=self.record_error,
            served=self._branch_served,
            count_session=self._count_session,
            waking=self.waking,
            warned=self._warned,
        )

    def remembered_failure(self, target: Target) -> SessionRefused | None:
        key = (target.host, target.connect_host, target.port)
        remembered = self._failures.get(key)
        if remembered is None:
            return None
        until, refusal = remembered
        if time.monotonic() >= until:
            del self._failures[key]
            return None
        return SessionRefused(refusal.message, refusal.sqlstate, refusal.kind, hint=refusal.hint)

    def remember_failure(self, target: Target, refusal: SessionRefused) -> None:
        key = (target.host, target.connect_host, target.port)
        self._failures[key] = (time.monotonic() + FAILURE_MEMORY_S, refusal)

    def login_slots(self, target: Target) -> asyncio.Semaphore:
        key = (target.connect_host, target.port)
        slots = self._login_slots.get(key)
        if slots is None:
            slots = self._login_slots[key] = asyncio.Semaphore(MAX_CONCURRENT_LOGINS)
        return slots

    def _count_session(self) -> None:
        self.sessions_total += 1

    def sessions_by_branch(self) -> dict[str, int]:
        return dict(Counter(s.branch for s in self.sessions if s.branch is not None))

    def _live_state(self) -> LiveState:
        selected = self._selected
        return LiveState(
            sessions_open=dict.fromkeys(self.settings.branches, 0) | self.sessions_by_branch(),
            branch=selected[0] if selected else None,
            upstream=selected[1].describe() if selected else None,
        )

    def terminate_sessions(
        self,
        *,
        keep_branch: str | None,
        message: str,
        reason: str,
        grace: float = TERMINATE_GRACE_S,
    ) -> int:
        """End every session not on ``keep_branch`` with 57P01; returns how many."""
        count = 0
        for session in list(self.sessions):
            if keep_branch is not None and session.branch == keep_branch:
                continue
            session.terminate(message, reason, grace=grace)
            count += 1
        return count

    def move_sessions(
        self, mode: SessionsOnSwitch, *, keep_branch: str, message: str, reason: str
    ) -> dict[str, int]:
        """Apply a switch's ``mode`` to sessions not on ``keep_branch``; how many, by branch.

        "drain" ends each with 57P01 once it is idle outside a transaction, "terminate" now
        (after a grace for a query in flight), "keep" leaves them where they are.
        """
        others = [s for s in self.sessions if s.branch is not None and s.branch != keep_branch]
        for session in others:
            if mode == "drain":
                session.end_when_idle(message, reason)
            elif mode == "terminate":
                session.terminate(message, reason)
        return dict(Counter(s.branch for s in others if s.branch is not None))

    def record_error(self, message: str, branch: str | None = None) -> None:
        """Remember the last failure for `status` (the client-facing text, unprefixed)."""
        self.last_error = message.removeprefix("neonlocal: ")
        self.last_error_at = time.time()
        self._last_error_branch = branch

    def _branch_served(self, branch: str) -> None:
        # A failure is news until its branch serves a session again.
        if self.last_error is not None and self._last_error_branch == branch:
            self.last_error = self.last_error_at = self._last_error_branch = None

    async def forward_cancel(self, request: CancelRequest) -> None:
        route = self.cancels.lookup(request.process_id, request.secret)
        if route is None:
            log.info("cancel_dropped", reason="unknown key or idle session")
            return
        await self._send_cancel(route)

    def cancel_query(self, cancel_key: CancelKey) -> None:
        """Cancel what the session holding ``cancel_key`` runs upstream (we are ending it)."""
        route = self.cancels.route_of(cancel_key)
        if route is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_cancel(route))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_cancel(self, route: CancelRoute) -> None:
        try:
            await send_cancel(
                route.target,
                route.process_id,
                route.secret,
                timeout=self.settings.upstream.connect_timeout,
                addresses=self.addresses,
            )
        except UpstreamError as exc:
            self.metrics.error(ErrorKind.CANCEL_FAILED)
            log.warning("cancel_failed", upstream=route.target.describe(), cause=exc.message)
            return
        log.info("cancel_forwarded", upstream=route.target.describe())

    async def drain(self, deadline: float, message: str) -> None:
        """Wait up to ``deadline`` seconds for sessions to end, then end the rest."""
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=deadline)
            if pending:
                self.terminate_sessions(
                    keep_branch=None, message=message, reason="shutdown", grace=0.0
                )
                # Ending a busy session sends its query a cancel: a task of its own, which
                # must be done (or given up) before the daemon says it has stopped.
                _done, pending = await asyncio.wait(set(self._tasks), timeout=CANCEL_WAIT_S + 1.0)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=1.0)

    async def close(self, deadline: float = 0.0) -> None:
        await self.close_listeners()
        if self._serverless is not None:
            self._serverless.close()
        if self.pool is not None:
            await self.pool.close()
        await self.drain(deadline, "neonlocal is shutting down")


def _listen_problem(host: str, port: int, exc: OSError) -> str:
    address = format_address(host, port)
    if exc.errno == errno.EADDRINUSE:
        return (
            f"neonlocal: cannot listen on {address}: address already in use "
            "(a local PostgreSQL?); choose another port with [listen] port in the config"
        )
    if exc.errno == errno.EACCES:
        return f"neonlocal: cannot listen on {address}: permission denied"
    return f"neonlocal: cannot listen on {address}: {exc.strerror or exc}"
