"""Message encoders/decoders (codec) and the two stream framers (framing)."""

from __future__ import annotations

import struct

import pytest

from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.codec import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage
from neonlocal.pgwire.errors import OldProtocolError, ProtocolError
from neonlocal.pgwire.framing import (
    MAX_HANDSHAKE_MESSAGE,
    MAX_STARTUP_PACKET,
    Message,
    MessageFramer,
    StartupFramer,
)


def _body(packet: bytes) -> bytes:
    """The body of an untyped packet: what StartupFramer hands to parse_request."""
    (length,) = struct.unpack_from("!i", packet)
    assert length == len(packet)
    return packet[4:]


def _untyped(body: bytes) -> bytes:
    return struct.pack("!i", len(body) + 4) + body


def _raw_startup(major: int, minor: int, body: bytes) -> bytes:
    return struct.pack("!i", (major << 16) | minor) + body


# --- parse_request: the requests a client may send first ---------------------------------


def test_ssl_request_is_recognised() -> None:
    """An SSLRequest (code 1234.5679) parses as SSLRequest."""
    assert codec.parse_request(_body(codec.ssl_request())) == SSLRequest()


def test_gssenc_request_is_recognised() -> None:
    """A GSSENCRequest (code 1234.5680) parses as GSSENCRequest."""
    packet = struct.pack("!i", codec.GSSENC_REQUEST_CODE)
    assert codec.parse_request(packet) == GSSENCRequest()


@pytest.mark.parametrize(
    ("code", "expected"),
    [(codec.SSL_REQUEST_CODE, SSLRequest()), (codec.GSSENC_REQUEST_CODE, GSSENCRequest())],
)
def test_encryption_request_with_trailing_bytes_is_the_request(
    code: int, expected: codec.Request
) -> None:
    """An SSLRequest/GSSENCRequest longer than 8 bytes: PostgreSQL reads only its code."""
    assert codec.parse_request(struct.pack("!i", code) + b"\0") == expected


@pytest.mark.parametrize("secret_len", [4, 32, 256])
def test_cancel_request_accepts_classic_and_pg18_secrets(secret_len: int) -> None:
    """CancelRequest keeps the pid and a 4-byte (3.0) or longer PG18 (3.2) secret intact."""
    secret = bytes((i * 7 + 1) % 256 for i in range(secret_len))
    request = codec.parse_request(_body(codec.cancel_request(4242, secret)))
    assert request == CancelRequest(4242, secret)


def test_cancel_request_secret_longer_than_256_bytes_is_refused() -> None:
    """A cancel secret over PostgreSQL 18's 256-byte limit is refused."""
    with pytest.raises(ProtocolError) as info:
        codec.parse_request(_body(codec.cancel_request(1, b"x" * 257)))
    assert info.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


@pytest.mark.parametrize("secret_len", [0, 3])
def test_cancel_request_secret_shorter_than_4_bytes_is_refused(secret_len: int) -> None:
    """A CancelRequest without a full 4-byte secret is refused."""
    with pytest.raises(ProtocolError):
        codec.parse_request(_body(codec.cancel_request(1, b"s" * secret_len)))


def test_cancel_request_repr_hides_the_secret() -> None:
    """The cancel secret never shows up in logs via repr()."""
    secret = b"\x8a\x11topsecret"
    assert repr(secret) not in repr(CancelRequest(7, secret))


def test_startup_message_3_0_round_trips_its_parameters() -> None:
    """A protocol 3.0 StartupMessage keeps every parameter, user and database."""
    params = {"user": "alice", "database": "app", "application_name": "psql", "options": ""}
    request = codec.parse_request(_body(codec.startup_message(params)))
    assert request == StartupMessage(3, 0, params)
    assert isinstance(request, StartupMessage)
    assert request.user == "alice"
    assert request.database == "app"


def test_startup_message_3_2_from_postgresql_18_is_accepted() -> None:
    """A PostgreSQL 18 client asking for 3.2 gets a StartupMessage with minor 2."""
    params = {"user": "bob", "_pq_.test_protocol_negotiation": ""}
    request = codec.parse_request(_body(codec.startup_message(params, minor=2)))
    assert request == StartupMessage(3, 2, params)


def test_startup_message_with_non_ascii_utf8_values_is_accepted() -> None:
    """UTF-8 user names and values survive parsing."""
    params = {"user": "jürgen", "application_name": "日本"}
    request = codec.parse_request(_body(codec.startup_message(params)))
    assert isinstance(request, StartupMessage)
    assert request.parameters == params


def test_startup_message_without_parameters_parses_as_empty() -> None:
    """A StartupMessage with only the terminator has no parameters (user check is later)."""
    request = codec.parse_request(_raw_startup(3, 0, b"\0"))
    assert request == StartupMessage(3, 0, {})


