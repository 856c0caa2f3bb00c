"""UpstreamLogin against a scripted fake server (codec encoders + scramp's ScramServer)."""

from __future__ import annotations

import hashlib
import ssl
import struct

import pytest
import scramp
from cryptography import x509

from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.codec import StartupMessage
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.pgwire.framing import Message, MessageFramer
from neonlocal.pgwire.login import (
    Credentials,
    LoginState,
    Output,
    SpeculationFailed,
    UpstreamLogin,
    UpstreamRejected,
    upstream_login,
)
from neonlocal.pgwire.scram import ChannelBindingPolicy
from neonlocal.tls.certs import CertificateAuthority

USER = "alice"
PASSWORD = "s3cret-pässword"
PARAMS = {"user": USER, "database": "app", "application_name": "psql"}
OUR_KEY = (4242, b"our-secret-key-32-bytes-long!!!!")
SERVER_KEY = (777, b"\x01\x02\x03\x04")
BRANCH_STATUS = {"neonlocal.branch": "dev"}
PLUS_AND_PLAIN = [codec.SCRAM_SHA_256_PLUS, codec.SCRAM_SHA_256]
CREDS = Credentials(USER, PASSWORD)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def cert_der(ca: CertificateAuthority) -> bytes:
    return ssl.PEM_cert_to_DER_cert(ca.issue(["ep-x.us-east-2.aws.neon.tech"]).cert_pem.decode())


def _end_point_hash(der: bytes) -> bytes:
    algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
    assert algorithm is not None
    return hashlib.new(algorithm.name, der).digest()


def _messages(data: bytes) -> list[Message]:
    framer = MessageFramer()
    framer.feed(data)
    out = []
    while (msg := framer.next_message()) is not None:
        out.append(msg)
    assert framer.buffered == 0
    return out


def _one(data: bytes) -> Message:
    messages = _messages(data)
    assert len(messages) == 1
    return messages[0]


class FakeServer:
    """The server side of a SCRAM login, scripted with scramp and our encoders."""

    def __init__(self, password: str, *, cert_der: bytes | None) -> None:
        auth_info = scramp.ScramMechanism().make_auth_info(password, iteration_count=4096)
        binding = None if cert_der is None else ("tls-server-end-point", _end_point_hash(cert_der))
        self.scram = scramp.ScramMechanism().make_server(
            lambda _user: auth_info, channel_binding=binding
        )
        self.mechanism = ""
        self.client_first = ""

    def on_initial(self, data: bytes) -> bytes:
        msg = _one(data)
        assert msg.kind == b"p"
        self.mechanism, first = codec.parse_sasl_initial_response(msg.payload)
        self.client_first = first.decode()
        # Like libpq, the login sends an empty user name (n=,), which PostgreSQL accepts and
        # scramp's server does not: it parses a stand-in name, then signs the real message.
        header, _, bare = self.client_first.partition(",,")
        if bare.startswith("n=,"):
            self.scram.set_client_first(f"{header},,n=*,{bare[3:]}")
            self.scram.client_first_bare = bare
        else:
            self.scram.set_client_first(self.client_first)
        return codec.auth_sasl_continue(self.scram.get_server_first().encode())

    def on_final(self, data: bytes) -> bytes:
        msg = _one(data)
        assert msg.kind == b"p"
        self.scram.set_client_final(msg.payload.decode())
        return codec.auth_sasl_final(self.scram.get_server_final().encode())


def _after_auth(*extra: bytes) -> bytes:
    """What a server sends after AuthenticationOk, up to ReadyForQuery."""
    return (
        codec.parameter_status("server_version", "16.4")
        + codec.error_from_fields({"S": "NOTICE", "C": "00000", "M": "hello"}, kind=b"N")
        + codec.parameter_status("TimeZone", "UTC")
        + codec.backend_key_data(*SERVER_KEY)
        + b"".join(extra)
        + codec.ready_for_query(b"I")
    )


def _with_tail(login: UpstreamLogin, out: Output) -> Output:
    """The step's output and, once the login is ready, the client's tail with our key."""
    if login.state is LoginState.READY:
        out.to_client += login.client_tail(OUR_KEY)
    return out


