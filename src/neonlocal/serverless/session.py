"""The proxy's ``Session`` for a client inside a WebSocket or behind HTTP ``/sql``.

Everything but local authentication is the TCP session's own code: the pipelined messages
behind the startup packet, the branch chosen at startup, the upstream login, cancel keys,
``neonlocal.branch``, switching and errors. Local authentication is the edge's for the
serverless driver (serverless/cleartext.py).
"""

from __future__ import annotations

from neonlocal.proxy.context import SessionContext
from neonlocal.proxy.drive import LocalAuth
from neonlocal.proxy.endpoint import Endpoint
from neonlocal.proxy.plan import Plan
from neonlocal.proxy.session import Session
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
            # The client's own login is relayed to the server, which asks for itself.
            return super()._local_auth(plan)
        return CleartextPasswordAuth(self._expected_password(plan))