@pytest.mark.parametrize(("major", "minor"), [(2, 0), (4, 0), (1, 0), (0, 0)])
def test_unsupported_protocol_versions_are_refused_with_0a000(major: int, minor: int) -> None:
    """Protocol 2.0, 4.0 etc. get feature_not_supported, as PostgreSQL answers."""
    with pytest.raises(ProtocolError) as info:
        codec.parse_request(_raw_startup(major, minor, b"user\0x\0\0"))
    assert info.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED
    assert f"{major}.{minor}" in info.value.message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="no-terminator-at-all"),
        pytest.param(b"user\0bob\0", id="missing-final-terminator"),
        pytest.param(b"user\0bob", id="value-not-terminated"),
        pytest.param(b"user\0\0", id="name-without-value"),
        pytest.param(b"user\0bob\0database\0\0", id="second-name-without-value"),
        pytest.param(b"\0bob\0\0", id="empty-name"),
        pytest.param(b"user\0b\xffb\0\0", id="value-not-utf8"),
        pytest.param(b"us\xc3\0bob\0\0", id="name-not-utf8"),
    ],
)
def test_malformed_startup_parameter_lists_are_refused_with_08p01(body: bytes) -> None:
    """Broken parameter lists in a StartupMessage are a protocol violation."""
    with pytest.raises(ProtocolError) as info:
        codec.parse_request(_raw_startup(3, 0, body))
    assert info.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00\x03\x00"])
def test_request_shorter_than_a_version_code_is_refused(payload: bytes) -> None:
    """A packet body too short to hold a version/request code is refused."""
    with pytest.raises(ProtocolError) as info:
        codec.parse_request(payload)
    assert info.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


def test_startup_message_encoder_refuses_nul_in_values() -> None:
    """A NUL inside a parameter cannot be encoded (it would split the list)."""
    with pytest.raises(ValueError):
        codec.startup_message({"user": "a\0b"})


# --- round trips of the other encoders ---------------------------------------------------


def _typed(data: bytes) -> tuple[bytes, bytes]:
    """Split one encoded typed message into (kind, payload) through the real framer."""
    framer = MessageFramer()
    framer.feed(data)
    msg = framer.next_message()
    assert msg is not None
    assert framer.buffered == 0
    return msg.kind, msg.payload


def test_error_response_round_trips_through_parse_error_fields() -> None:
    """Every field written by error_response comes back from parse_error_fields."""
    kind, payload = _typed(
        codec.error_response(
            'role "x" does not exist',
            sqlstate.INVALID_AUTHORIZATION,
            detail="some detail",
            hint="a hint",
        )
    )
    assert kind == b"E"
    error = codec.parse_error_fields(payload)
    assert error.severity == "FATAL"
    assert error.sqlstate == sqlstate.INVALID_AUTHORIZATION
    assert error.message == 'role "x" does not exist'
    assert error.fields["D"] == "some detail"
    assert error.fields["H"] == "a hint"
    assert str(error) == 'FATAL 28000: role "x" does not exist'


def test_error_from_fields_round_trips_arbitrary_fields_and_kind() -> None:
    """A NoticeResponse built from fields parses back to the same fields."""
    fields = {"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": "hello, wörld", "W": ""}
    kind, payload = _typed(codec.error_from_fields(fields, kind=b"N"))
    assert kind == b"N"
    assert codec.parse_error_fields(payload).fields == fields


def test_parse_error_fields_refuses_unterminated_field() -> None:
    """An error field without its NUL is a protocol error, not an IndexError."""
    with pytest.raises(ProtocolError):
        codec.parse_error_fields(b"Mno terminator")


def test_server_error_defaults_when_fields_are_missing() -> None:
    """An ErrorResponse without S/C/M still reads as ERROR XX000."""
    error = codec.parse_error_fields(b"\0")
    assert (error.severity, error.sqlstate, error.message) == ("ERROR", "XX000", "")


@pytest.mark.parametrize("secret", [b"\x01\x02\x03\x04", bytes(range(32)), b"k" * 256])
def test_backend_key_data_round_trips(secret: bytes) -> None:
    """BackendKeyData keeps the pid (also negative ones) and any secret length."""
    for pid in (0, 12345, -5):
        kind, payload = _typed(codec.backend_key_data(pid, secret))
        assert kind == b"K"
        assert codec.parse_backend_key_data(payload) == (pid, secret)


def test_backend_key_data_shorter_than_8_bytes_is_refused() -> None:
    """A BackendKeyData without a 4-byte secret is refused."""
    with pytest.raises(ProtocolError):
        codec.parse_backend_key_data(b"\0\0\0\1abc")


