"""StartupPhase and negotiate(): what a client sends before authentication."""

from __future__ import annotations

import struct

import pytest

from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.codec import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.pgwire.frontend import Negotiated, Phase, StartupPhase, negotiate

GSSENC_REQUEST = struct.pack("!ii", 8, codec.GSSENC_REQUEST_CODE)
STARTUP = codec.startup_message({"user": "alice", "database": "app"})


def _phase(phase: StartupPhase) -> Phase:
    """Read the phase afresh (mypy would keep an earlier narrowing across method calls)."""
    return phase.phase


def _events(phase: StartupPhase) -> list[codec.Request]:
    out = []
    while (event := phase.next_event()) is not None:
        out.append(event)
    return out


def test_startup_message_alone_ends_the_phase() -> None:
    """A plain StartupMessage yields one event and finishes negotiation."""
    phase = StartupPhase()
    phase.receive_data(STARTUP)
    assert _events(phase) == [StartupMessage(3, 0, {"user": "alice", "database": "app"})]
    assert phase.phase is Phase.DONE
    assert phase.buffered == 0


def test_ssl_request_then_startup_message() -> None:
    """SSLRequest, (proxy answers N), then StartupMessage, as libpq with sslmode=prefer."""
    phase = StartupPhase()
    phase.receive_data(codec.ssl_request())
    assert _events(phase) == [SSLRequest()]
    assert phase.phase is Phase.NEGOTIATING
    assert phase.buffered == 0
    phase.receive_data(STARTUP)
    events = _events(phase)
    assert len(events) == 1
    assert isinstance(events[0], StartupMessage)
    assert events[0].user == "alice"
    assert _phase(phase) is Phase.DONE


def test_gssenc_then_ssl_then_startup_as_libpq_gssencmode_prefer() -> None:
    """libpq with gssencmode=prefer tries GSSENC, then SSL, then starts up: all accepted."""
    phase = StartupPhase()
    phase.receive_data(GSSENC_REQUEST)
    assert _events(phase) == [GSSENCRequest()]
    phase.receive_data(codec.ssl_request())
    assert _events(phase) == [SSLRequest()]
    phase.receive_data(STARTUP)
    assert [type(e) for e in _events(phase)] == [StartupMessage]
    assert phase.phase is Phase.DONE


# What PostgreSQL 15 answers a request it no longer takes: its code read as a version.
UNSUPPORTED_SSL = "unsupported frontend protocol 1234.5679: server supports 3.0 to 3.0"
UNSUPPORTED_GSS = "unsupported frontend protocol 1234.5680: server supports 3.0 to 3.0"


def _refusal(phase: StartupPhase, data: bytes) -> ProtocolError:
    phase.receive_data(data)
    with pytest.raises(ProtocolError) as info:
        phase.next_event()
    return info.value


def test_second_ssl_request_fails_as_an_unsupported_protocol_version() -> None:
    """A repeated SSLRequest is no special request: PostgreSQL refuses 1234.5679 with 0A000."""
    phase = StartupPhase()
    phase.receive_data(codec.ssl_request())
    assert _events(phase) == [SSLRequest()]
    error = _refusal(phase, codec.ssl_request())
    assert (error.sqlstate, error.message) == (sqlstate.FEATURE_NOT_SUPPORTED, UNSUPPORTED_SSL)


def test_second_gssenc_request_fails_as_an_unsupported_protocol_version() -> None:
    phase = StartupPhase()
    phase.receive_data(GSSENC_REQUEST + GSSENC_REQUEST)
    assert phase.next_event() == GSSENCRequest()
    error = _refusal(phase, b"")
    assert (error.sqlstate, error.message) == (sqlstate.FEATURE_NOT_SUPPORTED, UNSUPPORTED_GSS)


def test_no_request_is_taken_once_encryption_began() -> None:
    """After SSLRequest 'S' and the handshake, a GSSENCRequest is refused like a repeat."""
    phase = StartupPhase()
    phase.receive_data(codec.ssl_request())
    assert _events(phase) == [SSLRequest()]
    phase.encryption_began()
    error = _refusal(phase, GSSENC_REQUEST)
    assert (error.sqlstate, error.message) == (sqlstate.FEATURE_NOT_SUPPORTED, UNSUPPORTED_GSS)


def test_declined_requests_do_not_reopen_each_other() -> None:
    """GSSENC 'N', SSL 'N', then either again is refused: declining one request does not make
    the other special again (PostgreSQL since CVE-2026-6479's fix)."""
    for again, message in (
        (codec.ssl_request(), UNSUPPORTED_SSL),
        (GSSENC_REQUEST, UNSUPPORTED_GSS),
    ):
        phase = StartupPhase()
        phase.receive_data(GSSENC_REQUEST)
        assert _events(phase) == [GSSENCRequest()]
        phase.receive_data(codec.ssl_request())
        assert _events(phase) == [SSLRequest()]
        assert _refusal(phase, again).message == message


@pytest.mark.parametrize("params", [{"database": "app"}, {"user": ""}, {}])
def test_startup_without_user_is_refused_with_28000(params: dict[str, str]) -> None:
    """No (or an empty) user name: invalid_authorization_specification, like PostgreSQL."""
    phase = StartupPhase()
    phase.receive_data(codec.startup_message(params))
    with pytest.raises(ProtocolError) as info:
        phase.next_event()
    assert info.value.sqlstate == sqlstate.INVALID_AUTHORIZATION


def test_cancel_request_ends_the_phase() -> None:
    """A CancelRequest is the only event; nothing further is read."""
    phase = StartupPhase()
    phase.receive_data(codec.cancel_request(77, b"\1\2\3\4") + STARTUP)
    assert phase.next_event() == CancelRequest(77, b"\1\2\3\4")
    assert phase.phase is Phase.DONE
    assert phase.next_event() is None
    with pytest.raises(RuntimeError):
        phase.receive_data(b"more")


