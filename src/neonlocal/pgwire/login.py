"""Logging in to the upstream server, from StartupMessage to the first ReadyForQuery.

Two machines, chosen by whether we hold the role's password (``upstream_login`` picks):

* ``CredentialsLogin``: we answer the server's authentication requests ourselves
  (SCRAM-SHA-256-PLUS with channel binding when offered, SCRAM-SHA-256, md5 or cleartext);
* ``RelayedLogin``: the client answers them. Requests pass through to the client with
  SCRAM-SHA-256-PLUS removed from the offer (a plaintext client cannot bind, and libpq aborts
  when it sees PLUS on a non-TLS connection); the client's answers pass through upstream.

Either way everything the server sends after AuthenticationOk is held back until
ReadyForQuery; then ``client_tail`` hands it to the client in one piece, with our own
ParameterStatus added and a cancel key the caller issues once it knows the server's
(proxy/cancel.py).

A credentials login can be pipelined: when the caller knows which SASL mechanisms
this server offered last time, ``start`` sends the SASLInitialResponse right behind the
StartupMessage instead of waiting a round trip for AuthenticationSASL. PostgreSQL reads it
from its buffer as the answer it was about to ask for. If the server asks for anything else
this time, the bytes already sent are wrong for it and ``SpeculationFailed`` tells the caller
to start over on a new connection without pipelining.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from neonlocal.errors import Refusal
from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.codec import SCRAM_SHA_256_PLUS
from neonlocal.pgwire.errors import ProtocolError, ServerError
from neonlocal.pgwire.framing import MessageFramer
from neonlocal.pgwire.scram import ChannelBindingPolicy, ScramClientExchange


class UpstreamRejected(Refusal):
    """The server answered with an ErrorResponse before the session was ready.

    ``error`` holds all its fields, for the client to get them as the server sent them.
    """

    def __init__(self, error: ServerError, *, during_auth: bool) -> None:
        super().__init__(error.message, error.sqlstate, hint=error.fields.get("H"))
        self.error = error
        self.during_auth = during_auth

    def __str__(self) -> str:
        return str(self.error)


class SpeculationFailed(Exception):
    """The server did not ask for the SCRAM login we pipelined; retry without pipelining."""


class LoginState(Enum):
    AUTHENTICATING = "authenticating"
    STARTING = "starting"  # authenticated; the server is sending parameters
    READY = "ready"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)
    channel_binding: ChannelBindingPolicy = ChannelBindingPolicy.PREFER
    # The Neon endpoint id, for a Neon host: its edge asks for a cleartext password only when
    # it cannot tell the endpoint, and then takes "endpoint=<id>;<password>" (neon-notes.md).
    neon_endpoint: str | None = None

    def cleartext_password(self) -> str:
        if self.neon_endpoint is None:
            return self.password
        return f"endpoint={self.neon_endpoint};{self.password}"


@dataclass
class Output:
    """What one step produced: bytes for each side."""

    to_upstream: bytes = b""
    to_client: bytes = b""


class _Login:
    """What both logins share: the server's messages, from its first answer until
    ReadyForQuery, and the one piece the client then gets."""

    # Whether we wait for the client's answer to a request passed on to it.
    awaiting_client = False
    # Whether the last authentication message has gone to the server: from then on Neon's
    # edge may be silently waking the compute (``[upstream] wake_timeout`` bounds the wait).
    awaiting_compute = False
    relaying_auth = False
    # Whether the client has read an authentication request of this login: then a new login
    # in its place would ask it a second time, which a client takes for a protocol violation
    # (libpq: "duplicate SASL authentication request").
    client_saw_auth = False
    channel_bound = False
    pipelined = False
    # The SASL mechanisms this server offered, to pipeline the next login to it.
    sasl_offer: tuple[str, ...] | None = None

    def __init__(
        self,
        parameters: Mapping[str, str],
        *,
        extra_status: Mapping[str, str],
    ) -> None:
        self._params = dict(parameters)
        self._extra_status = dict(extra_status)
        self._upstream = MessageFramer()
        self._held: list[bytes] = []
        self.state = LoginState.AUTHENTICATING
        self.server_key: tuple[int, bytes] | None = None
        self.server_parameters: dict[str, str] = {}
        # The server's ParameterStatus messages as sent, to replay to a client that reuses
        # this session later.
        self.status_messages = b""
        self.auth_method: str | None = None
        self._ready_status = codec.IDLE

    def start(self) -> bytes:
        return codec.startup_message(self._params)

    def client_tail(self, client_key: tuple[int, bytes]) -> bytes:
        """Once ready: what the client gets, AuthenticationOk through ReadyForQuery with
        ``client_key``, then whatever the server sent right behind its ReadyForQuery."""
        if self.state is not LoginState.READY:
            raise RuntimeError("the login is not ready")
        tail = codec.login_tail(
            b"".join(self._held), self._extra_status, client_key, self._ready_status
        )
        self._held.clear()
        return tail + self._upstream.take_rest()

    def take_client_rest(self) -> bytes:
        """Client bytes read past its last answer: they belong to the relay, in order."""
        return b""

    @property
    def done(self) -> bool:
        return self.state is LoginState.READY

    def receive(self, data: bytes) -> Output:
        """Bytes from whichever side the login waits for: the client when ``awaiting_client``
        (its answer to a relayed request), else the server."""
        if self.awaiting_client:
            return Output(to_upstream=self.receive_client(data))
        return self.receive_upstream(data)

    def receive_upstream(self, data: bytes) -> Output:
        self._upstream.feed(data)
        out = Output()
        while self.state is not LoginState.READY:
            msg = self._upstream.next_message()
            if msg is None:
                break
            self._on_message(msg.kind, msg.payload, out)
        # An asynchronous message (ParameterStatus, a notification) may follow ReadyForQuery
        # in the same chunk: it stays buffered, for ``client_tail`` to hand on in order.
        return out

    def receive_client(self, data: bytes) -> bytes:
        """Client bytes during login: only a relayed login ever asks the client anything."""
        raise ProtocolError("unexpected message from client during authentication")

    def _on_message(self, kind: bytes, payload: bytes, out: Output) -> None:
        if kind == b"E":
            self._on_error(codec.parse_error_fields(payload))
        elif self.state is LoginState.AUTHENTICATING:
            self._on_auth_phase_message(kind, payload, out)
        else:
            self._on_startup_message(kind, payload, out)

    def _on_error(self, error: ServerError) -> None:
        raise UpstreamRejected(error, during_auth=self.state is LoginState.AUTHENTICATING)

    def _on_auth_phase_message(self, kind: bytes, payload: bytes, out: Output) -> None:
        if kind == b"R":
            self._on_auth(codec.parse_auth_request(payload), payload, out)
        elif kind == b"N":
            self._held.append(codec.message(kind, payload))
        elif kind != b"v":  # NegotiateProtocolVersion: we asked for plain 3.0 anyway
            raise ProtocolError(
                f"unexpected message type {kind!r} from server during authentication",
                sqlstate.CONNECTION_FAILURE,
            )

    def _on_startup_message(self, kind: bytes, payload: bytes, out: Output) -> None:
        """After AuthenticationOk: parameters, notices, the cancel key, then ReadyForQuery."""
        if kind == b"S":
            name, _, rest = payload.partition(b"\0")
            self.server_parameters[name.decode(errors="replace")] = rest.rstrip(b"\0").decode(
                errors="replace"
            )
            encoded = codec.message(kind, payload)
            self._held.append(encoded)
            self.status_messages += encoded
        elif kind == b"K":
            self.server_key = codec.parse_backend_key_data(payload)
        elif kind == b"N":
            self._held.append(codec.message(kind, payload))
        elif kind == b"Z":
            self._ready_status = payload
            self.state = LoginState.READY
        else:
            raise ProtocolError(
                f"unexpected message type {kind!r} from server during startup",
                sqlstate.CONNECTION_FAILURE,
            )

    def _on_auth(self, request: codec.AuthRequest, payload: bytes, out: Output) -> None:
        raise NotImplementedError


class CredentialsLogin(_Login):
    """We hold the password and answer the server ourselves."""

    def __init__(
        self,
        parameters: Mapping[str, str],
        *,
        credentials: Credentials,
        certificate_der: bytes | None,
        extra_status: Mapping[str, str],
        expected_sasl: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(parameters, extra_status=extra_status)
        self._creds = credentials
        self._cert = certificate_der
        self._scram: ScramClientExchange | None = None
        self._scram_verified = False
        # Pipelining: the mechanism list we bet the server will offer.
        self._expected_sasl = expected_sasl

    def start(self) -> bytes:
        startup = super().start()
        if self._expected_sasl is None:
            return startup
        try:
            self._begin_scram(list(self._expected_sasl))
        except ProtocolError:
            # What we remember would not do for this login (say channel binding is now
            # required): let the server's real offer decide, and fail on that.
            self._scram, self.channel_bound, self.auth_method = None, False, None
            return startup
        assert self._scram is not None
        self.pipelined = True
        return startup + codec.sasl_initial_response(
            self._scram.mechanism, self._scram.client_first()
        )

    def _awaiting_sasl_offer(self) -> bool:
        """We pipelined a SASLInitialResponse and the server has not yet asked for SASL."""
        return self.pipelined and self.sasl_offer is None

    def _on_error(self, error: ServerError) -> None:
        if self._awaiting_sasl_offer() and error.sqlstate == sqlstate.PROTOCOL_VIOLATION:
            # A server that reads ahead may object to our pipelined answer itself.
            raise SpeculationFailed(error.message)
        super()._on_error(error)

    def _on_auth(self, request: codec.AuthRequest, payload: bytes, out: Output) -> None:
        if self._awaiting_sasl_offer():
            self._check_pipelined_offer(request)
        elif request.code == codec.AUTH_OK:
            self._check_server_proof()
            self.state = LoginState.STARTING
        elif request.code in (codec.AUTH_SASL, codec.AUTH_SASL_CONTINUE, codec.AUTH_SASL_FINAL):
            self._on_sasl(request, out)
        elif self._creds.channel_binding is ChannelBindingPolicy.REQUIRE:
            raise ProtocolError(
                "channel binding is required, but the server asked for a password without SCRAM",
                sqlstate.UNABLE_TO_CONNECT,
            )
        elif request.code == codec.AUTH_MD5 and len(request.data) == 4:
            self.auth_method = "md5"
            out.to_upstream += codec.password_message(
                _md5_password(self._creds.user, self._creds.password, request.data)
            )
            self.awaiting_compute = True
        elif request.code == codec.AUTH_CLEARTEXT:
            self.auth_method = "password"
            out.to_upstream += codec.password_message(self._creds.cleartext_password())
            self.awaiting_compute = True
        else:
            raise _unsupported(request)

    def _check_pipelined_offer(self, request: codec.AuthRequest) -> None:
        # Anything but the same offer means the server read (or will read) our pipelined
        # answer as something else: this connection is spoiled.
        if request.code != codec.AUTH_SASL:
            raise SpeculationFailed(f"the server asked for authentication code {request.code}")
        offered = tuple(request.sasl_mechanisms())
        if offered != self._expected_sasl:
            raise SpeculationFailed(f"the server now offers {list(offered)}")
        self.sasl_offer = offered

    def _check_server_proof(self) -> None:
        if self._scram is not None and not self._scram_verified:
            raise ProtocolError(
                "server accepted the login without proving it knows the password",
                sqlstate.CONNECTION_FAILURE,
            )
        # As libpq: "require" also refuses a server that skips authentication altogether.
        if self._creds.channel_binding is ChannelBindingPolicy.REQUIRE and not (
            self.channel_bound and self._scram_verified
        ):
            raise ProtocolError(
                "channel binding is required, but the server authenticated the client "
                "without channel binding",
                sqlstate.UNABLE_TO_CONNECT,
            )

    def _on_sasl(self, request: codec.AuthRequest, out: Output) -> None:
        if request.code == codec.AUTH_SASL:
            mechanisms = request.sasl_mechanisms()
            self.sasl_offer = tuple(mechanisms)
            self._begin_scram(mechanisms)
            assert self._scram is not None
            out.to_upstream += codec.sasl_initial_response(
                self._scram.mechanism, self._scram.client_first()
            )
        elif self._scram is None:
            # SASLContinue or SASLFinal without a SASL exchange begun.
            if self._creds.channel_binding is ChannelBindingPolicy.REQUIRE:
                raise ProtocolError(
                    "channel binding is required, but the server asked for a password "
                    "without SCRAM",
                    sqlstate.UNABLE_TO_CONNECT,
                )
            raise _unsupported(request)
        elif request.code == codec.AUTH_SASL_CONTINUE:
            out.to_upstream += codec.sasl_response(self._scram.client_final(request.data))
            self.awaiting_compute = True
        else:
            self._scram.verify_server_final(request.data)
            self._scram_verified = True

    def _begin_scram(self, offered: list[str]) -> None:
        self._scram = ScramClientExchange(
            offered,
            self._creds.user,
            self._creds.password,
            certificate_der=self._cert,
            policy=self._creds.channel_binding,
        )
        self.channel_bound = self._scram.channel_bound
        self.auth_method = self._scram.mechanism


class RelayedLogin(_Login):
    """The client answers the server's requests itself; we pass them through both ways."""

    relaying_auth = True

    def __init__(
        self,
        parameters: Mapping[str, str],
        *,
        extra_status: Mapping[str, str],
        client_tls: bool = False,
    ) -> None:
        super().__init__(parameters, extra_status=extra_status)
        self._client_tls = client_tls
        self._client_answers = 0
        self._client = MessageFramer()
        # The client owes the server an answer to the request we passed on.
        self.awaiting_client = False
        # Whether the client's next answer is its last (to SASLContinue, md5 or cleartext).
        self._final_answer_due = False

    def receive_client(self, data: bytes) -> bytes:
        """Client bytes during login: its answer to the request passed on. What follows the
        answer (a client may pipeline its first query) waits for the relay, as in
        PostgreSQL, which reads it only once the login is done."""
        if self.state is not LoginState.AUTHENTICATING:
            return super().receive_client(data)
        self._client.feed(data)
        return self._client_answer()

    def take_client_rest(self) -> bytes:
        return self._client.take_rest()

    def _client_answer(self) -> bytes:
        """The client's answer, once it is whole; SASL/password answers only are valid."""
        if not self.awaiting_client:
            return b""
        msg = self._client.next_message()
        if msg is None:
            return b""
        if msg.kind != b"p":
            raise ProtocolError(f"expected password response, got message type {msg.kind!r}")
        if self._client_tls and self._client_answers == 0:
            _refuse_relayed_binding(msg.payload)
        self._client_answers += 1
        self.awaiting_client = False
        self.awaiting_compute = self._final_answer_due
        return msg.encode()

    def _on_auth(self, request: codec.AuthRequest, payload: bytes, out: Output) -> None:
        if request.code == codec.AUTH_OK:
            self.state = LoginState.STARTING
        elif request.code == codec.AUTH_SASL:
            offered = [m for m in request.sasl_mechanisms() if m != SCRAM_SHA_256_PLUS]
            if not offered:
                raise ProtocolError(
                    "the server only offers channel-bound SCRAM, which a plaintext local client "
                    "cannot use; put the role's password in the branch URL",
                    sqlstate.UNABLE_TO_CONNECT,
                )
            self.auth_method = "relayed " + offered[0]
            out.to_client += codec.auth_sasl(offered)
            self.awaiting_client = self.client_saw_auth = True
            out.to_upstream += self._client_answer()
        elif request.code in (
            codec.AUTH_SASL_CONTINUE,
            codec.AUTH_SASL_FINAL,
            codec.AUTH_MD5,
            codec.AUTH_CLEARTEXT,
        ):
            if self.auth_method is None:
                self.auth_method = {codec.AUTH_MD5: "relayed md5"}.get(
                    request.code, "relayed password"
                )
            out.to_client += codec.message(b"R", payload)
            self.client_saw_auth = True
            # SASLFinal is followed by AuthenticationOk without an answer from the client.
            self.awaiting_client = request.code != codec.AUTH_SASL_FINAL
            self._final_answer_due = request.code != codec.AUTH_SASL_FINAL
            out.to_upstream += self._client_answer()
        else:
            raise _unsupported(request)


