"""The client-facing side of a session, up to the point where the proxy connects upstream.

``StartupPhase`` reads what a client sends first: at most one SSLRequest and one
GSSENCRequest (one only, once encryption began), then a StartupMessage, or a CancelRequest
instead. ``LocalPasswordAuth`` checks the optional local password with SCRAM. Both are pure
state machines of the package's one shape: ``receive(data)`` returns what to act on, until
``done``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.codec import (
    CancelRequest,
    GSSENCRequest,
    Request,
    SSLRequest,
    StartupMessage,
)
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.pgwire.framing import MessageFramer, StartupFramer
from neonlocal.pgwire.scram import ScramSecret, ScramServerExchange


class Phase(Enum):
    NEGOTIATING = "negotiating"
    DONE = "done"


@dataclass(frozen=True)
class Negotiated:
    """What the proxy must tell a client whose protocol version we step down from."""

    minor: int
    unsupported_options: tuple[str, ...]

    def encode(self) -> bytes:
        return codec.negotiate_protocol_version(self.minor, self.unsupported_options)


class StartupPhase:
    """Events from a client's first bytes. Feed with ``receive_data``, drain ``next_event``;
    or, one step at a time, ``receive`` (both at once)."""

    def __init__(self) -> None:
        self._framer = StartupFramer()
        # PostgreSQL's ssl_done and gss_done (ProcessStartupPacket): a request already
        # answered, or made moot by encryption, is special no more.
        self._ssl_done = False
        self._gss_done = False
        self.phase = Phase.NEGOTIATING
        # What ended the phase: the StartupMessage, or a CancelRequest instead.
        self.result: StartupMessage | CancelRequest | None = None

    def receive_data(self, data: bytes) -> None:
        if self.phase is Phase.DONE:
            raise RuntimeError("startup phase is over")
        self._framer.feed(data)

    def receive(self, data: bytes) -> Request | None:
        """Feed ``data`` and return the next event, if one is complete. Every event but the
        last leaves nothing buffered in a well-behaved client, so one is all there is."""
        if data:
            self.receive_data(data)
        return self.next_event()

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def buffered(self) -> int:
        """Bytes waiting after the last event. After an SSLRequest or GSSENCRequest they are
        plaintext sent ahead of the encryption asked for: never to be read, since they would
        be taken as if they came over TLS."""
        return self._framer.buffered

    def next_event(self) -> Request | None:
        if self.phase is Phase.DONE:
            return None
        body = self._framer.next_packet()
        if body is None:
            return None
        request = codec.parse_request(body)
        if isinstance(request, SSLRequest | GSSENCRequest):
            self._take_encryption_request(request)
        elif isinstance(request, CancelRequest | StartupMessage):
            self.phase = Phase.DONE
            if isinstance(request, StartupMessage):
                _check_startup(request)
            self.result = request
        return request

    def encryption_began(self) -> None:
        """The client's request was accepted and its handshake is done: as in PostgreSQL,
        neither request is taken after that."""
        self._ssl_done = self._gss_done = True

    def _take_encryption_request(self, request: SSLRequest | GSSENCRequest) -> None:
        """Each request is special once: libpq with gssencmode=prefer sends GSSENCRequest
        and, when refused, SSLRequest. A repeated one is read, as PostgreSQL reads it, as a
        protocol version (1234.5679 or 1234.5680) and refused as such, with 0A000."""
        if isinstance(request, SSLRequest):
            if self._ssl_done:
                raise codec.unsupported_protocol(codec.SSL_REQUEST_CODE)
            self._ssl_done = True
        else:
            if self._gss_done:
                raise codec.unsupported_protocol(codec.GSSENC_REQUEST_CODE)
            self._gss_done = True

    def take_rest(self) -> bytes:
        return self._framer.take_rest()


def _check_startup(startup: StartupMessage) -> None:
    if not startup.parameters.get("user"):
        raise ProtocolError(
            "no PostgreSQL user name specified in startup packet", sqlstate.INVALID_AUTHORIZATION
        )


def negotiate(startup: StartupMessage) -> tuple[dict[str, str], Negotiated | None]:
    """Split a client's parameters into those we forward and a protocol step-down, if any.

    We speak 3.0 and support no ``_pq_.`` protocol options: a newer client (3.2 from
    PostgreSQL 18) is told so with NegotiateProtocolVersion and carries on with 3.0.
    """
    params = {k: v for k, v in startup.parameters.items() if not k.startswith("_pq_.")}
    unsupported = tuple(k for k in startup.parameters if k.startswith("_pq_."))
    if startup.minor > 0 or unsupported:
        return params, Negotiated(0, unsupported)
    return params, None


class AuthState(Enum):
    AWAIT_INITIAL = "await-initial"
    AWAIT_FINAL = "await-final"
    DONE = "done"


class LocalPasswordAuth:
    """Check the configured local password with SCRAM-SHA-256 (and -PLUS over local TLS)."""

    def __init__(self, secret: ScramSecret, *, certificate_der: bytes | None = None) -> None:
        self._scram = ScramServerExchange(secret, certificate_der=certificate_der)
        self._framer = MessageFramer()
        self.state = AuthState.AWAIT_INITIAL

    def start(self) -> bytes:
        """The AuthenticationSASL request to send the client."""
        return codec.auth_sasl(self._scram.mechanisms)

    def receive(self, data: bytes) -> bytes:
        """Feed client bytes; returns bytes to send back (possibly empty).

        Raises ProtocolError (28P01 for a wrong password) when the client must be refused.
        """
        self._framer.feed(data)
        out = b""
        while self.state is not AuthState.DONE:
            msg = self._framer.next_message()
            if msg is None:
                break
            if msg.kind != b"p":
                raise ProtocolError(
                    f"expected SASL response, got message type {msg.kind!r}",
                )
            if self.state is AuthState.AWAIT_INITIAL:
                mechanism, data_in = codec.parse_sasl_initial_response(msg.payload)
                out += codec.auth_sasl_continue(self._scram.server_first(mechanism, data_in))
                self.state = AuthState.AWAIT_FINAL
            else:
                out += codec.auth_sasl_final(self._scram.server_final(msg.payload))
                self.state = AuthState.DONE
        return out

    def take_rest(self) -> bytes:
        """What the client sent past its last answer (it may pipeline its first query):
        it belongs to whoever reads next."""
        return self._framer.take_rest()

    @property
    def done(self) -> bool:
        return self.state is AuthState.DONE