def test_pg18_cancel_request_with_long_secret_is_accepted() -> None:
    """A 32-byte PostgreSQL 18 cancel secret reaches the proxy intact."""
    secret = bytes(range(32))
    phase = StartupPhase()
    phase.receive_data(codec.cancel_request(-3, secret))
    assert phase.next_event() == CancelRequest(-3, secret)


def test_plaintext_pipelined_after_ssl_request_shows_as_buffered() -> None:
    """Bytes sent right behind an SSLRequest stay buffered, so the proxy can refuse TLS."""
    phase = StartupPhase()
    phase.receive_data(codec.ssl_request() + STARTUP)
    assert phase.next_event() == SSLRequest()
    assert phase.buffered == len(STARTUP)


def test_nothing_buffered_after_a_lone_ssl_request() -> None:
    """An SSLRequest sent on its own leaves nothing behind (TLS may start)."""
    phase = StartupPhase()
    phase.receive_data(codec.ssl_request())
    assert phase.next_event() == SSLRequest()
    assert phase.buffered == 0


def test_bytes_after_startup_message_are_handed_over() -> None:
    """Data pipelined after the StartupMessage comes back from take_rest."""
    phase = StartupPhase()
    phase.receive_data(STARTUP + b"p\0\0")
    assert isinstance(phase.next_event(), StartupMessage)
    assert phase.take_rest() == b"p\0\0"


def test_startup_split_at_every_byte_yields_the_same_events() -> None:
    """However the client's bytes are chunked, the same events come out."""
    stream = GSSENC_REQUEST + codec.ssl_request() + STARTUP
    for cut in range(len(stream) + 1):
        phase = StartupPhase()
        events: list[codec.Request] = []
        for chunk in (stream[:cut], stream[cut:]):
            if phase.phase is Phase.DONE:
                assert chunk == b""
                break
            phase.receive_data(chunk)
            events += _events(phase)
        assert [type(e) for e in events] == [GSSENCRequest, SSLRequest, StartupMessage]


def test_unsupported_protocol_version_is_refused_with_0a000() -> None:
    """A protocol 2.0 client hears feature_not_supported."""
    phase = StartupPhase()
    phase.receive_data(struct.pack("!ii", 8 + 6, 2 << 16) + b"user\0\0")
    with pytest.raises(ProtocolError) as info:
        phase.next_event()
    assert info.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED


# --- negotiate() --------------------------------------------------------------------------


def test_negotiate_leaves_a_3_0_client_alone() -> None:
    """A 3.0 client without _pq_ options needs no NegotiateProtocolVersion."""
    startup = StartupMessage(3, 0, {"user": "u", "database": "d"})
    params, negotiated = negotiate(startup)
    assert params == {"user": "u", "database": "d"}
    assert negotiated is None


def test_negotiate_steps_a_3_2_client_down_to_3_0() -> None:
    """A PostgreSQL 18 (3.2) client is told 3.0, and _pq_ options are listed, not forwarded."""
    startup = StartupMessage(
        3, 2, {"user": "u", "_pq_.compression": "on", "database": "d", "_pq_.other": "x"}
    )
    params, negotiated = negotiate(startup)
    assert params == {"user": "u", "database": "d"}
    assert negotiated == Negotiated(0, ("_pq_.compression", "_pq_.other"))
    assert negotiated.encode() == codec.negotiate_protocol_version(
        0, ["_pq_.compression", "_pq_.other"]
    )


def test_negotiate_reports_pq_options_even_from_a_3_0_client() -> None:
    """A 3.0 client asking for a _pq_ option still gets NegotiateProtocolVersion."""
    params, negotiated = negotiate(StartupMessage(3, 0, {"user": "u", "_pq_.x": "1"}))
    assert params == {"user": "u"}
    assert negotiated == Negotiated(0, ("_pq_.x",))


def test_negotiate_steps_down_a_3_2_client_without_options() -> None:
    """3.2 alone is enough to trigger the step-down, with an empty option list."""
    params, negotiated = negotiate(StartupMessage(3, 2, {"user": "u"}))
    assert params == {"user": "u"}
    assert negotiated == Negotiated(0, ())
    kind, length, version, count = struct.unpack("!ciii", negotiated.encode())
    assert (kind, length, version, count) == (b"v", 12, 3 << 16, 0)


def test_receive_is_one_step_and_result_is_what_ended_the_phase() -> None:
    """receive() feeds and returns the next event; result keeps the StartupMessage."""
    phase = StartupPhase()
    ssl_request = codec.ssl_request()
    assert phase.receive(ssl_request[:3]) is None
    assert phase.receive(ssl_request[3:]) == SSLRequest()
    assert not phase.done
    assert phase.result is None
    startup = phase.receive(STARTUP)
    assert startup == StartupMessage(3, 0, {"user": "alice", "database": "app"})
    assert phase.done
    assert phase.result == startup
    assert phase.receive(b"") is None


def test_a_request_with_a_body_is_the_request() -> None:
    """PostgreSQL reads only the code of an SSLRequest or GSSENCRequest; the rest is ignored."""
    phase = StartupPhase()
    phase.receive_data(struct.pack("!ii", 12, codec.SSL_REQUEST_CODE) + b"xxxx")
    assert _events(phase) == [SSLRequest()]
    phase.receive_data(struct.pack("!ii", 9, codec.GSSENC_REQUEST_CODE) + b"\0")
    assert _events(phase) == [GSSENCRequest()]
    assert phase.buffered == 0
