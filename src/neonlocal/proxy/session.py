"""One client session: negotiate, authenticate both sides, then relay.

The session chooses its branch once, when the StartupMessage arrives, and keeps it until it
closes: switching the selection never moves an open session.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.codec import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.pgwire.frontend import LocalPasswordAuth, StartupPhase, negotiate
from neonlocal.pgwire.login import Credentials, LoginState, UpstreamLogin, UpstreamRejected
from neonlocal.pgwire.scram import ChannelBindingPolicy
from neonlocal.proxy.cancel import CancelRoute
from neonlocal.proxy.endpoint import Endpoint, PeerClosed
from neonlocal.proxy.relay import Relay
from neonlocal.proxy.upstream import Upstream, UpstreamError, open_upstream
from neonlocal.targets import Target

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


class SessionRefused(Exception):
    """End the session before relaying, with this SQLSTATE and message for the client."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = code


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

    @property
    def busy(self) -> bool:
        return self.relay is not None and not self.relay.idle

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except ProtocolError as exc:
            self.close_reason = f"protocol error: {exc.message}"
            self._refuse(exc.message, exc.sqlstate)
        except SessionRefused as exc:
            self.close_reason = exc.message
            self._refuse(exc.message, exc.sqlstate)
        except PeerClosed:
            self.close_reason = "client closed during startup"
        except TimeoutError:
            self.close_reason = "startup timed out"
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
        if plan.credentials is not None and self.server.local_secret is not None:
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                await self._local_auth()
        upstream = await self._connect(plan.target)
        login = UpstreamLogin(
            plan.parameters,
            credentials=plan.credentials,
            certificate_der=upstream.certificate_der,
            client_key=self._issue_cancel_key(),
            extra_status={"neonlocal.branch": self.branch or ""},
        )
        await self._login(upstream, login)

    def _issue_cancel_key(self) -> tuple[int, bytes]:
        pid, secret = self.server.cancels.issue(self)
        self.cancel_pid = pid
        return pid, secret

    async def _negotiate(self) -> StartupMessage | None:
        phase = StartupPhase()
        while True:
            event = phase.next_event()
            if event is None:
                phase.receive_data(await self.client.recv())
                continue
            if isinstance(event, SSLRequest | GSSENCRequest):
                if phase.buffered:
                    raise ProtocolError("received unencrypted data after SSL request")
                # Local TLS and GSSAPI encryption are not offered (yet): plaintext on loopback.
                self.client.write(b"N")
            elif isinstance(event, CancelRequest):
                self.close_reason = "cancel request"
                await self.server.forward_cancel(event)
                self.client.close()
                return None
            else:
                if phase.take_rest():
                    raise ProtocolError("unexpected data after the startup packet")
                return event

    def _plan(self, params: Mapping[str, str]) -> Plan:
        branch, target = self.server.current_target()
        self.branch, self.target = branch, target
        self.server.session_started(self)
        plan = plan_login(target, params)
        self.user, self.database = plan.user, plan.database
        return plan

    async def _local_auth(self) -> None:
        secret = self.server.local_secret
        assert secret is not None
        auth = LocalPasswordAuth(secret)
        self.client.write(auth.start())
        while not auth.done:
            try:
                reply = auth.receive_data(await self.client.recv())
            except ProtocolError as exc:
                if exc.sqlstate == sqlstate.INVALID_PASSWORD:
                    raise SessionRefused(
                        f'password authentication failed for user "{self.user}"',
                        sqlstate.INVALID_PASSWORD,
                    ) from None
                raise
            self.client.write(reply)

    async def _connect(self, target: Target) -> Upstream:
        settings = self.server.settings.upstream
        began = time.monotonic()
        try:
            upstream = await open_upstream(
                target, timeout=settings.connect_timeout, keepalive=settings.keepalive
            )
        except UpstreamError as exc:
            raise SessionRefused(
                f'neonlocal: cannot reach branch "{self.branch}" ({target.describe()}): '
                f"{exc.cause}",
                exc.sqlstate,
            ) from None
        self.server.observe_connect(time.monotonic() - began)
        self.upstream = upstream
        return upstream

    async def _login(self, upstream: Upstream, login: UpstreamLogin) -> None:
        assert self.target is not None
        up = upstream.endpoint
        up.write(login.start())
        try:
            while login.state is not LoginState.READY:
                if login.awaiting_client:
                    up.write(login.receive_client(await self.client.recv()))
                    continue
                try:
                    data = await up.recv()
                except PeerClosed:
                    raise SessionRefused(
                        f'neonlocal: branch "{self.branch}" ({self.target.describe()}) closed the '
                        "connection during login",
                        sqlstate.CONNECTION_FAILURE,
                    ) from None
                out = login.receive_upstream(data)
                up.write(out.to_upstream)
                self.client.write(out.to_client)
        except UpstreamRejected as exc:
            up.close()
            error = exc.error
            fields = dict(error.fields)
            fields["S"] = fields["V"] = "FATAL"
            fields["M"] = (
                f'neonlocal: branch "{self.branch}" ({self.target.describe()}): {error.message}'
            )
            self.close_reason = f"upstream refused: {error.sqlstate}"
            self.server.record_error(f'branch "{self.branch}": {error.message}')
            self.client.write(codec.error_from_fields(fields))
            self.client.close()
            return
        except BaseException:
            up.close()
            raise
        self.auth = login.auth_method
        if login.server_key is not None and self.cancel_pid is not None:
            pid, secret = login.server_key
            self.server.cancels.bind(self.cancel_pid, CancelRoute(self.target, pid, secret))
        self.server.log_session(
            "session_ready",
            self,
            auth=login.auth_method,
            channel_binding=login.channel_bound,
            tls=upstream.tls_version,
        )
        relay = Relay(self.client, up)
        self.relay = relay
        relay.start()
        await relay.done
        self.close_reason = relay.close_reason

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
            if not relay.done.done():
                loop = asyncio.get_running_loop()
                loop.call_later(grace, self._cancel_then_end, relay, error)
        else:
            self.close_reason = reason
            self.client.write(error)
            self.client.close()
            if self.upstream is not None:
                self.upstream.endpoint.close()

    def _cancel_then_end(self, relay: Relay, error: bytes) -> None:
        if relay.done.done():
            return
        self.server.cancel_session_query(self)
        asyncio.get_running_loop().call_later(CANCEL_WAIT_S, relay.force_terminate, error)

    def _refuse(self, message: str, code: str) -> None:
        self.client.write(codec.error_response(message, code))
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