def _state(login: UpstreamLogin) -> LoginState:
    """Read the state afresh (mypy would keep an earlier narrowing across method calls)."""
    return login.state


def _login(
    creds: Credentials | None = CREDS,
    cert_der: bytes | None = None,
    *,
    expected_sasl: tuple[str, ...] | None = None,
) -> UpstreamLogin:
    return upstream_login(
        PARAMS,
        credentials=creds,
        certificate_der=cert_der,
        extra_status=BRANCH_STATUS,
        expected_sasl=expected_sasl,
    )


def _scram_login(login: UpstreamLogin, server: FakeServer, offer: list[str]) -> Output:
    """Run SASL to completion; returns the Output of the final step (incl. ReadyForQuery)."""
    out = login.receive_upstream(codec.auth_sasl(offer))
    assert out.to_client == b""
    out = login.receive_upstream(server.on_initial(out.to_upstream))
    assert out.to_client == b""
    final = server.on_final(out.to_upstream)
    return login.receive_upstream(final + codec.auth_ok() + _after_auth())


# --- start() ------------------------------------------------------------------------------


def test_start_sends_a_3_0_startup_message_with_the_parameters() -> None:
    """The upstream StartupMessage is protocol 3.0 and carries the planned parameters."""
    packet = _login().start()
    assert codec.parse_request(packet[4:]) == StartupMessage(3, 0, PARAMS)


def test_credentials_repr_hides_the_password() -> None:
    """Credentials never show the password in a repr."""
    assert PASSWORD not in repr(Credentials(USER, PASSWORD))


# --- credentials mode: SCRAM ------------------------------------------------------------------


def test_scram_plus_is_used_when_offered_and_a_certificate_is_known(cert_der: bytes) -> None:
    """Knowing the server certificate, we bind: SCRAM-SHA-256-PLUS, p=tls-server-end-point."""
    login = _login(cert_der=cert_der)
    server = FakeServer(PASSWORD, cert_der=cert_der)
    out = _with_tail(login, _scram_login(login, server, PLUS_AND_PLAIN))
    assert server.mechanism == codec.SCRAM_SHA_256_PLUS
    assert server.client_first.startswith("p=tls-server-end-point,,")
    assert login.channel_bound
    assert login.auth_method == codec.SCRAM_SHA_256_PLUS
    assert login.state is LoginState.READY
    assert out.to_client.endswith(codec.ready_for_query(b"I"))


def test_plain_scram_when_plus_is_not_offered(cert_der: bytes) -> None:
    """A server without PLUS gets SCRAM-SHA-256 with flag 'y' (we could have bound)."""
    login = _login(cert_der=cert_der)
    server = FakeServer(PASSWORD, cert_der=None)
    _scram_login(login, server, [codec.SCRAM_SHA_256])
    assert server.mechanism == codec.SCRAM_SHA_256
    assert server.client_first.startswith("y,,")
    assert not login.channel_bound
    assert login.state is LoginState.READY


def test_plain_scram_without_certificate_uses_flag_n() -> None:
    """Without a certificate the client cannot bind at all and says so with 'n'."""
    login = _login()
    server = FakeServer(PASSWORD, cert_der=None)
    _scram_login(login, server, PLUS_AND_PLAIN)
    assert server.mechanism == codec.SCRAM_SHA_256
    assert server.client_first.startswith("n,,")
    assert login.state is LoginState.READY


def test_channel_binding_disable_never_binds(cert_der: bytes) -> None:
    """channel_binding=disable uses plain SCRAM even when PLUS is offered."""
    login = _login(Credentials(USER, PASSWORD, ChannelBindingPolicy.DISABLE), cert_der)
    server = FakeServer(PASSWORD, cert_der=None)
    _scram_login(login, server, PLUS_AND_PLAIN)
    assert server.client_first.startswith("n,,")
    assert not login.channel_bound


def test_channel_binding_require_without_plus_fails_with_08001(cert_der: bytes) -> None:
    """channel_binding=require against a server offering only SCRAM-SHA-256 is refused."""
    login = _login(Credentials(USER, PASSWORD, ChannelBindingPolicy.REQUIRE), cert_der)
    with pytest.raises(ProtocolError) as info:
        login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    assert info.value.sqlstate == sqlstate.UNABLE_TO_CONNECT


