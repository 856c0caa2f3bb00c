"""Resetting a server session for reuse: ``DISCARD ALL``, as pgbouncer's session mode does.

``ResetExchange`` writes the query and judges the answer: the session is reusable only if
the server answers CommandComplete and ReadyForQuery with status idle (``I``), and nothing
else arrives (an error or a notice of shutdown means the session is not fit to hand out).
"""

from __future__ import annotations

from enum import Enum

from neonlocal.pgwire import codec
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.pgwire.framing import MessageFramer

RESET_QUERY = "DISCARD ALL"


class ResetResult(Enum):
    PENDING = "pending"
    CLEAN = "clean"
    UNUSABLE = "unusable"


class ResetExchange:
    def __init__(self) -> None:
        self._framer = MessageFramer()
        self._completed = False
        self.result = ResetResult.PENDING

    @staticmethod
    def request() -> bytes:
        return codec.message(b"Q", RESET_QUERY.encode() + b"\0")

    @property
    def done(self) -> bool:
        return self.result is not ResetResult.PENDING

    def receive(self, data: bytes) -> ResetResult:
        if self.result is not ResetResult.PENDING:
            # Anything after the answer (a shutdown notice, say) spoils the session.
            self.result = ResetResult.UNUSABLE
            return self.result
        self._framer.feed(data)
        try:
            while (msg := self._framer.next_message()) is not None:
                if msg.kind == b"S":
                    # RESET ALL reports settings it put back; they equal the values of the
                    # original login, which the next client is given anyway.
                    continue
                if msg.kind == b"C" and not self._completed:
                    self._completed = True
                elif msg.kind == b"Z" and self._completed and msg.payload == b"I":
                    self.result = (
                        ResetResult.CLEAN if not self._framer.buffered else ResetResult.UNUSABLE
                    )
                    break
                else:
                    self.result = ResetResult.UNUSABLE
                    break
        except ProtocolError:
            self.result = ResetResult.UNUSABLE
        return self.result
