"""Local authentication as Neon's edge does it for the serverless driver: a cleartext password.

The driver pipelines its StartupMessage, a PasswordMessage and its first query without waiting
to be asked, so the session must ask for exactly that (AuthenticationCleartextPassword) and
leave what follows the password for the relay. The password is checked against ``[local]
password`` when one is set and accepted as it is otherwise (trust mode, as for TCP clients).
No I/O here.
"""

from __future__ import annotations

import hmac

from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.pgwire.framing import MessageFramer

AUTH_CLEARTEXT_PASSWORD = 3


class CleartextPasswordAuth:
    """``start()`` asks; ``receive(data)`` until ``done``; ``take_rest()`` is what came after."""

    def __init__(self, expected: str | None) -> None:
        self._expected = expected
        self._framer = MessageFramer()
        self.done = False
        self.password: str | None = None

    def start(self) -> bytes:
        return codec.message(b"R", AUTH_CLEARTEXT_PASSWORD.to_bytes(4, "big"))

    def receive(self, data: bytes) -> bytes:
        """Feed client bytes; raises ProtocolError (28P01 for a wrong password)."""
        if self.done:
            raise RuntimeError("authentication is over")
        self._framer.feed(data)
        msg = self._framer.next_message()
        if msg is None:
            return b""
        if msg.kind != b"p":
            raise ProtocolError(f"expected password response, got message type {msg.kind!r}")
        password = codec.parse_password_message(msg.payload)
        if self._expected is not None and not hmac.compare_digest(
            password.encode(), self._expected.encode()
        ):
            raise ProtocolError("password authentication failed", sqlstate.INVALID_PASSWORD)
        self.password = password
        self.done = True
        return b""

    def take_rest(self) -> bytes:
        """What the client sent after its password (the driver's first query), to relay."""
        return self._framer.take_rest()