@pytest.mark.parametrize("data", [b"", b"n,,n=,r=abc", bytes(range(256))])
def test_sasl_initial_response_round_trips(data: bytes) -> None:
    """SASLInitialResponse keeps the mechanism name and the exact client-first bytes."""
    kind, payload = _typed(codec.sasl_initial_response(codec.SCRAM_SHA_256_PLUS, data))
    assert kind == b"p"
    assert codec.parse_sasl_initial_response(payload) == (codec.SCRAM_SHA_256_PLUS, data)


def test_sasl_initial_response_length_minus_one_means_no_data() -> None:
    """A data length of -1 (no initial response) parses as empty data."""
    payload = b"SCRAM-SHA-256\0" + struct.pack("!i", -1)
    assert codec.parse_sasl_initial_response(payload) == ("SCRAM-SHA-256", b"")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"SCRAM-SHA-256", id="no-nul"),
        pytest.param(b"SCRAM-SHA-256\0\0\0", id="short-length"),
        pytest.param(b"SCRAM-SHA-256\0" + struct.pack("!i", 5) + b"abc", id="length-too-big"),
        pytest.param(b"SCRAM-SHA-256\0" + struct.pack("!i", 1) + b"abc", id="length-too-small"),
    ],
)
def test_malformed_sasl_initial_response_is_refused(payload: bytes) -> None:
    """A SASLInitialResponse whose length does not match its data is refused."""
    with pytest.raises(ProtocolError):
        codec.parse_sasl_initial_response(payload)


def test_auth_sasl_lists_its_mechanisms_in_order() -> None:
    """AuthenticationSASL round-trips its mechanism list."""
    kind, payload = _typed(codec.auth_sasl([codec.SCRAM_SHA_256_PLUS, codec.SCRAM_SHA_256]))
    assert kind == b"R"
    request = codec.parse_auth_request(payload)
    assert request.code == codec.AUTH_SASL
    assert request.sasl_mechanisms() == [codec.SCRAM_SHA_256_PLUS, codec.SCRAM_SHA_256]


@pytest.mark.parametrize("data", [b"", b"SCRAM-SHA-256", b"SCRAM-SHA-256\0"])
def test_malformed_sasl_mechanism_list_is_refused(data: bytes) -> None:
    """A mechanism list without its double terminator is refused."""
    with pytest.raises(ProtocolError):
        codec.AuthRequest(codec.AUTH_SASL, data).sasl_mechanisms()


def test_parse_password_message_round_trips_and_refuses_embedded_nul() -> None:
    """PasswordMessage parses back; a NUL inside it is refused."""
    _, payload = _typed(codec.password_message("md5abc"))
    assert codec.parse_password_message(payload) == "md5abc"
    with pytest.raises(ProtocolError):
        codec.parse_password_message(b"a\0b\0")


