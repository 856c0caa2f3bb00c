"""The proxy's ``Session`` for a client inside a WebSocket or behind HTTP ``/sql``.

Everything but local authentication is the TCP session's own code: the pipelined messages
behind the startup packet, the branch chosen at startup, the upstream login, cancel keys,
``neonlocal.branch``, switching and errors. Local authentication is the edge's for the
serverless driver (serverless/cleartext.py).
"""

from __future__ import annotations

from neonlocal.metrics import ErrorKind
from neonlocal.pgwire import sqlstate
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.proxy.context import SessionRefused
from neonlocal.proxy.drive import drive
from neonlocal.proxy.plan import Plan
from neonlocal.proxy.session import Session
from neonlocal.serverless.cleartext import CleartextPasswordAuth


class CarriedSession(Session):
    async def _authenticate_locally(self, plan: Plan) -> None:
        if plan.credentials is None:
            # The client's own login is relayed to the server, which asks for itself.
            await super()._authenticate_locally(plan)
            return
        password = self._context.settings.local.password
        auth = CleartextPasswordAuth(password.get_secret_value() if password else None)
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
