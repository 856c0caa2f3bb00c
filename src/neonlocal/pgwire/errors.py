"""Errors raised by the protocol layer.

``ProtocolError`` means the peer broke the protocol: a ``neonlocal.errors.Refusal`` whose
SQLSTATE and message the proxy sends back in an ErrorResponse before closing (or, for an
``UnansweredProtocolError``, only logs). Programming
errors (calling a state machine out of order) raise ``RuntimeError`` instead, as h11 does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from neonlocal.errors import Refusal
from neonlocal.pgwire import sqlstate


class ProtocolError(Refusal):
    """The peer sent something we cannot accept; answer with ``sqlstate`` and close."""

    def __init__(
        self, message: str, code: str = sqlstate.PROTOCOL_VIOLATION, *, detail: str | None = None
    ) -> None:
        super().__init__(message, code, detail=detail)


class OldProtocolError(ProtocolError):
    """A client that asked for protocol 1.x or 2.x is refused in that protocol's format, as
    PostgreSQL refuses it (send_message_to_frontend's old style): the one format it reads."""


class UnansweredProtocolError(ProtocolError):
    """A broken startup packet PostgreSQL closes on without a reply: it only logs it (a
    COMMERROR in ProcessStartupPacket), since the peer may not speak the protocol at all."""


@dataclass(frozen=True)
class ServerError:
    """The fields of an ErrorResponse or NoticeResponse, keyed by their one-letter codes."""

    fields: dict[str, str] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        return self.fields.get("V") or self.fields.get("S") or "ERROR"

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", sqlstate.INTERNAL_ERROR)

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    def __str__(self) -> str:
        return f"{self.severity} {self.sqlstate}: {self.message}"