def test_channel_binding_require_with_plus_succeeds(cert_der: bytes) -> None:
    """channel_binding=require is satisfied by SCRAM-SHA-256-PLUS."""
    login = _login(Credentials(USER, PASSWORD, ChannelBindingPolicy.REQUIRE), cert_der)
    _scram_login(login, FakeServer(PASSWORD, cert_der=cert_der), PLUS_AND_PLAIN)
    assert login.channel_bound
    assert login.state is LoginState.READY


@pytest.mark.parametrize("code", [codec.AUTH_MD5, codec.AUTH_CLEARTEXT])
def test_channel_binding_require_refuses_password_methods(cert_der: bytes, code: int) -> None:
    """channel_binding=require never sends an md5 or cleartext password."""
    login = _login(Credentials(USER, PASSWORD, ChannelBindingPolicy.REQUIRE), cert_der)
    request = codec.message(
        b"R", struct.pack("!i", code) + (b"salt" if code == codec.AUTH_MD5 else b"")
    )
    with pytest.raises(ProtocolError) as info:
        login.receive_upstream(request)
    assert info.value.sqlstate == sqlstate.UNABLE_TO_CONNECT


def test_channel_binding_require_refuses_a_server_that_skips_authentication(
    cert_der: bytes,
) -> None:
    """channel_binding=require refuses an immediate AuthenticationOk, like libpq does."""
    login = _login(Credentials(USER, PASSWORD, ChannelBindingPolicy.REQUIRE), cert_der)
    with pytest.raises(ProtocolError) as info:
        login.receive_upstream(codec.auth_ok() + _after_auth())
    assert info.value.sqlstate == sqlstate.UNABLE_TO_CONNECT


def test_trust_authentication_is_accepted_by_default() -> None:
    """With the default policy, a server that needs no password logs us straight in."""
    login = _login()
    out = login.receive_upstream(codec.auth_ok() + _after_auth())
    assert login.state is LoginState.READY
    assert out.to_upstream == b""


def test_wrong_password_surfaces_the_servers_error() -> None:
    """The server's 28P01 after our proof becomes UpstreamRejected(during_auth=True)."""
    login = _login(Credentials(USER, "wrong"))
    server = FakeServer(PASSWORD, cert_der=None)
    out = login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    out = login.receive_upstream(server.on_initial(out.to_upstream))
    with pytest.raises(scramp.ScramException):
        server.on_final(out.to_upstream)
    error = codec.error_response("password authentication failed", sqlstate.INVALID_PASSWORD)
    with pytest.raises(UpstreamRejected) as info:
        login.receive_upstream(error)
    assert info.value.during_auth
    assert info.value.error.sqlstate == sqlstate.INVALID_PASSWORD


def test_auth_ok_right_after_sasl_initial_is_refused() -> None:
    """A server that says AuthenticationOk before SCRAM finished has not proven the password."""
    login = _login()
    login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    with pytest.raises(ProtocolError) as info:
        login.receive_upstream(codec.auth_ok())
    assert info.value.sqlstate == sqlstate.CONNECTION_FAILURE


def test_auth_ok_without_sasl_final_is_refused() -> None:
    """Skipping SASLFinal (no server signature) is refused even after our proof was sent."""
    login = _login()
    server = FakeServer(PASSWORD, cert_der=None)
    out = login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    out = login.receive_upstream(server.on_initial(out.to_upstream))
    assert out.to_upstream.startswith(b"p")
    with pytest.raises(ProtocolError):
        login.receive_upstream(codec.auth_ok() + _after_auth())


def test_forged_server_signature_is_refused() -> None:
    """A SASLFinal whose signature does not verify is refused."""
    login = _login()
    server = FakeServer(PASSWORD, cert_der=None)
    out = login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    out = login.receive_upstream(server.on_initial(out.to_upstream))
    server.on_final(out.to_upstream)
    with pytest.raises(ProtocolError):
        login.receive_upstream(codec.auth_sasl_final(b"v=" + b"A" * 44))


