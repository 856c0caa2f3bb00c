"""One client session: negotiate, authenticate both sides, then relay.

The session chooses its branch once, when the StartupMessage arrives, and keeps it until it
closes: switching the selection never moves an open session.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from neonlocal.metrics import ErrorKind
from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.codec import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.pgwire.frontend import LocalPasswordAuth, StartupPhase, negotiate
from neonlocal.pgwire.login import (
    Credentials,
    LoginState,
    SpeculationFailed,
    UpstreamLogin,
    UpstreamRejected,
)
from neonlocal.pgwire.scram import ChannelBindingPolicy, ScramSecret
from neonlocal.proxy.cancel import CancelRoute
from neonlocal.proxy.endpoint import Endpoint, PeerClosed
from neonlocal.proxy.pool import Parked, PoolKey
from neonlocal.proxy.relay import Relay
from neonlocal.proxy.upstream import Upstream, UpstreamError, open_upstream
from neonlocal.targets import Target
from neonlocal.tls.local import LOCAL_ALPN

if TYPE_CHECKING:
    from neonlocal.proxy.server import Server

# How long a client may take to send its startup packet and answer local authentication
# (PostgreSQL's authentication_timeout). Waiting for the upstream is bounded separately.
STARTUP_TIMEOUT_S = 60.0

# Startup parameters that choose where a Neon session goes; we route by SNI ourselves and a
# real PostgreSQL would reject them as unknown options.
_NEON_ROUTING_OPTIONS = ("endpoint=", "project=")

# `use --terminate`: how long a query in flight may run before it is cancelled, and how long
# the cancelled query then has to come back before the sockets are simply closed.
TERMINATE_GRACE_S = 5.0
CANCEL_WAIT_S = 2.0

_ids = itertools.count(1)


class _StaleCredentials(Exception):
    """The server refused the password we hold; worth one refresh and retry."""


class SessionRefused(Exception):
    """End the session before relaying, with this SQLSTATE and message for the client."""

    def __init__(
        self, message: str, code: str, kind: ErrorKind | None = None, *, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = code
        self.kind = kind
        self.hint = hint


@dataclass(frozen=True)
class Plan:
    """Where and how a session logs in upstream."""

    target: Target
    user: str
    database: str
    parameters: dict[str, str]
    credentials: Credentials | None


def strip_routing_options(options: str) -> str:
    words = [w for w in options.split() if not w.startswith(_NEON_ROUTING_OPTIONS)]
    # Neon also accepts "-c endpoint=..." style; drop a dangling "-c" left behind.
    cleaned: list[str] = []
    for word in words:
        if cleaned and cleaned[-1] == "-c" and word == "-c":
            continue
        cleaned.append(word)
    if cleaned and cleaned[-1] == "-c":
        cleaned.pop()
    return " ".join(cleaned)


def plan_login(target: Target, client_params: Mapping[str, str]) -> Plan:
    """Choose role, database, startup parameters and auth mode for a client on ``target``."""
    client_user = client_params["user"]
    user = target.user if target.pin_user and target.user else client_user
    database = (
        target.database
        if target.pin_database and target.database
        else client_params.get("database") or target.database or user
    )
    params: dict[str, str] = {}
    for key, value in client_params.items():
        if key in ("user", "database"):
            continue
        params[key] = value
    options = " ".join(
        o
        for o in (
            strip_routing_options(target.options or ""),
            strip_routing_options(params.pop("options", "")),
        )
        if o
    )
    params = {"user": user, "database": database, **params}
    if options:
        params["options"] = options
    if "application_name" not in params and target.application_name:
        params["application_name"] = target.application_name
    credentials = None
    if target.password is not None and (target.user is None or target.user == user):
        credentials = Credentials(
            user, target.password, ChannelBindingPolicy(target.channel_binding)
        )
    return Plan(target, user, database, params, credentials)


class Session:
    def __init__(self, server: Server, client: Endpoint) -> None:
        self.id = next(_ids)
        self.server = server
        self.client = client
        self.branch: str | None = None
        self.target: Target | None = None
        self.relay: Relay | None = None
        self.upstream: Upstream | None = None
        self.cancel_pid: int | None = None
        self.started = time.monotonic()
        self.close_reason = "client closed"
        self.user: str | None = None
        self.database: str | None = None
        self.auth: str | None = None
        self._stale_message = ""
        self.client_tls = False
        # How the client's TLS began: "direct" (PostgreSQL 17) or "ssl_request".
        self.client_tls_negotiation: str | None = None
        self._pool_key: PoolKey | None = None
        self._status_messages = b""

    @property
    def busy(self) -> bool:
        return self.relay is not None and not self.relay.idle

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except ProtocolError as exc:
            self.close_reason = f"protocol error: {exc.message}"
            self.server.metrics.error(ErrorKind.PROTOCOL)
            self._refuse(exc.message, exc.sqlstate)
        except SessionRefused as exc:
            self.close_reason = exc.message
            self.server.metrics.error(exc.kind or _kind_of_sqlstate(exc.sqlstate))
            self._refuse(exc.message, exc.sqlstate, hint=exc.hint)
        except PeerClosed as exc:
            self.close_reason = str(exc) or "client closed during startup"
        except TimeoutError:
            self.close_reason = "startup timed out"
            self.server.metrics.error(ErrorKind.STARTUP_TIMEOUT)
            self._refuse(
                "timeout while waiting for the startup packet", sqlstate.PROTOCOL_VIOLATION
            )
        finally:
            self._cleanup()

    async def _run(self) -> None:
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            startup = await self._negotiate()
        if startup is None:
            return
        self.server.admit(self)
        params, negotiated = negotiate(startup)
        if negotiated is not None:
            self.client.write(negotiated.encode())
        plan = self._plan(params)
        secret = self._local_secret(plan)
        if secret is not None:
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                await self._local_auth(secret)
        client_key = self._issue_cancel_key()
        pool = self.server.pool
        if pool is not None and plan.credentials is not None:
            self._pool_key = PoolKey.of(self.branch or "", plan.target, plan.parameters)
            parked = pool.take(self._pool_key)
            if parked is not None:
                await self._resume(parked, client_key)
                return
        try:
            await self._connect_and_login(plan, client_key, may_refresh=True)
        except _StaleCredentials:
            # A reset branch or a changed password: fetch the credentials again, once,
            # before the client sees an error.
            fresh = await self.server.refresh_credentials(self.branch or "", plan.target)
            if fresh is None:
                self.server.record_error(self._stale_message)
                raise SessionRefused(self._stale_message, sqlstate.INVALID_PASSWORD) from None
            self.target = fresh
            plan = plan_login(fresh, params)
            await self._connect_and_login(plan, client_key, may_refresh=False)

    async def _connect_and_login(
        self, plan: Plan, client_key: tuple[int, bytes], *, may_refresh: bool
    ) -> None:
        offers = self.server.sasl_offers
        offer_key = (plan.target.host, plan.target.port, plan.user, plan.database)
        expected = None
        if plan.credentials is not None and self.server.settings.upstream.pipeline_auth:
            expected = offers.get(offer_key)
        upstream = await self._connect(plan.target)
        login = UpstreamLogin(
            plan.parameters,
            credentials=plan.credentials,
            certificate_der=upstream.certificate_der,
            client_key=client_key,
            extra_status={"neonlocal.branch": self.branch or ""},
            client_tls=self.client_tls,
            expected_sasl=expected,
        )
        try:
            await self._login(upstream, login, may_refresh=may_refresh, offer_key=offer_key)
        except SpeculationFailed as exc:
            offers.pop(offer_key, None)
            self.server.log_session("auth_pipelining_refused", self, reason=str(exc))
            await self._connect_and_login(plan, client_key, may_refresh=may_refresh)

    async def _resume(self, parked: Parked, client_key: tuple[int, bytes]) -> None:
        """Serve the client on a reused upstream session: no handshake upstream at all."""
        assert self.target is not None
        self.upstream = Upstream(parked.endpoint, None, parked.tls_version, parked.address)
        pid, secret = client_key
        self.client.write(
            codec.auth_ok()
            + parked.status_messages
            + codec.parameter_status("neonlocal.branch", self.branch or "")
            + codec.backend_key_data(pid, secret)
            + codec.ready_for_query()
        )
        self._status_messages = parked.status_messages
        if parked.server_key is not None and self.cancel_pid is not None:
            server_pid, server_secret = parked.server_key
            self.server.cancels.bind(
                self.cancel_pid, CancelRoute(parked.target, server_pid, server_secret)
            )
        self.auth = "reused"
        self.server.log_session(
            "session_ready",
            self,
            auth="reused",
            tls=parked.tls_version,
            ready_s=round(time.monotonic() - self.started, 3),
        )
        await self._relay(parked.endpoint, parked.server_key)

    async def _relay(self, up: Endpoint, server_key: tuple[int, bytes] | None) -> None:
        relay = Relay(self.client, up)
        self.relay = relay
        pool, key = self.server.pool, self._pool_key
        if pool is not None and key is not None and self.upstream is not None:
            upstream = self.upstream
            target = self.target
            assert target is not None

            def release() -> None:
                pool.park(
                    key,
                    Parked(
                        up,
                        target,
                        self._status_messages,
                        server_key,
                        upstream.tls_version,
                        upstream.address,
                    ),
                )

            relay.release = release
        relay.start()
        await relay.done
        self.close_reason = relay.close_reason
        if relay.released:
            self.close_reason = "client closed; upstream session kept for reuse"
            self.upstream = None

    def _issue_cancel_key(self) -> tuple[int, bytes]:
        pid, secret = self.server.cancels.issue(self)
        self.cancel_pid = pid
        return pid, secret

    async def _negotiate(self) -> StartupMessage | None:
        ssl_object = self.client.extra("ssl_object")  # noqa: S610 - a transport's, not Django's
        if ssl_object is not None:
            self._accept_direct_tls(ssl_object)
        phase = StartupPhase()
        while True:
            event = phase.next_event()
            if event is None:
                phase.receive_data(await self.client.recv())
                continue
            if isinstance(event, SSLRequest) and self.client_tls:
                raise ProtocolError("unexpected SSLRequest over an encrypted connection")
            if isinstance(event, SSLRequest | GSSENCRequest):
                if phase.buffered:
                    raise ProtocolError("received unencrypted data after SSL request")
                local_tls = self.server.local_tls
                if isinstance(event, GSSENCRequest) or local_tls is None:
                    self.client.write(b"N")
                else:
                    self.client.write(b"S")
                    await self._start_client_tls(local_tls.context)
            elif isinstance(event, CancelRequest):
                self.close_reason = "cancel request"
                await self.server.forward_cancel(event)
                self.client.close()
                return None
            else:
                if phase.take_rest():
                    raise ProtocolError("unexpected data after the startup packet")
                if (
                    self.server.settings.local.require_tls
                    and not self.client_tls
                    and not self._on_unix_socket()
                ):
                    raise SessionRefused(
                        "neonlocal requires TLS from clients ([local] require_tls): "
                        "connect with sslmode=require",
                        sqlstate.INVALID_AUTHORIZATION,
                    )
                return event

    def _on_unix_socket(self) -> bool:
        """libpq never uses TLS on a Unix socket, and ours is for its owner alone; like
        PostgreSQL's hostssl lines, require_tls concerns TCP clients."""
        sock = self.client.extra("socket")  # noqa: S610 - a transport's, not Django's
        return sock is not None and sock.family == socket.AF_UNIX

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
        self.server.metrics.error(ErrorKind.PROTOCOL)
        self.server.log_session("local_tls_failed", self, reason=reason)
        raise PeerClosed(reason)

    def _plan(self, params: Mapping[str, str]) -> Plan:
        branch, target = self.server.current_target()
        self.branch, self.target = branch, target
        self.server.session_started(self)
        plan = plan_login(target, params)
        self.user, self.database = plan.user, plan.database
        return plan

    def _local_secret(self, plan: Plan) -> ScramSecret | None:
        """What a local client must prove, if anything, before we log in upstream for it."""
        if plan.credentials is None:
            return None  # the client's own login is relayed; the server checks it
        if self.server.local_secret is not None:
            return self.server.local_secret
        if self.client_tls and self.server.settings.local.tls_auth == "password":
            return self.server.scram_secret_for(plan.credentials.password)
        return None

    async def _local_auth(self, secret: ScramSecret) -> None:
        local_tls = self.server.local_tls
        auth = LocalPasswordAuth(
            secret,
            certificate_der=local_tls.certificate_der if self.client_tls and local_tls else None,
        )
        self.client.write(auth.start())
        while not auth.done:
            try:
                reply = auth.receive_data(await self.client.recv())
            except ProtocolError as exc:
                if exc.sqlstate == sqlstate.INVALID_PASSWORD:
                    raise SessionRefused(
                        f'password authentication failed for user "{self.user}"',
                        sqlstate.INVALID_PASSWORD,
                        ErrorKind.AUTH,
                    ) from None
                raise
            self.client.write(reply)

    async def _connect(self, target: Target) -> Upstream:
        settings = self.server.settings.upstream
        began = time.monotonic()
        try:
            upstream = await open_upstream(
                target,
                timeout=settings.connect_timeout,
                keepalive=settings.keepalive,
                addresses=self.server.addresses,
            )
        except UpstreamError as exc:
            message = (
                f'neonlocal: cannot reach branch "{self.branch}" ({target.describe()}): {exc.cause}'
            )
            self.server.record_error(message)
            raise SessionRefused(message, exc.sqlstate, _kind_of_upstream_error(exc)) from None
        self.server.observe_connect(time.monotonic() - began, self.branch)
        self.upstream = upstream
        return upstream

    async def _login(
        self,
        upstream: Upstream,
        login: UpstreamLogin,
        *,
        may_refresh: bool,
        offer_key: tuple[str, int, str, str],
    ) -> None:
        assert self.target is not None
        up = upstream.endpoint
        up.write(login.start())
        try:
            while login.state is not LoginState.READY:
                if login.awaiting_client:
                    up.write(login.receive_client(await self.client.recv()))
                    continue
                # A server that went silent after TLS (a stuck compute, a half-open path)
                # must not hold the client forever: each wait is bounded like the connect.
                timeout = self.server.settings.upstream.connect_timeout
                try:
                    async with asyncio.timeout(timeout):
                        data = await up.recv()
                except PeerClosed:
                    message = (
                        f'neonlocal: branch "{self.branch}" ({self.target.describe()}) closed the '
                        "connection during login"
                    )
                    self.server.record_error(message)
                    raise SessionRefused(
                        message, sqlstate.CONNECTION_FAILURE, ErrorKind.UPSTREAM_CLOSED
                    ) from None
                except TimeoutError:
                    message = (
                        f'neonlocal: branch "{self.branch}" ({self.target.describe()}) did not '
                        f"answer during login within {timeout:g} s ([upstream] connect_timeout)"
                    )
                    self.server.record_error(message)
                    raise SessionRefused(
                        message, sqlstate.UNABLE_TO_CONNECT, ErrorKind.UPSTREAM_UNREACHABLE
                    ) from None
                out = login.receive_upstream(data)
                up.write(out.to_upstream)
                self.client.write(out.to_client)
        except UpstreamRejected as exc:
            up.close()
            error = exc.error
            message = (
                f'neonlocal: branch "{self.branch}" ({self.target.describe()}): {error.message}'
            )
            if (
                may_refresh
                and exc.during_auth
                and not login.relaying_auth
                and error.sqlstate in (sqlstate.INVALID_PASSWORD, sqlstate.INVALID_AUTHORIZATION)
            ):
                self._stale_message = message
                self.upstream = None
                raise _StaleCredentials from None
            fields = dict(error.fields)
            fields["S"] = fields["V"] = "FATAL"
            fields["M"] = message
            self.close_reason = f"upstream refused: {error.sqlstate}"
            self.server.metrics.error(
                ErrorKind.AUTH
                if exc.during_auth or error.sqlstate.startswith("28")
                else ErrorKind.UPSTREAM_REJECTED
            )
            self.server.record_error(message)
            self.client.write(codec.error_from_fields(fields))
            self.client.close()
            return
        except BaseException:
            up.close()
            raise
        self.auth = login.auth_method
        if login.sasl_offer is not None and self.server.settings.upstream.pipeline_auth:
            self.server.sasl_offers[offer_key] = login.sasl_offer
        if login.server_key is not None and self.cancel_pid is not None:
            pid, secret = login.server_key
            self.server.cancels.bind(self.cancel_pid, CancelRoute(self.target, pid, secret))
        self.server.log_session(
            "session_ready",
            self,
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
        await self._relay(up, login.server_key)

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
            self.close_reason = reason
            self.client.write(error)
            self.client.close()
            if self.upstream is not None:
                self.upstream.endpoint.close()

    def _cancel_then_end(self, relay: Relay, error: bytes) -> None:
        if relay.done.done() or relay.finished:
            return  # the query ended within the grace, and with it the session
        self.server.cancel_session_query(self)
        asyncio.get_running_loop().call_later(CANCEL_WAIT_S, relay.force_terminate, error)

    def _refuse(self, message: str, code: str, *, hint: str | None = None) -> None:
        self.client.write(codec.error_response(message, code, hint=hint))
        self.client.close()
        if self.upstream is not None:
            self.upstream.endpoint.close()

    def _cleanup(self) -> None:
        if self.cancel_pid is not None:
            self.server.cancels.release(self.cancel_pid)
        if not self.client.lost:
            self.client.close()
        if self.upstream is not None and not self.upstream.endpoint.lost:
            self.upstream.endpoint.close()
        self.server.session_ended(self)

    def log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"session": self.id, "branch": self.branch}
        if self.target is not None:
            fields["upstream"] = self.target.describe()
        if self.user is not None:
            fields["user"] = self.user
            fields["database"] = self.database
        return fields


def _kind_of_upstream_error(exc: UpstreamError) -> ErrorKind:
    return ErrorKind.TLS if exc.tls else ErrorKind.UPSTREAM_UNREACHABLE


def _kind_of_sqlstate(code: str) -> ErrorKind:
    """For refusals raised without a kind: the SQLSTATE class says enough."""
    if code == sqlstate.TOO_MANY_CONNECTIONS:
        return ErrorKind.TOO_MANY
    if code.startswith("28"):
        return ErrorKind.AUTH
    if code.startswith("08") and code != sqlstate.PROTOCOL_VIOLATION:
        return ErrorKind.UPSTREAM_UNREACHABLE
    return ErrorKind.PROTOCOL
