"""One client session: negotiate, admit, plan, authenticate locally, log in upstream, relay.

The session chooses its branch once, when the StartupMessage arrives, and keeps it until it
closes: switching the selection never moves an open session. It sees the server only through
``SessionContext`` (proxy/context.py). After the first ReadyForQuery it is a relay
(proxy/relay.py) and does no work per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import NoReturn

from neonlocal.errors import Refusal
from neonlocal.metrics import ErrorKind
from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.codec import (
    CancelRequest,
    GSSENCRequest,
    Request,
    SSLRequest,
    StartupMessage,
)
from neonlocal.pgwire.errors import OldProtocolError, ProtocolError, UnansweredProtocolError
from neonlocal.pgwire.frontend import LocalPasswordAuth, StartupPhase, negotiate
from neonlocal.pgwire.login import (
    Output,
    SpeculationFailed,
    UpstreamLogin,
    UpstreamRejected,
    upstream_login,
)
from neonlocal.pgwire.scram import ScramSecret
from neonlocal.proxy.cancel import CancelKey, CancelRoute
from neonlocal.proxy.context import (
    CANCEL_WAIT_S,
    SLOW_CONNECT_S,
    STARTUP_TIMEOUT_S,
    TERMINATE_GRACE_S,
    WAKE_NOTICE_S,
    SessionContext,
    SessionRefused,
)
from neonlocal.proxy.drive import LocalAuth, drive
from neonlocal.proxy.endpoint import Endpoint, PeerClosed
from neonlocal.proxy.peer import peer_user_name
from neonlocal.proxy.plan import Plan, plan_login
from neonlocal.proxy.pool import Parked, PoolKey
from neonlocal.proxy.refused import (
    Refused,
    edge_meaning,
    is_stale_password,
    login_hint,
    password_hint,
    retry_pause,
)
from neonlocal.proxy.relay import Relay
from neonlocal.proxy.upstream import Upstream, UpstreamError, open_upstream
from neonlocal.targets import Target
from neonlocal.tls.local import LOCAL_ALPN
from neonlocal.workflows.protect import read_only_status

# The parameter that tells a client which branch it is on.
BRANCH_PARAMETER = "neonlocal.branch"

# A failure that took this long (a timeout, not a refusal) is remembered for a moment.
SLOW_FAILURE_S = SLOW_CONNECT_S

_ids = itertools.count(1)

# PostgreSQL's DETAIL for plaintext sent ahead of the encryption it asked for.
_INJECTION = (
    "This could be either a client-software bug or evidence of an attempted "
    "man-in-the-middle attack."
)


class _EndWithoutReply(Exception):
    """End the session with a bare close, as PostgreSQL does where the client cannot be
    told (or is not told) why; ``kind`` counts it."""

    def __init__(self, reason: str, kind: ErrorKind) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class Session:
    def __init__(
        self, context: SessionContext, client: Endpoint, *, startup_deadline: float | None = None
    ) -> None:
        self.id = next(_ids)
        self._context = context
        self._report = context.report(self.id)
        self.client = client
        self.branch: str | None = None
        self.target: Target | None = None
        self.relay: Relay | None = None
        self.upstream: Upstream | None = None
        self.cancel_key: CancelKey | None = None
        self.started = time.monotonic()
        self.close_reason = "client closed"
        self.user: str | None = None
        self.auth: str | None = None
        self.client_tls = False
        # How the client's TLS began: "direct" (PostgreSQL 17) or "ssl_request".
        self.client_tls_negotiation: str | None = None
        self._admitted = False
        self._holds_password = False
        self._os_user: str | None = None
        self._pool_key: PoolKey | None = None
        self._status_messages = b""
        # When (loop time) the client must have sent its startup packet: STARTUP_TIMEOUT_S
        # counted from accept, as PostgreSQL counts it; the listener knows when that was.
        if startup_deadline is None:
            startup_deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
        self._startup_deadline = startup_deadline

    @property
    def busy(self) -> bool:
        return self.relay is not None and not self.relay.idle

    # --- the story -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except UnansweredProtocolError as exc:
            self._end_without_reply(f"protocol error: {exc.message}", ErrorKind.PROTOCOL)
        except _EndWithoutReply as exc:
            self._end_without_reply(exc.reason, exc.kind)
        except OldProtocolError as exc:
            self.close_reason = f"protocol error: {exc.message}"
            self._report.error(ErrorKind.PROTOCOL)
            self._end_with(codec.old_style_error(exc.message))
        except ProtocolError as exc:
            self._refuse(exc, f"protocol error: {exc.message}", ErrorKind.PROTOCOL)
        except SessionRefused as exc:
            self._refuse(exc, exc.message, exc.kind)
        except UpstreamRejected as exc:
            self._pass_on_rejection(exc)
        except PeerClosed as exc:
            self.close_reason = str(exc) or "client closed during startup"
        finally:
            self._cleanup()

    async def _run(self) -> None:
        waited = "timeout while waiting for the startup packet"
        async with _client_bound(self._startup_deadline, waited):
            startup = await self._negotiate()
        if startup is None:
            return  # a CancelRequest, now forwarded
        self._context.admit(self)
        self._admitted = True
        params = self._accept_startup(startup)
        plan = self._plan(params)
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
        async with _client_bound(deadline, "the client did not finish its local login in time"):
            await self._authenticate_locally(plan)
        parked = self._take_parked(plan)
        if parked is not None:
            await self._resume(parked)
            return
        upstream, login = await self._log_in_upstream(plan, params)
        self._logged_in(upstream, login, plan)
        await self._relay(upstream.endpoint, login.server_key)

    # --- the client's first bytes --------------------------------------------------------------

    async def _negotiate(self) -> StartupMessage | None:
        ssl_object = self.client.extra("ssl_object")  # noqa: S610 - a transport's, not Django's
        if ssl_object is not None:
            self._accept_direct_tls(ssl_object)
        phase = StartupPhase()
        try:
            await drive(
                phase, self.client.recv, lambda event: self._answer_encryption_request(event, phase)
            )
        except PeerClosed:
            if phase.buffered:
                # PostgreSQL logs this one (a COMMERROR) and, like us, says nothing.
                self._report.event("startup_incomplete", received=phase.buffered)
            raise
        request = phase.result
        if isinstance(request, CancelRequest):
            self.close_reason = "cancel request"
            await self._context.forward_cancel(request)
            self.client.close()
            return None
        assert request is not None
        return self._checked_startup(request, phase)

    async def _answer_encryption_request(
        self, request: Request | None, phase: StartupPhase
    ) -> None:
        """Answer an SSLRequest or GSSENCRequest; the phase's last request ends the drive.

        PostgreSQL declines an SSLRequest on its Unix socket, and PostgreSQL 17 one over direct
        TLS (the connection is encrypted already); so do we."""
        if not isinstance(request, SSLRequest | GSSENCRequest):
            return
        local_tls = self._context.local_tls
        declined = isinstance(request, GSSENCRequest) or self.client_tls or self._on_unix_socket()
        if declined or local_tls is None:
            self.client.write(codec.ENCRYPTION_REFUSED)
        else:
            self.client.write(codec.ENCRYPTION_ACCEPTED)
            await self._start_client_tls(local_tls.context)
            phase.encryption_began()
        if phase.buffered:
            # CVE-2021-23214: what followed the request unencrypted may be a MITM's injection,
            # so it is never read. PostgreSQL says so after its answer (and the handshake).
            what = "SSL request" if isinstance(request, SSLRequest) else "GSSAPI encryption request"
            raise ProtocolError(f"received unencrypted data after {what}", detail=_INJECTION)

    def _checked_startup(self, startup: StartupMessage, phase: StartupPhase) -> StartupMessage:
        # A client may send its first messages right behind the StartupMessage (a password
        # ahead of the request, a query): PostgreSQL reads them in turn, and so do we.
        self.client.unread(phase.take_rest())
        if (
            self._context.settings.local.require_tls
            and not self.client_tls
            and not self._on_unix_socket()
        ):
            raise SessionRefused(
                "neonlocal requires TLS from clients ([local] require_tls): "
                "connect with sslmode=require",
                sqlstate.INVALID_AUTHORIZATION,
            )
        return startup

    def _on_unix_socket(self) -> bool:
        """libpq never uses TLS on a Unix socket, and ours is for its owner alone; like
        PostgreSQL's hostssl lines, require_tls concerns TCP clients."""
        return self._unix_socket() is not None

    def _unix_socket(self) -> socket.socket | None:
        sock = self.client.extra("socket")  # noqa: S610 - a transport's, not Django's
        return sock if sock is not None and sock.family == socket.AF_UNIX else None

    async def _start_client_tls(self, context: ssl.SSLContext) -> None:
        transport = self.client.transport
        assert transport is not None
        try:
            tls_transport = await asyncio.get_running_loop().start_tls(
                transport, self.client, context, server_side=True
            )
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            # No ErrorResponse is possible: the peer does not speak TLS with us.
            transport.abort()
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            self._refuse_tls(f"local TLS handshake failed: {reason}")
        if tls_transport is None:
            transport.abort()
            self._refuse_tls("local TLS handshake failed")
        self.client.set_transport(tls_transport)
        self.client_tls = True
        self.client_tls_negotiation = "ssl_request"

    def _accept_direct_tls(self, ssl_object: ssl.SSLObject) -> None:
        """The listener already did the TLS handshake (PostgreSQL 17 ``sslnegotiation=direct``).

        As in PostgreSQL, such a client must have agreed on ALPN "postgresql": it keeps a
        client of another protocol, steered here, from being taken for a PostgreSQL client.
        """
        if ssl_object.selected_alpn_protocol() != LOCAL_ALPN:
            self.client.abort()
            self._refuse_tls(f'direct TLS without ALPN "{LOCAL_ALPN}"')
        self.client_tls = True
        self.client_tls_negotiation = "direct"

    def _refuse_tls(self, reason: str) -> NoReturn:
        """End a client whose TLS failed; no ErrorResponse is possible, so log why."""
        self._report.error(ErrorKind.PROTOCOL)
        self._report.event("local_tls_failed", reason=reason)
        raise PeerClosed(reason)

    def _accept_startup(self, startup: StartupMessage) -> dict[str, str]:
        params, negotiated = negotiate(startup)
        if negotiated is not None:
            self.client.write(negotiated.encode())
        return params

    # --- where to, and who may ---------------------------------------------------------------

    def _plan(self, params: Mapping[str, str]) -> Plan:
        branch, target = self._context.current_target()
        self.branch, self.target = branch, target
        self._report.bind(branch=branch, upstream=target.describe())
        self._report.opened(branch)
        self._os_user = peer_user_name(self._unix_socket())
        plan = plan_login(target, params, os_user=self._os_user)
        self.user = plan.user
        self._holds_password = plan.credentials is not None
        self._report.bind(user=plan.user, database=plan.database)
        if plan.ignored_by_pooler:
            self._report.warn_once(
                ("pooler_parameters", branch, *plan.ignored_by_pooler),
                "pooler_ignores_parameters",
                parameters=list(plan.ignored_by_pooler),
                detail="a -pooler host (PgBouncer) does not apply startup settings; use the "
                "unpooled host, or SET them in the session",
            )
        return plan

    def _local_secret(self, plan: Plan) -> ScramSecret | None:
        """What a local client must prove, if anything, before we log in upstream for it."""
        if plan.credentials is None:
            return None  # the client's own login is relayed; the server checks it
        if self._context.local_secret is not None:
            return self._context.local_secret
        if self.client_tls and self._context.settings.local.tls_auth == "password":
            return self._context.scram_secret_for(plan.credentials.password)
        return None

    def _local_auth(self, plan: Plan) -> LocalAuth | None:
        """How the client proves itself to us, if it must: SCRAM against ``_local_secret``."""
        secret = self._local_secret(plan)
        if secret is None:
            return None
        local_tls = self._context.local_tls
        return LocalPasswordAuth(
            secret,
            certificate_der=local_tls.certificate_der if self.client_tls and local_tls else None,
        )

    async def _authenticate_locally(self, plan: Plan) -> None:
        auth = self._local_auth(plan)
        if auth is None:
            return
        self.client.write(auth.start())
        try:
            await drive(auth, self.client.recv, self.client.write)
        except ProtocolError as exc:
            if exc.sqlstate == sqlstate.INVALID_PASSWORD:
                raise SessionRefused(
                    f'password authentication failed for user "{self.user}"',
                    sqlstate.INVALID_PASSWORD,
                    ErrorKind.AUTH,
                ) from None
            raise
        self.client.unread(auth.take_rest())

    def _issue_cancel_key(self, target: Target, server_key: CancelKey | None) -> CancelKey:
        """The client's key: the server's process id (what ``pg_backend_pid()`` says) and a
        secret of ours, so that its cancels come to us (proxy/cancel.py)."""
        route = None if server_key is None else CancelRoute(target, *server_key)
        self.cancel_key = self._context.cancels.issue(self, route)
        return self.cancel_key

    def _branch_status(self) -> dict[str, str]:
        return {BRANCH_PARAMETER: self.branch or "", **read_only_status(self.target)}

    # --- an upstream session -------------------------------------------------------------------

    def _take_parked(self, plan: Plan) -> Parked | None:
        pool = self._context.pool
        if pool is None or plan.credentials is None:
            return None
        self._pool_key = PoolKey.of(self.branch or "", plan.target, plan.parameters)
        return pool.take(self._pool_key)

    async def _resume(self, parked: Parked) -> None:
        """Serve the client on a reused upstream session: no handshake upstream at all."""
        self.upstream = Upstream(parked.endpoint, None, parked.tls_version, parked.address)
        client_key = self._issue_cancel_key(parked.target, parked.server_key)
        self.client.write(
            codec.login_tail(parked.status_messages, self._branch_status(), client_key)
        )
        self._status_messages = parked.status_messages
        self.auth = "reused"
        self._report.ready()
        self._report.event(
            "session_ready",
            auth="reused",
            tls=parked.tls_version,
            ready_s=round(time.monotonic() - self.started, 3),
        )
        await self._relay(parked.endpoint, parked.server_key)

    async def _log_in_upstream(
        self, plan: Plan, params: Mapping[str, str]
    ) -> tuple[Upstream, UpstreamLogin]:
        """Connect and log in, one login to a host at a time beyond its slots; a branch that
        failed slowly a moment ago gets the same answer at once."""
        remembered = self._context.remembered_failure(plan.target)
        if remembered is not None:
            raise remembered
        began = time.monotonic()
        try:
            async with self._context.login_slots(plan.target):
                return await self._log_in_with_retries(plan, params)
        except SessionRefused as exc:
            if time.monotonic() - began >= SLOW_FAILURE_S:
                self._context.remember_failure(plan.target, exc)
            raise

    async def _log_in_with_retries(
        self, plan: Plan, params: Mapping[str, str]
    ) -> tuple[Upstream, UpstreamLogin]:
        """A new connection at most once for a pipelined login the server did not expect,
        once with fresh credentials for a refused password, and, within the connect
        budget, again for what Neon's edge says is passing (a rate limit, a compute it
        could not reach, a password it has not yet learnt was changed) unless a relayed
        client has already been asked to authenticate."""
        may_pipeline = may_refresh = True
        retry_until = time.monotonic() + self._context.settings.upstream.connect_timeout
        retries = 0
        while True:
            upstream = await self._connect(plan.target)
            login = self._upstream_login(plan, upstream, pipeline=may_pipeline)
            try:
                await self._pump_login(upstream.endpoint, login)
            except SpeculationFailed as exc:
                upstream.endpoint.close()
                self._context.sasl_offers.pop(_offer_key(plan), None)
                self._report.event("auth_pipelining_refused", reason=str(exc))
                may_pipeline = False
            except UpstreamRejected as exc:
                upstream.endpoint.close()
                self.upstream = None
                if may_refresh and self._holds_password and is_stale_password(login, exc):
                    # A reset branch or a changed password: fetch the credentials again,
                    # once, before the client sees an error.
                    may_refresh = False
                    plan = plan_login(await self._fresh_target(exc), params, os_user=self._os_user)
                    continue
                pause = retry_pause(retries, login, exc, refreshed=not may_refresh)
                if pause is None or time.monotonic() + pause > retry_until:
                    raise
                retries += 1
                self._report.event("login_retry", reason=exc.error.message, pause_s=pause)
                await asyncio.sleep(pause)
            except BaseException:
                upstream.endpoint.close()
                raise
            else:
                return upstream, login

    async def _connect(self, target: Target) -> Upstream:
        settings = self._context.settings.upstream
        began = time.monotonic()
        try:
            upstream = await open_upstream(
                target,
                timeout=settings.connect_timeout,
                keepalive=settings.keepalive,
                addresses=self._context.addresses,
            )
        except UpstreamError as exc:
            kind = ErrorKind.TLS if exc.tls else ErrorKind.UPSTREAM_UNREACHABLE
            raise self._upstream_failure(
                f": {exc.message}", exc.sqlstate, kind, unreached=True
            ) from None
        self._report.connected(self.branch, time.monotonic() - began)
        self.upstream = upstream
        return upstream

    def _upstream_login(self, plan: Plan, upstream: Upstream, *, pipeline: bool) -> UpstreamLogin:
        expected = None
        pipelining = pipeline and self._context.settings.upstream.pipeline_auth
        if pipelining and plan.credentials is not None:
            expected = self._context.sasl_offers.get(_offer_key(plan))
        return upstream_login(
            plan.parameters,
            credentials=plan.credentials,
            certificate_der=upstream.certificate_der,
            extra_status=self._branch_status(),
            client_tls=self.client_tls,
            expected_sasl=expected,
        )

    async def _pump_login(self, up: Endpoint, login: UpstreamLogin) -> None:
        """Carry the login's bytes until its ReadyForQuery: between us and the server, and
        the client's own answers when it logs in for itself.

        A relayed login ends, as in PostgreSQL, if the client has not answered within
        STARTUP_TIMEOUT_S (authentication_timeout); the server is watched meanwhile, so its
        error or its close (its own authentication_timeout) ends the session at once."""
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
        up.write(login.start())
        while not login.done:
            if login.awaiting_client:
                out = await self._client_answer(up, login, deadline)
            else:
                out = login.receive_upstream(
                    await self._recv_during_login(up, waking=login.awaiting_compute)
                )
            up.write(out.to_upstream)
            self.client.write(out.to_client)

    async def _client_answer(self, up: Endpoint, login: UpstreamLogin, deadline: float) -> Output:
        """The client's answer to a relayed request, or what the server says meanwhile."""
        from_client = asyncio.ensure_future(self.client.recv())
        from_server = asyncio.ensure_future(up.recv())
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.wait((from_client, from_server), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise _EndWithoutReply(
                "the client did not finish its login in time", ErrorKind.STARTUP_TIMEOUT
            ) from None
        finally:
            from_client.cancel()
            from_server.cancel()
            # Settled before anyone reads either side again; a read already done keeps
            # its bytes.
            await asyncio.wait((from_client, from_server))
        server_data, server_closed = _outcome(from_server)
        client_data, client_closed = _outcome(from_client)
        if server_closed:
            # The server gave up on the client (its authentication_timeout): so do we, and
            # the client sees what it would see directly, a bare close.
            raise _EndWithoutReply(
                "server closed the connection during the relayed login", ErrorKind.UPSTREAM_CLOSED
            )
        out = login.receive_upstream(server_data) if server_data else Output()
        if client_closed:
            raise PeerClosed("client closed during login")
        if client_data:
            out.to_upstream += login.receive_client(client_data)
        return out

    async def _recv_during_login(self, up: Endpoint, *, waking: bool) -> bytes:
        """The server's next bytes. A server that went silent (a stuck compute, a half-open
        path) must not hold the client forever: each wait is bounded like the connect, and
        the wait after our last authentication message as long as a compute may take to
        wake (Neon's edge says nothing until it is up)."""
        settings = self._context.settings.upstream
        timeout = settings.wake_timeout if waking else settings.connect_timeout
        knob = "wake_timeout" if waking else "connect_timeout"
        notice = None
        if waking:
            notice = asyncio.get_running_loop().call_later(
                WAKE_NOTICE_S, lambda: self._report.waking(True, timeout_s=timeout)
            )
        try:
            async with asyncio.timeout(timeout):
                return await up.recv()
        except PeerClosed:
            raise self._upstream_failure(
                " closed the connection during login",
                sqlstate.CONNECTION_FAILURE,
                ErrorKind.UPSTREAM_CLOSED,
            ) from None
        except TimeoutError:
            raise self._upstream_failure(
                f" did not answer during login within {timeout:g} s ([upstream] {knob})",
                sqlstate.UNABLE_TO_CONNECT,
                ErrorKind.UPSTREAM_UNREACHABLE,
            ) from None
        finally:
            if notice is not None:
                notice.cancel()
                self._report.waking(False)

    async def _fresh_target(self, stale: UpstreamRejected) -> Target:
        assert self.target is not None
        fresh = await self._context.refresh_credentials(self.branch or "", self.target)
        if fresh is None:
            raise self._upstream_failure(
                f": {stale.error.message}",
                sqlstate.INVALID_PASSWORD,
                ErrorKind.AUTH,
                hint=password_hint(self.branch, self._context.settings),
            )
        self.target = fresh
        self._report.bind(upstream=fresh.describe())
        return fresh

    def _logged_in(self, upstream: Upstream, login: UpstreamLogin, plan: Plan) -> None:
        self.auth = login.auth_method
        if login.sasl_offer is not None and self._context.settings.upstream.pipeline_auth:
            self._context.sasl_offers[_offer_key(plan)] = login.sasl_offer
        client_key = self._issue_cancel_key(plan.target, login.server_key)
        # What the client sent past its login belongs to the relay, ahead of what comes next.
        self.client.unread(login.take_client_rest())
        self.client.write(login.client_tail(client_key))
        self._report.ready()
        self._report.event(
            "session_ready",
            auth=login.auth_method,
            channel_binding=login.channel_bound,
            pipelined=login.pipelined,
            tls=upstream.tls_version,
            tls_direct=upstream.direct_tls,
            client_tls=self.client_tls_negotiation,
            # From the client's connect to its ReadyForQuery: seconds here are a compute that
            # was waking (Neon starts it during the login), or a slow network.
            ready_s=round(time.monotonic() - self.started, 3),
        )
        self._status_messages = login.status_messages

    def _refused(self) -> Refused:
        return Refused(self.branch, self.target, self.user, ours=self._holds_password)

    def _upstream_message(self, problem: str, *, unreached: bool = False) -> str:
        """Every failure upstream names the branch and its host, then what went wrong."""
        assert self.target is not None
        where = f'branch "{self.branch}" ({self.target.describe()})'
        return f"neonlocal: {'cannot reach ' if unreached else ''}{where}{problem}"

    def _upstream_failure(
        self,
        problem: str,
        code: str,
        kind: ErrorKind,
        *,
        unreached: bool = False,
        hint: str | None = None,
    ) -> SessionRefused:
        """The refusal for a failure upstream, also kept as the last error for ``status``."""
        message = self._upstream_message(problem, unreached=unreached)
        self._report.failure(message)
        return SessionRefused(message, code, kind, hint=hint)

    # --- the relay -----------------------------------------------------------------------------

    async def _relay(self, up: Endpoint, server_key: tuple[int, bytes] | None) -> None:
        relay = Relay(self.client, up)
        self.relay = relay
        relay.release = self._parking(up, server_key)
        relay.start()
        await relay.done
        self.close_reason = relay.close_reason
        if relay.released:
            self.close_reason = "client closed; upstream session kept for reuse"
            self.upstream = None

    def _parking(
        self, up: Endpoint, server_key: tuple[int, bytes] | None
    ) -> Callable[[], None] | None:
        """How the relay hands this upstream session to the pool, if it may be reused."""
        pool, key, upstream, target = self._context.pool, self._pool_key, self.upstream, self.target
        if pool is None or key is None or upstream is None or target is None:
            return None
        status = self._status_messages

        def release() -> None:
            parked = Parked(up, target, status, server_key, upstream.tls_version, upstream.address)
            pool.park(key, parked)

        return release

    # --- ending --------------------------------------------------------------------------------

    def terminate(self, message: str, reason: str, *, grace: float = TERMINATE_GRACE_S) -> None:
        """End this session with FATAL 57P01, so application pools reconnect.

        A query in flight may finish for ``grace`` seconds; then it is cancelled upstream
        (so it stops using the compute) and the session ends at the next message boundary.
        """
        error = codec.error_response(message, sqlstate.ADMIN_SHUTDOWN)
        if self.relay is not None:
            relay = self.relay
            relay.terminate(error, reason)
            # A finished relay ran nothing: the client has its error, both sides are closing.
            if not relay.finished and grace <= 0:
                self._cancel_then_end(relay, error)
            elif not relay.finished:
                asyncio.get_running_loop().call_later(grace, self._cancel_then_end, relay, error)
        else:
            self._end_before_relay(error, reason)

    def end_when_idle(self, message: str, reason: str) -> None:
        """End this session with FATAL 57P01 once it is idle outside a transaction (at once
        if it is): a switch moves pooled apps this way without cutting any work off."""
        error = codec.error_response(message, sqlstate.ADMIN_SHUTDOWN)
        if self.relay is not None:
            self.relay.end_when_idle(error, reason)
        else:
            self._end_before_relay(error, reason)

    def _end_before_relay(self, error: bytes, reason: str) -> None:
        # Still logging in: nothing of the client's can be lost yet.
        self.close_reason = reason
        self.client.write(error)
        self.client.close()
        if self.upstream is not None:
            self.upstream.endpoint.close()

    def _cancel_then_end(self, relay: Relay, error: bytes) -> None:
        if relay.done.done() or relay.finished:
            return  # the query ended within the grace, and with it the session
        if self.cancel_key is not None:
            self._context.cancel_query(self.cancel_key)
        asyncio.get_running_loop().call_later(CANCEL_WAIT_S, relay.force_terminate, error)

    def _end_without_reply(self, reason: str, kind: ErrorKind) -> None:
        self.close_reason = reason
        self._report.error(kind)
        self._report.event("session_ended_without_reply", reason=reason)
        self.client.close()
        if self.upstream is not None:
            self.upstream.endpoint.close()

    def _refuse(self, refusal: Refusal, reason: str, kind: ErrorKind) -> None:
        self.close_reason = reason
        self._report.error(kind)
        self._end_with(
            codec.error_response(
                refusal.message, refusal.sqlstate, detail=refusal.detail, hint=refusal.hint
            )
        )

    def _pass_on_rejection(self, rejected: UpstreamRejected) -> None:
        """The server's own ErrorResponse, all its fields kept, with our message in front."""
        error = rejected.error
        message = self._upstream_message(f": {error.message}")
        fields = dict(error.fields)
        fields["S"] = fields["V"] = "FATAL"
        fields["M"] = message
        meaning = edge_meaning(rejected)
        if meaning is not None:
            # Neon's edge sends every login error as XX000; a driver decides by the code
            # PostgreSQL itself would have sent.
            fields["C"] = meaning.sqlstate
        code = fields.get("C", error.sqlstate)
        hint = login_hint(self._refused(), code, meaning, self._context.settings)
        if hint is not None:
            fields["H"] = hint
        self.close_reason = f"upstream refused: {code}"
        during_auth = rejected.during_auth or code.startswith("28")
        self._report.error(ErrorKind.AUTH if during_auth else ErrorKind.UPSTREAM_REJECTED)
        self._report.failure(message)
        self._end_with(codec.error_from_fields(fields))

    def _end_with(self, error: bytes) -> None:
        self.client.write(error)
        self.client.close()
        if self.upstream is not None:
            self.upstream.endpoint.close()

    def _cleanup(self) -> None:
        if self.cancel_key is not None:
            self._context.cancels.release(self.cancel_key)
        if not self.client.lost:
            self.client.close()
        if self.upstream is not None and not self.upstream.endpoint.lost:
            self.upstream.endpoint.close()
        if self._admitted:
            self._context.release(self)
            self._report_closed()

    def _report_closed(self) -> None:
        if self.branch is None:
            return
        upstream = self.upstream
        # Read once at the end: the relay's hot path stays free of metrics work.
        traffic: dict[str, int] = {}
        if self.relay is not None:
            traffic = {
                "bytes_from_client": self.client.bytes_in,
                "bytes_from_server": self.relay.upstream.bytes_in,
            }
        self._report.closed(
            self.branch,
            to_upstream=self.client.bytes_in if upstream is not None else 0,
            to_client=upstream.endpoint.bytes_in if upstream is not None else 0,
            duration_s=round(time.monotonic() - self.started, 3),
            reason=self.close_reason,
            **traffic,
        )


@contextlib.asynccontextmanager
async def _client_bound(deadline: float, reason: str) -> AsyncIterator[None]:
    """PostgreSQL's authentication_timeout on what the client must send: past ``deadline`` it
    is dropped without a word, as PostgreSQL drops it (StartupPacketTimeoutHandler exits; a
    timed-out authentication goes to the server's log only)."""
    try:
        async with asyncio.timeout_at(deadline):
            yield
    except TimeoutError:
        raise _EndWithoutReply(reason, ErrorKind.STARTUP_TIMEOUT) from None


def _outcome(read: asyncio.Future[bytes]) -> tuple[bytes, bool]:
    """What a finished or cancelled ``recv`` got: its bytes, and whether the peer closed."""
    if not read.done() or read.cancelled():
        return b"", False
    if isinstance(read.exception(), PeerClosed):
        return b"", True
    return read.result(), False


def _offer_key(plan: Plan) -> tuple[str, int, str, str]:
    return (plan.target.host, plan.target.port, plan.user, plan.database)