def test_server_with_a_different_password_cannot_log_us_in(cert_der: bytes) -> None:
    """An impostor that does not know the password cannot produce a valid SASLFinal."""
    login = _login()
    impostor = FakeServer("another password", cert_der=None)
    out = login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    out = login.receive_upstream(impostor.on_initial(out.to_upstream))
    with pytest.raises(scramp.ScramException):
        impostor.on_final(out.to_upstream)
    # It can only guess a final message; ours refuses it.
    with pytest.raises(ProtocolError):
        login.receive_upstream(codec.auth_sasl_final(b"v=" + b"B" * 44) + codec.auth_ok())


# --- credentials mode: md5 and cleartext ------------------------------------------------------


def test_md5_answer_has_postgresqls_exact_format() -> None:
    """md5: 'md5' + md5(md5(password + user) + salt), as PostgreSQL computes it."""
    login = _login(Credentials("postgres", "postgres"))
    salt = b"\x93\x0a\xff\x01"
    out = login.receive_upstream(codec.message(b"R", struct.pack("!i", codec.AUTH_MD5) + salt))
    # md53175bce1d3201d16594cebf9d7eb3f9d is pg_authid's well-known md5 for postgres/postgres.
    stored = b"3175bce1d3201d16594cebf9d7eb3f9d"
    expected = "md5" + hashlib.md5(stored + salt, usedforsecurity=False).hexdigest()
    msg = _one(out.to_upstream)
    assert msg.kind == b"p"
    assert codec.parse_password_message(msg.payload) == expected
    assert login.auth_method == "md5"


def test_md5_formula_for_other_users() -> None:
    """The user name is part of the md5 hash (password first, then user)."""
    login = _login()
    salt = b"abcd"
    out = login.receive_upstream(codec.message(b"R", struct.pack("!i", codec.AUTH_MD5) + salt))
    inner = hashlib.md5((PASSWORD + USER).encode(), usedforsecurity=False).hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest()
    assert codec.parse_password_message(_one(out.to_upstream).payload) == expected
    out = login.receive_upstream(codec.auth_ok() + _after_auth())
    assert login.state is LoginState.READY


def test_cleartext_request_gets_the_password() -> None:
    """AuthenticationCleartextPassword is answered with the password itself."""
    login = _login()
    out = login.receive_upstream(codec.message(b"R", struct.pack("!i", codec.AUTH_CLEARTEXT)))
    assert out.to_upstream == codec.password_message(PASSWORD)
    assert login.auth_method == "password"


@pytest.mark.parametrize("code", [2, 7, 9, 99])
def test_unsupported_auth_methods_are_refused_with_08001(code: int) -> None:
    """Kerberos, GSSAPI, SSPI and unknown codes are refused cleanly."""
    login = _login()
    with pytest.raises(ProtocolError) as info:
        login.receive_upstream(codec.message(b"R", struct.pack("!i", code)))
    assert info.value.sqlstate == sqlstate.UNABLE_TO_CONNECT


# --- errors and the startup tail ----------------------------------------------------------


def test_error_during_auth_is_upstream_rejected_during_auth() -> None:
    """An ErrorResponse before AuthenticationOk keeps its fields and says during_auth."""
    login = _login()
    error = codec.error_response('role "alice" does not exist', sqlstate.INVALID_AUTHORIZATION)
    with pytest.raises(UpstreamRejected) as info:
        login.receive_upstream(error)
    assert info.value.during_auth
    assert info.value.error.sqlstate == sqlstate.INVALID_AUTHORIZATION
    assert info.value.error.message == 'role "alice" does not exist'


def test_error_after_auth_ok_is_not_during_auth() -> None:
    """An ErrorResponse after AuthenticationOk (e.g. too many connections) says so."""
    login = _login()
    login.receive_upstream(codec.auth_ok())
    with pytest.raises(UpstreamRejected) as info:
        login.receive_upstream(
            codec.error_response("too many connections", sqlstate.TOO_MANY_CONNECTIONS)
        )
    assert not info.value.during_auth
    assert info.value.error.sqlstate == sqlstate.TOO_MANY_CONNECTIONS