UpstreamLogin = CredentialsLogin | RelayedLogin


def upstream_login(
    parameters: Mapping[str, str],
    *,
    credentials: Credentials | None,
    certificate_der: bytes | None,
    extra_status: Mapping[str, str],
    client_tls: bool = False,
    expected_sasl: tuple[str, ...] | None = None,
) -> UpstreamLogin:
    """The login for what we hold: our own with ``credentials``, else the client's, relayed."""
    if credentials is None:
        return RelayedLogin(parameters, extra_status=extra_status, client_tls=client_tls)
    return CredentialsLogin(
        parameters,
        credentials=credentials,
        certificate_der=certificate_der,
        extra_status=extra_status,
        expected_sasl=expected_sasl,
    )


def _unsupported(request: codec.AuthRequest) -> ProtocolError:
    return ProtocolError(
        f"the server asked for an authentication method neonlocal does not support "
        f"(code {request.code})",
        sqlstate.UNABLE_TO_CONNECT,
    )


def _refuse_relayed_binding(payload: bytes) -> None:
    """A TLS client relaying its own SCRAM would bind to *our* certificate ('p') or report a
    downgrade ('y'); either fails upstream with a confusing message, so say why here."""
    end = payload.find(b"\0")
    if end < 0 or not payload.startswith(b"SCRAM-SHA-256"):
        return
    data = payload[end + 5 :]
    if data[:1] in (b"y", b"p"):
        raise ProtocolError(
            "this branch's URL holds no password, so neonlocal relays your own SCRAM login, "
            "which cannot pass through local TLS: connect with sslmode=disable (or prefer), "
            "or put the password in the branch URL",
            sqlstate.INVALID_AUTHORIZATION,
        )


def _md5_password(user: str, password: str, salt: bytes) -> str:
    # PostgreSQL's md5 scheme; the server chose it, so we must speak it.
    inner = hashlib.md5((password + user).encode(), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest()
    return "md5" + outer
