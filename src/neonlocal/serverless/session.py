"""The proxy's ``Session`` for a client inside a WebSocket or behind HTTP ``/sql``.

Everything but local authentication is the TCP session's own code: the branch chosen at
startup, the upstream login, cancel keys, ``neonlocal.branch``, switching and errors. Local
authentication is the edge's for the serverless driver (serverless/cleartext.py), and bytes
the driver pipelined behind its startup packet are kept for the relay instead of refused.
"""

from __future__ import annotations

from neonlocal.metrics import ErrorKind
from neonlocal.pgwire import sqlstate
from neonlocal.pgwire.codec import StartupMessage
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.pgwire.frontend import StartupPhase
from neonlocal.proxy.context import SessionRefused
from neonlocal.proxy.plan import Plan
from neonlocal.proxy.session import Session
from neonlocal.serverless.cleartext import CleartextPasswordAuth


class CarriedSession(Session):
    _pipelined = b""

    def _checked_startup(self, startup: StartupMessage, phase: StartupPhase) -> StartupMessage:
        self._pipelined = phase.take_rest()
        return super()._checked_startup(startup, phase)

    async def _authenticate_locally(self, plan: Plan) -> None:
        if plan.credentials is None:
            # The client's own login is relayed to the server, which asks for itself.
            self._put_back(self._pipelined)
            await super()._authenticate_locally(plan)
            return
        password = self._context.settings.local.password
        auth = CleartextPasswordAuth(password.get_secret_value() if password else None)
        self.client.write(auth.start())
        pending, self._pipelined = self._pipelined, b""
        try:
            while not auth.done:
                auth.receive(pending or await self.client.recv())
                pending = b""
        except ProtocolError as exc:
            if exc.sqlstate == sqlstate.INVALID_PASSWORD:
                raise SessionRefused(
                    f'password authentication failed for user "{self.user}"',
                    sqlstate.INVALID_PASSWORD,
                    ErrorKind.AUTH,
                ) from None
            raise
        self._put_back(auth.rest)

    def _put_back(self, data: bytes) -> None:
        """Return bytes read ahead to the client endpoint, in front of any that came since."""
        data += self.client.take_buffered()
        if data:
            self.client.data_received(data)
            self.client.bytes_in -= len(data)  # counted once already, when they arrived