def test_startup_messages_are_held_until_ready_for_query_and_reordered(cert_der: bytes) -> None:
    """Client gets AuthOk, server S/N in order, our branch status, OUR key, ReadyForQuery."""
    login = _login(cert_der=cert_der)
    server = FakeServer(PASSWORD, cert_der=cert_der)
    out = login.receive_upstream(codec.auth_sasl(PLUS_AND_PLAIN))
    out = login.receive_upstream(server.on_initial(out.to_upstream))
    final = server.on_final(out.to_upstream)
    out = login.receive_upstream(final + codec.auth_ok() + _after_auth()[:-6])
    assert out.to_client == b""
    assert login.state is LoginState.STARTING
    out = _with_tail(login, login.receive_upstream(codec.ready_for_query(b"I")))
    assert [(m.kind, m.payload) for m in _messages(out.to_client)] == [
        (b"R", b"\0\0\0\0"),
        (b"S", b"server_version\x0016.4\0"),
        (b"N", b"SNOTICE\0C00000\0Mhello\0\0"),
        (b"S", b"TimeZone\0UTC\0"),
        (b"S", b"neonlocal.branch\0dev\0"),
        (b"K", codec.backend_key_data(*OUR_KEY)[5:]),
        (b"Z", b"I"),
    ]
    assert login.server_key == SERVER_KEY
    assert login.server_parameters == {"server_version": "16.4", "TimeZone": "UTC"}
    assert _state(login) is LoginState.READY


def test_server_key_of_pg18_length_is_captured() -> None:
    """A 32-byte PostgreSQL 18 cancel key from the server is kept whole for cancel forwarding."""
    login = _login()
    key = (31337, bytes(range(32)))
    out = _with_tail(
        login,
        login.receive_upstream(
            codec.auth_ok() + codec.backend_key_data(*key) + codec.ready_for_query()
        ),
    )
    assert login.server_key == key
    keys = [m for m in _messages(out.to_client) if m.kind == b"K"]
    assert [codec.parse_backend_key_data(m.payload) for m in keys] == [OUR_KEY]


def test_login_split_into_single_bytes_gives_the_same_result() -> None:
    """Server bytes arriving one at a time produce the same client stream."""
    stream = codec.auth_ok() + _after_auth()
    whole = _login().receive_upstream(stream).to_client
    login = _login()
    pieces = b"".join(
        login.receive_upstream(stream[i : i + 1]).to_client for i in range(len(stream))
    )
    assert pieces == whole
    assert login.state is LoginState.READY


def test_notice_during_auth_is_delivered_after_auth_ok() -> None:
    """A NoticeResponse sent before AuthenticationOk is not lost."""
    notice = codec.error_from_fields({"S": "WARNING", "M": "early"}, kind=b"N")
    login = _login()
    out = _with_tail(
        login, login.receive_upstream(notice + codec.auth_ok() + codec.ready_for_query())
    )
    kinds = [m.kind for m in _messages(out.to_client)]
    assert kinds == [b"R", b"N", b"S", b"K", b"Z"]


def test_a_message_right_behind_ready_for_query_goes_to_the_client_in_order() -> None:
    """An asynchronous ParameterStatus in the same chunk as ReadyForQuery is relayed after it."""
    login = _login()
    late = codec.parameter_status("TimeZone", "UTC")
    out = _with_tail(
        login, login.receive_upstream(codec.auth_ok() + codec.ready_for_query() + late)
    )
    assert login.state is LoginState.READY
    assert out.to_client.endswith(codec.ready_for_query() + late)


@pytest.mark.parametrize(
    "unexpected",
    [codec.message(b"D", b"\0\0"), codec.message(b"C", b"SELECT 1\0")],
)
def test_unexpected_server_messages_are_refused(unexpected: bytes) -> None:
    """Row data or CommandComplete during login is a protocol error, in either phase."""
    with pytest.raises(ProtocolError):
        _login().receive_upstream(unexpected)
    login = _login()
    login.receive_upstream(codec.auth_ok())
    with pytest.raises(ProtocolError):
        login.receive_upstream(unexpected)


# --- pipelined login ------------------------------------------------------------------------


