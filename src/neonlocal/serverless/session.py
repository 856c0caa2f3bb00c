"""The proxy's ``Session`` for a client inside a WebSocket or behind HTTP ``/sql``.

Everything but local authentication is the TCP session's own code: the pipelined messages
behind the startup packet, the branch chosen at startup, the upstream login, cancel keys,
``neonlocal.branch``, switching and errors. Local authentication is the edge's for the
serverless driver (serverless/cleartext.py): a cleartext password. Where the branch URL holds
no password for the client's role, a TCP client's own login is relayed; this driver cannot
answer a server's SCRAM, so its cleartext password is what we log in upstream with, and the
server checks it (as Neon's edge does with it).
"""

from __future__ import annotations

from neonlocal.pgwire.login import UpstreamLogin
from neonlocal.proxy.context import SessionContext
from neonlocal.proxy.drive import LocalAuth
from neonlocal.proxy.endpoint import Endpoint
from neonlocal.proxy.plan import Plan, with_client_password
from neonlocal.proxy.session import Session
from neonlocal.proxy.upstream import Upstream
from neonlocal.serverless.cleartext import CleartextPasswordAuth

# The transport extra that says the carrier (https, wss) is encrypted with the local TLS.
CARRIED_TLS = "neonlocal_carried_tls"


class CarriedSession(Session):
    def __init__(self, context: SessionContext, client: Endpoint) -> None:
        super().__init__(context, client)
        # As a TCP client's TLS does: [local] require_tls and tls_auth take it into account.
        if client.extra(CARRIED_TLS):  # noqa: S610 - a transport's, not Django's
            self.client_tls = True
            self.client_tls_negotiation = "carrier"
        # The password the client gave, kept only where we log in upstream with it.
        self._client_login: CleartextPasswordAuth | None = None

    def _expected_password(self, plan: Plan) -> str | None:
        """What the client must send, as ``_local_secret`` decides for SCRAM; None: any."""
        settings = self._context.settings.local
        if settings.password is not None:
            return settings.password.get_secret_value()
        if self.client_tls and settings.tls_auth == "password" and plan.credentials:
            return plan.credentials.password
        return None

    def _local_auth(self, plan: Plan) -> LocalAuth | None:
        if plan.credentials is None:
            self._client_login = CleartextPasswordAuth(None)
            return self._client_login
        return CleartextPasswordAuth(self._expected_password(plan))

    def _upstream_login(self, plan: Plan, upstream: Upstream, *, pipeline: bool) -> UpstreamLogin:
        client = self._client_login
        if plan.credentials is None and client is not None and client.password is not None:
            plan = with_client_password(plan, client.password)
        return super()._upstream_login(plan, upstream, pipeline=pipeline)