def test_negotiate_protocol_version_lists_newest_minor_and_options() -> None:
    """NegotiateProtocolVersion carries 3.<minor>, the option count and the names."""
    kind, payload = _typed(codec.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"]))
    assert kind == b"v"
    version, count = struct.unpack_from("!ii", payload)
    assert (version, count) == (3 << 16, 2)
    assert payload[8:] == b"_pq_.a\0_pq_.b\0"


# --- StartupFramer ------------------------------------------------------------------------


def _split_everywhere(data: bytes) -> list[list[bytes]]:
    """Every way of cutting `data` into two chunks, plus byte-at-a-time."""
    cuts = [[data[:i], data[i:]] for i in range(len(data) + 1)]
    return [*cuts, [data[i : i + 1] for i in range(len(data))]]


def _drain_startup(framer: StartupFramer) -> list[bytes]:
    out = []
    while (body := framer.next_packet()) is not None:
        out.append(body)
    return out


def test_startup_framer_reassembles_packets_split_at_every_byte() -> None:
    """Two startup packets come out whole however the stream is cut."""
    stream = codec.ssl_request() + codec.startup_message({"user": "u", "database": "d"})
    expected = [
        _body(codec.ssl_request()),
        _body(codec.startup_message({"user": "u", "database": "d"})),
    ]
    for chunks in _split_everywhere(stream):
        framer = StartupFramer()
        got: list[bytes] = []
        for chunk in chunks:
            framer.feed(chunk)
            got += _drain_startup(framer)
        assert got == expected
        assert framer.buffered == 0


def test_startup_framer_returns_none_until_a_packet_is_complete() -> None:
    """A partial packet yields nothing and stays buffered."""
    framer = StartupFramer()
    packet = codec.startup_message({"user": "u"})
    framer.feed(packet[:-1])
    assert framer.next_packet() is None
    assert framer.buffered == len(packet) - 1
    framer.feed(packet[-1:])
    assert framer.next_packet() == _body(packet)


@pytest.mark.parametrize("length", [-1, 0, 4, 7, MAX_STARTUP_PACKET + 1, 0x16030100])
def test_startup_framer_refuses_lengths_outside_limits(length: int) -> None:
    """Lengths below 8 or above 10000 (e.g. a raw TLS ClientHello) are refused at once."""
    framer = StartupFramer()
    framer.feed(struct.pack("!i", length))
    with pytest.raises(ProtocolError) as info:
        framer.next_packet()
    assert info.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


def test_startup_framer_accepts_the_limits_themselves() -> None:
    """Exactly 8 and exactly 10000 bytes are valid packet lengths."""
    for size in (8, MAX_STARTUP_PACKET):
        framer = StartupFramer()
        framer.feed(_untyped(b"x" * (size - 4)))
        assert framer.next_packet() == b"x" * (size - 4)


def test_startup_framer_take_rest_returns_pipelined_bytes() -> None:
    """Bytes after the last packet come back from take_rest, and the buffer empties."""
    framer = StartupFramer()
    framer.feed(codec.ssl_request() + b"\x16\x03\x01")
    assert framer.next_packet() == _body(codec.ssl_request())
    assert framer.buffered == 3
    assert framer.take_rest() == b"\x16\x03\x01"
    assert framer.buffered == 0
    assert framer.next_packet() is None


# --- MessageFramer ------------------------------------------------------------------------


def _drain(framer: MessageFramer) -> list[Message]:
    out = []
    while (msg := framer.next_message()) is not None:
        out.append(msg)
    return out


def test_message_framer_reassembles_messages_split_at_every_byte() -> None:
    """Several typed messages come out whole and in order however the stream is cut."""
    parts = [
        codec.auth_ok(),
        codec.parameter_status("server_version", "16.4"),
        codec.message(b"X"),
        codec.backend_key_data(1, b"abcd"),
        codec.ready_for_query(),
    ]
    stream = b"".join(parts)
    expected = [Message(*_typed(p)) for p in parts]
    for chunks in _split_everywhere(stream):
        framer = MessageFramer()
        got: list[Message] = []
        for chunk in chunks:
            framer.feed(chunk)
            got += _drain(framer)
        assert got == expected
        assert framer.buffered == 0


def test_message_encode_reproduces_the_wire_bytes() -> None:
    """A framed Message re-encodes to exactly the bytes it came from."""
    raw = codec.parameter_status("TimeZone", "UTC")
    assert Message(*_typed(raw)).encode() == raw


@pytest.mark.parametrize("length", [-1, 0, 3, MAX_HANDSHAKE_MESSAGE + 1])
def test_message_framer_refuses_lengths_outside_limits(length: int) -> None:
    """A length under 4 or over the handshake cap is refused before buffering the body."""
    framer = MessageFramer()
    framer.feed(b"R" + struct.pack("!i", length))
    with pytest.raises(ProtocolError):
        framer.next_message()


def test_message_framer_honours_a_custom_maximum() -> None:
    """max_size bounds the accepted length exactly."""
    framer = MessageFramer(max_size=10)
    framer.feed(codec.message(b"p", b"123456"))
    assert framer.next_message() == Message(b"p", b"123456")
    framer.feed(codec.message(b"p", b"1234567"))
    with pytest.raises(ProtocolError):
        framer.next_message()


def test_message_framer_take_rest_hands_over_trailing_bytes() -> None:
    """Bytes past the last whole message (relay data) come back from take_rest."""
    framer = MessageFramer()
    tail = codec.message(b"Q", b"SELECT 1\0")[:7]
    framer.feed(codec.ready_for_query() + tail)
    assert framer.next_message() == Message(b"Z", b"I")
    assert framer.next_message() is None
    assert framer.buffered == len(tail)
    assert framer.take_rest() == tail
    assert framer.buffered == 0


def test_any_last_byte_terminates_the_parameters() -> None:
    """PostgreSQL checks where the terminator is, never its value."""
    body = struct.pack("!i", codec.PROTOCOL_3_0) + b"user\0bob\0\x01"
    assert codec.parse_request(body) == StartupMessage(3, 0, {"user": "bob"})


@pytest.mark.parametrize("params", [b"", b"user\0bob\0", b"user\0bob\0xy"])
def test_parameters_that_end_elsewhere_are_a_bad_layout(params: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.parse_request(struct.pack("!i", codec.PROTOCOL_3_0) + params)
    assert info.value.message == "invalid startup packet layout: expected terminator as last byte"


@pytest.mark.parametrize(("major", "old"), [(0, True), (1, True), (2, True), (4, False)])
def test_only_a_version_below_3_is_refused_in_the_old_format(major: int, old: bool) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.parse_request(struct.pack("!i", major << 16) + b"user\0u\0\0")
    assert isinstance(info.value, OldProtocolError) is old
    assert info.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED


def test_an_old_style_error_is_the_text_and_a_nul() -> None:
    assert codec.old_style_error("no") == b"EFATAL:  no\n\0"