def _startup_and_initial(login: UpstreamLogin) -> tuple[bytes, bytes]:
    """Split start()'s bytes into the StartupMessage and what follows it."""
    sent = login.start()
    length = struct.unpack("!I", sent[:4])[0]
    return sent[:length], sent[length:]


def test_pipelined_login_sends_the_scram_first_message_behind_the_startup(
    cert_der: bytes,
) -> None:
    """With the server's offer known, SASLInitialResponse leaves with the StartupMessage and
    the login completes without answering AuthenticationSASL again."""
    login = _login(cert_der=cert_der, expected_sasl=tuple(PLUS_AND_PLAIN))
    startup, initial = _startup_and_initial(login)
    assert codec.parse_request(startup[4:]) == StartupMessage(3, 0, PARAMS)
    server = FakeServer(PASSWORD, cert_der=cert_der)
    continue_ = server.on_initial(initial)
    assert server.mechanism == codec.SCRAM_SHA_256_PLUS
    # The server's AuthenticationSASL and its SCRAM challenge arrive together.
    out = login.receive_upstream(codec.auth_sasl(PLUS_AND_PLAIN) + continue_)
    assert out.to_client == b""
    final = server.on_final(out.to_upstream)
    out = _with_tail(login, login.receive_upstream(final + codec.auth_ok() + _after_auth()))
    assert login.state is LoginState.READY
    assert login.pipelined
    assert login.channel_bound
    assert login.sasl_offer == tuple(PLUS_AND_PLAIN)
    assert out.to_client.endswith(codec.ready_for_query(b"I"))


def test_a_login_remembers_the_offer_for_the_next_one(cert_der: bytes) -> None:
    """An ordinary login reports the mechanisms the server offered, to pipeline later."""
    login = _login(cert_der=cert_der)
    _scram_login(login, FakeServer(PASSWORD, cert_der=cert_der), PLUS_AND_PLAIN)
    assert login.sasl_offer == tuple(PLUS_AND_PLAIN)
    assert not login.pipelined


@pytest.mark.parametrize(
    "answer",
    [
        codec.auth_sasl([codec.SCRAM_SHA_256]),
        codec.message(b"R", struct.pack("!i", codec.AUTH_MD5) + b"salt"),
        codec.message(b"R", struct.pack("!i", codec.AUTH_CLEARTEXT)),
        codec.auth_ok(),
    ],
    ids=["other-sasl-offer", "md5", "cleartext", "trust"],
)
def test_a_server_that_changed_its_mind_spoils_the_pipelined_login(
    cert_der: bytes, answer: bytes
) -> None:
    """Anything but the offer we bet on means our bytes were wrong: retry, never proceed."""
    login = _login(cert_der=cert_der, expected_sasl=tuple(PLUS_AND_PLAIN))
    login.start()
    with pytest.raises(SpeculationFailed):
        login.receive_upstream(answer)


def test_a_protocol_violation_before_the_offer_spoils_the_pipelined_login() -> None:
    """A server objecting to early bytes (08P01) is retried, not shown to the client."""
    login = _login(expected_sasl=(codec.SCRAM_SHA_256,))
    login.start()
    error = codec.error_from_fields(
        {"S": "FATAL", "C": sqlstate.PROTOCOL_VIOLATION, "M": "unexpected message"}
    )
    with pytest.raises(SpeculationFailed):
        login.receive_upstream(error)


def test_a_real_refusal_of_a_pipelined_login_is_still_the_servers_error() -> None:
    """A missing database is the server's answer to the startup: the client sees it."""
    login = _login(expected_sasl=(codec.SCRAM_SHA_256,))
    login.start()
    error = codec.error_from_fields({"S": "FATAL", "C": "3D000", "M": 'no database "app"'})
    with pytest.raises(UpstreamRejected) as raised:
        login.receive_upstream(error)
    assert raised.value.error.sqlstate == "3D000"


def test_relay_mode_never_pipelines() -> None:
    """Without the password the client answers the server itself: nothing to send early."""
    login = _login(None, expected_sasl=(codec.SCRAM_SHA_256,))
    sent = login.start()
    assert codec.parse_request(sent[4:]) == StartupMessage(3, 0, PARAMS)
    assert not login.pipelined


def test_a_remembered_offer_that_cannot_satisfy_the_policy_is_not_pipelined(
    cert_der: bytes,
) -> None:
    """channel_binding=require with a remembered plain offer: ask the server instead."""
    creds = Credentials(USER, PASSWORD, ChannelBindingPolicy.REQUIRE)
    login = _login(creds, cert_der, expected_sasl=(codec.SCRAM_SHA_256,))
    sent = login.start()
    assert codec.parse_request(sent[4:]) == StartupMessage(3, 0, PARAMS)
    assert not login.pipelined
    server = FakeServer(PASSWORD, cert_der=cert_der)
    _scram_login(login, server, PLUS_AND_PLAIN)
    assert login.channel_bound
    assert login.state is LoginState.READY


# --- relay mode -------------------------------------------------------------------------------


def _relay() -> UpstreamLogin:
    return _login(creds=None, cert_der=b"unused in relay mode")


def test_relay_strips_plus_from_the_offer() -> None:
    """A plaintext local client is offered SCRAM-SHA-256 only, never -PLUS."""
    login = _relay()
    out = login.receive_upstream(codec.auth_sasl(PLUS_AND_PLAIN))
    assert out.to_upstream == b""
    assert out.to_client == codec.auth_sasl([codec.SCRAM_SHA_256])
    assert login.awaiting_client


def test_relay_refuses_a_plus_only_server() -> None:
    """If the server insists on channel binding, a relayed client cannot log in: 08001."""
    with pytest.raises(ProtocolError) as info:
        _relay().receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256_PLUS]))
    assert info.value.sqlstate == sqlstate.UNABLE_TO_CONNECT


def test_relay_forwards_a_whole_scram_exchange_byte_for_byte() -> None:
    """Client answers go upstream unchanged; server requests reach the client unchanged."""
    login = _relay()
    server = FakeServer(PASSWORD, cert_der=None)
    client = scramp.ScramClient([codec.SCRAM_SHA_256], USER, PASSWORD)

    login.receive_upstream(codec.auth_sasl(PLUS_AND_PLAIN))
    assert login.awaiting_client
    initial = codec.sasl_initial_response(codec.SCRAM_SHA_256, client.get_client_first().encode())
    assert login.receive_client(initial) == initial
    assert not login.awaiting_client

    cont = server.on_initial(initial)
    out = login.receive_upstream(cont)
    assert out.to_client == cont
    assert login.awaiting_client
    client.set_server_first(_one(cont).payload[4:].decode())
    response = codec.sasl_response(client.get_client_final().encode())
    # Arriving in pieces changes nothing: whole messages are forwarded once complete.
    forwarded = login.receive_client(response[:3]) + login.receive_client(response[3:])
    assert forwarded == response
    assert not login.awaiting_client

    final = server.on_final(response)
    out = login.receive_upstream(final)
    assert out.to_client == final
    assert not login.awaiting_client  # SASLFinal needs no answer
    client.set_server_final(_one(final).payload[4:].decode())

    out = _with_tail(login, login.receive_upstream(codec.auth_ok() + _after_auth()))
    assert login.state is LoginState.READY
    assert _messages(out.to_client)[0] == Message(b"R", b"\0\0\0\0")
    assert login.auth_method == "relayed " + codec.SCRAM_SHA_256


@pytest.mark.parametrize(("code", "data"), [(codec.AUTH_MD5, b"salt"), (codec.AUTH_CLEARTEXT, b"")])
def test_relay_forwards_password_requests_and_awaits_the_client(code: int, data: bytes) -> None:
    """md5/cleartext requests reach the client verbatim and the proxy waits for its answer."""
    login = _relay()
    request = codec.message(b"R", struct.pack("!i", code) + data)
    out = login.receive_upstream(request)
    assert out.to_client == request
    assert login.awaiting_client
    answer = codec.password_message("whatever the client says")
    assert login.receive_client(answer) == answer
    assert not login.awaiting_client


def test_relay_hands_on_a_pipelined_password_and_keeps_the_query_behind_it() -> None:
    """A password sent ahead of the request answers it when it comes; a query pipelined
    behind it waits for the relay, after the client's tail."""
    login = _relay()
    answer = codec.password_message("sent early")
    query = codec.message(b"Q", b"SELECT 1\0")
    assert login.receive_client(answer + query) == b""
    request = codec.message(b"R", struct.pack("!i", codec.AUTH_CLEARTEXT))
    out = login.receive_upstream(request)
    assert (out.to_client, out.to_upstream) == (request, answer)
    assert not login.awaiting_client
    login.receive_upstream(codec.auth_ok() + codec.backend_key_data(*SERVER_KEY))
    out = login.receive_upstream(codec.ready_for_query())
    assert (out.to_client, login.state) == (b"", LoginState.READY)
    assert login.take_client_rest() == query
    tail = _messages(login.client_tail(OUR_KEY))
    assert [m.kind for m in tail] == [b"R", b"S", b"K", b"Z"]
    assert codec.parse_backend_key_data(tail[2].payload) == OUR_KEY


def test_a_relayed_login_says_once_the_client_has_read_an_authentication_request() -> None:
    """From then on a new login in its place would ask the client a second time."""
    login = _relay()
    assert not login.client_saw_auth
    login.receive_upstream(codec.auth_sasl(PLUS_AND_PLAIN))
    assert login.client_saw_auth


def test_our_own_login_never_shows_the_client_an_authentication_request() -> None:
    login = _login()
    login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    assert not login.client_saw_auth


def test_relay_refuses_non_password_client_messages() -> None:
    """During relayed auth the client may only send 'p' messages."""
    login = _relay()
    login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    with pytest.raises(ProtocolError):
        login.receive_client(codec.message(b"Q", b"SELECT 1\0"))


def test_client_bytes_are_refused_in_credentials_mode() -> None:
    """When we answer the server ourselves, the client has nothing to say yet."""
    login = _login()
    login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    with pytest.raises(ProtocolError):
        login.receive_client(codec.password_message(PASSWORD))


def test_our_scram_login_sends_an_empty_user_name_as_libpq_does() -> None:
    """n=, : PostgreSQL takes the role from the startup packet; Neon's edge expects it empty."""
    login = _login()
    server = FakeServer(PASSWORD, cert_der=None)
    _scram_login(login, server, [codec.SCRAM_SHA_256])
    assert server.client_first.startswith("n,,n=,r=")
    assert login.done


def test_the_wait_for_a_compute_begins_after_the_last_scram_message() -> None:
    """Neon's edge wakes a compute after the client's final SCRAM message, silently: only
    from then on may the daemon wait for it longer than for a network step."""
    login = _login()
    server = FakeServer(PASSWORD, cert_der=None)
    out = login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    assert not login.awaiting_compute
    out = login.receive_upstream(server.on_initial(out.to_upstream))
    assert login.awaiting_compute


def test_a_relayed_login_waits_for_a_compute_after_the_clients_last_answer() -> None:
    login = _relay()
    login.receive_upstream(codec.auth_sasl([codec.SCRAM_SHA_256]))
    login.receive_client(codec.sasl_initial_response(codec.SCRAM_SHA_256, b"n,,n=,r=abc"))
    assert not login.awaiting_compute
    login.receive_upstream(codec.auth_sasl_continue(b"r=abcdef,s=c2FsdA==,i=4096"))
    assert not login.awaiting_compute
    login.receive_client(codec.sasl_response(b"c=biws,r=abcdef,p=cHJvb2Y="))
    assert login.awaiting_compute


def test_a_neon_host_asking_for_a_cleartext_password_is_told_the_endpoint() -> None:
    """The edge asks for cleartext only when it cannot tell the endpoint (no usable SNI) and
    then takes "endpoint=<id>;<password>"."""
    creds = Credentials(USER, PASSWORD, neon_endpoint="ep-cool-rain-123456")
    out = _login(creds).receive_upstream(codec.message(b"R", (3).to_bytes(4, "big")))
    assert out.to_upstream == codec.password_message(f"endpoint=ep-cool-rain-123456;{PASSWORD}")
    plain = _login().receive_upstream(codec.message(b"R", (3).to_bytes(4, "big")))
    assert plain.to_upstream == codec.password_message(PASSWORD)
