"""Hostile bytes never crash the protocol layer: only ProtocolError / UpstreamRejected escape.

Anything else (IndexError, struct.error, UnicodeDecodeError, ValueError, scramp's own
exceptions...) would surface in the proxy as an unhandled crash instead of a clean FATAL.
"""

from __future__ import annotations

import base64
import itertools
import ssl
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from neonlocal.pgwire import codec
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.pgwire.framing import Message, MessageFramer
from neonlocal.pgwire.frontend import LocalPasswordAuth, Phase, StartupPhase
from neonlocal.pgwire.login import (
    Credentials,
    LoginState,
    UpstreamLogin,
    UpstreamRejected,
    upstream_login,
)
from neonlocal.pgwire.scram import ChannelBindingPolicy, ScramSecret
from neonlocal.tls.certs import CertificateAuthority

SECRET = ScramSecret.from_password("fuzz-password")
CERT_DER = ssl.PEM_cert_to_DER_cert(
    CertificateAuthority.create().issue(["localhost"]).cert_pem.decode()
)
SCRAM_MECHANISMS = [codec.SCRAM_SHA_256, codec.SCRAM_SHA_256_PLUS, "SCRAM-SHA-1", "", "x\x01"]
AUTH_CODES = [0, 2, 3, 5, 7, 8, 9, 10, 11, 12, -1, 1 << 30]

FUZZ = settings(
    deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow], database=None
)


# --- helpers ------------------------------------------------------------------------------------


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def chunked(draw: st.DrawFn, data: st.SearchStrategy[bytes]) -> list[bytes]:
    """The bytes of `data` cut into an arbitrary number of arbitrary pieces."""
    raw = draw(data)
    cuts = draw(st.lists(st.integers(0, max(len(raw), 1)), max_size=8))
    return _cut(raw, cuts)


@contextmanager
def only_protocol_errors() -> Iterator[None]:
    """Refusals are fine; they are how a bad peer must be answered. Anything else fails."""
    with suppress(ProtocolError, UpstreamRejected):
        yield


def _packet(code: int, body: bytes) -> bytes:
    return struct.pack("!ii", len(body) + 8, code) + body


startup_codes = st.sampled_from(
    [
        codec.SSL_REQUEST_CODE,
        codec.GSSENC_REQUEST_CODE,
        codec.CANCEL_REQUEST_CODE,
        codec.PROTOCOL_3_0,
        codec.PROTOCOL_3_0 | 2,
        2 << 16,
        4 << 16,
    ]
) | st.integers(-(2**31), 2**31 - 1)

# Bodies that look like parameter lists part of the time: NULs in random places.
param_bodies = st.lists(
    st.binary(max_size=12) | st.sampled_from([b"user", b"database", b"_pq_.x", b"\xff", b""]),
    max_size=6,
).map(lambda items: b"\0".join(items) + b"\0" * (len(items) % 3))

startup_packets = st.builds(_packet, startup_codes, param_bodies | st.binary(max_size=300))


def _message(kind: bytes, payload: bytes) -> bytes:
    return codec.message(kind, payload)


auth_requests = st.builds(
    lambda code, data: codec.message(b"R", struct.pack("!i", code) + data),
    st.sampled_from(AUTH_CODES),
    st.binary(max_size=40)
    | st.lists(st.sampled_from(SCRAM_MECHANISMS)).map(
        lambda ms: b"".join(m.encode() + b"\0" for m in ms) + b"\0"
    ),
)
server_messages = (
    auth_requests
    | st.builds(
        _message, st.sampled_from([b"S", b"K", b"N", b"Z", b"E", b"v"]), st.binary(max_size=60)
    )
    | st.builds(_message, st.binary(min_size=1, max_size=1), st.binary(max_size=20))
)


# --- StartupPhase -----------------------------------------------------------------------------


def _drive_startup(chunks: list[bytes]) -> None:
    phase = StartupPhase()
    with only_protocol_errors():
        for chunk in chunks:
            if phase.phase is Phase.DONE:
                break
            phase.receive_data(chunk)
            while (event := phase.next_event()) is not None:
                assert isinstance(event, codec.Request)


@FUZZ
@given(chunked(st.binary(max_size=200)))
def test_startup_phase_survives_arbitrary_bytes(chunks: list[bytes]) -> None:
    """Random client bytes, however chunked, only ever end in a ProtocolError."""
    _drive_startup(chunks)


@FUZZ
@given(chunked(st.lists(startup_packets, max_size=4).map(b"".join)))
def test_startup_phase_survives_valid_length_packets(chunks: list[bytes]) -> None:
    """Well-framed packets with random codes and bodies only ever end in a ProtocolError."""
    _drive_startup(chunks)


# --- MessageFramer ------------------------------------------------------------------------------


@FUZZ
@given(chunked(st.binary(max_size=200)))
def test_message_framer_survives_arbitrary_bytes(chunks: list[bytes]) -> None:
    """Random bytes either frame into messages that re-encode to the input, or are refused."""
    framer = MessageFramer()
    got: list[Message] = []
    with only_protocol_errors():
        for chunk in chunks:
            framer.feed(chunk)
            while (msg := framer.next_message()) is not None:
                got.append(msg)
        assert b"".join(m.encode() for m in got) + framer.take_rest() == b"".join(chunks)


@FUZZ
@given(
    st.lists(
        st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=100)), max_size=6
    ).flatmap(
        lambda msgs: st.tuples(
            st.just(msgs),
            chunked(st.just(b"".join(codec.message(k, p) for k, p in msgs))),
        )
    )
)
def test_message_framer_reproduces_valid_messages(
    case: tuple[list[tuple[bytes, bytes]], list[bytes]],
) -> None:
    """Valid messages with random bodies come out exactly, whatever the chunking."""
    messages, chunks = case
    framer = MessageFramer()
    got: list[Message] = []
    for chunk in chunks:
        framer.feed(chunk)
        while (msg := framer.next_message()) is not None:
            got.append(msg)
    assert got == [Message(k, p) for k, p in messages]
    assert framer.buffered == 0


# --- LocalPasswordAuth ------------------------------------------------------------------------


def _drive_local_auth(chunks: list[bytes], *, with_cert: bool) -> None:
    auth = LocalPasswordAuth(SECRET, certificate_der=CERT_DER if with_cert else None)
    auth.start()
    with only_protocol_errors():
        for chunk in chunks:
            auth.receive(chunk)


@FUZZ
@given(chunked(st.binary(max_size=200)), st.booleans())
def test_local_auth_survives_arbitrary_bytes(chunks: list[bytes], with_cert: bool) -> None:
    """Random bytes from a local client only ever end in a ProtocolError."""
    _drive_local_auth(chunks, with_cert=with_cert)


scram_text = st.text(
    alphabet=st.sampled_from(list("nyprcsiva=,+/0123456789ABCxyz\x00é")), max_size=60
)
gs2_headers = st.sampled_from(
    ["n,,", "y,,", "p=tls-server-end-point,,", "p=tls-unique,,", "n,a=x,", "q,,", ""]
)
client_firsts = st.builds(
    lambda gs2, bare: (gs2 + bare).encode(),
    gs2_headers,
    st.sampled_from(["n=,r=abc", "n=user,r=x", "r=abc", "n=,r=", "n=,r=a,x=1", "n=,r=é"])
    | scram_text,
)


@FUZZ
@given(
    st.sampled_from([codec.SCRAM_SHA_256, codec.SCRAM_SHA_256_PLUS])
    | st.sampled_from(SCRAM_MECHANISMS),
    client_firsts,
    st.binary(max_size=120) | scram_text.map(str.encode),
    st.sampled_from([0] * 8 + [1, -1]),
    st.booleans(),
)
def test_local_auth_survives_structured_scram_messages(
    mechanism: str, first: bytes, final: bytes, length_error: int, with_cert: bool
) -> None:
    """Plausible SASL messages with broken SCRAM contents only ever end in a ProtocolError."""
    payload = mechanism.encode().replace(b"\0", b"") + b"\0"
    payload += struct.pack("!i", len(first) + length_error) + first
    initial = codec.message(b"p", payload)
    _drive_local_auth([initial, codec.sasl_response(final)], with_cert=with_cert)


@FUZZ
@given(st.data())
def test_local_auth_survives_forged_proofs(data: st.DataObject) -> None:
    """A client-final with the right nonce but junk binding/proof is refused, not crashed."""
    auth = LocalPasswordAuth(SECRET)
    first = codec.sasl_initial_response(codec.SCRAM_SHA_256, b"n,,n=,r=fuzznonce")
    reply = auth.receive(first)
    server_first = reply[9:].decode()
    nonce = dict(item.split("=", 1) for item in server_first.split(","))["r"]
    binding = data.draw(st.sampled_from(["biws", "", "eSws", "!!", "bixh"]))
    proof = data.draw(
        st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()) | scram_text
    )
    final = f"c={binding},r={nonce},p={proof}".encode()
    with only_protocol_errors():
        auth.receive(codec.sasl_response(final))
        raise AssertionError("a forged proof was accepted")


# --- UpstreamLogin.receive_upstream -----------------------------------------------------------


def _login(mode: str) -> UpstreamLogin:
    creds = {
        "relay": None,
        "prefer": Credentials("u", "p"),
        "require": Credentials("u", "p", ChannelBindingPolicy.REQUIRE),
    }[mode]
    return upstream_login(
        {"user": "u", "database": "d"},
        credentials=creds,
        certificate_der=CERT_DER,
        extra_status={"neonlocal.branch": "main"},
    )


modes = st.sampled_from(["relay", "prefer", "require"])


def _drive_login(login: UpstreamLogin, chunks: list[bytes]) -> None:
    with only_protocol_errors():
        for chunk in chunks:
            out = login.receive_upstream(chunk)
            if login.state is LoginState.READY:
                # From here on bytes are relayed as they come, partial messages included.
                break
            # Until then, whatever reaches the client is always well framed.
            framer = MessageFramer()
            framer.feed(out.to_client)
            while framer.next_message() is not None:
                pass
            assert framer.buffered == 0


@FUZZ
@given(modes, chunked(st.binary(max_size=200)))
def test_upstream_login_survives_arbitrary_bytes(mode: str, chunks: list[bytes]) -> None:
    """Random server bytes only ever end in ProtocolError or UpstreamRejected."""
    _drive_login(_login(mode), chunks)


@FUZZ
@given(
    modes,
    chunked(
        st.builds(
            bytes.__add__,
            st.sampled_from([b"", codec.auth_ok()]),
            st.lists(server_messages, max_size=8).map(b"".join),
        )
    ),
)
def test_upstream_login_survives_valid_length_messages(mode: str, chunks: list[bytes]) -> None:
    """Well-framed server messages in random order with random bodies never crash the login."""
    _drive_login(_login(mode), chunks)


VALID_SALT = "c2FsdHNhbHRzYWx0c2FsdA=="


@settings(FUZZ, max_examples=200)
@given(st.data(), st.sampled_from(["prefer", "require"]))
def test_upstream_login_survives_hostile_scram_server(data: st.DataObject, mode: str) -> None:
    """A server answering our real client-first with junk SCRAM messages cannot crash us."""
    login = _login(mode)
    with only_protocol_errors():
        out = login.receive_upstream(
            codec.auth_sasl([codec.SCRAM_SHA_256_PLUS, codec.SCRAM_SHA_256])
        )
        _, client_first = codec.parse_sasl_initial_response(out.to_upstream[5:])
        client_nonce = client_first.decode().rsplit("r=", 1)[1]
        # Mostly one field away from valid, so the later checks get exercised too.
        nonce = data.draw(
            st.sampled_from([client_nonce + "srv"] * 4 + [client_nonce, "other", ""]) | scram_text
        )
        salt = data.draw(st.sampled_from([VALID_SALT] * 6 + ["", "!!", "c2FsdA==", "=", "é"]))
        # Iteration counts stay small: a valid count means a real PBKDF2 run.
        iterations = data.draw(
            st.sampled_from(
                ["4096"] * 4 + ["1", "0", "", "-5", "4096x", "\u0664\u0660\u0669\u0666"]
            )
        )
        extra = data.draw(st.sampled_from([""] * 4 + [",x=1", ",m=1", ",", ",i=4096"]))
        server_first = data.draw(
            st.just(f"r={nonce},s={salt},i={iterations}{extra}")
            | st.just(f"r={nonce},s={salt},i={iterations}{extra}")
            | scram_text
            | st.just("e=invalid-proof")
        )
        login.receive_upstream(codec.auth_sasl_continue(server_first.encode()))
        server_final = data.draw(
            st.sampled_from(["v=" + "A" * 44, "v=", "e=other-error", "e=bogus", "v=!!"])
            | scram_text
        )
        login.receive_upstream(
            codec.auth_sasl_final(server_final.encode()) + codec.auth_ok() + codec.ready_for_query()
        )
        raise AssertionError("a server without the password completed the login")
    assert login.state is not LoginState.READY


@FUZZ
@given(chunked(st.lists(server_messages, max_size=6).map(b"".join)), st.binary(max_size=80))
def test_relay_client_side_survives_arbitrary_bytes(chunks: list[bytes], client: bytes) -> None:
    """In relay mode, random client bytes during login only ever end in a ProtocolError."""
    login = _login("relay")
    with only_protocol_errors():
        for chunk in chunks:
            login.receive_upstream(chunk)
            if login.awaiting_client:
                login.receive_client(client)


def test_fuzz_helpers_cut_without_losing_bytes() -> None:
    """The chunking helper keeps every byte, in order (the fuzz tests rely on it)."""
    data = bytes(range(50))
    cases: list[Callable[[], list[int]]] = [
        lambda: [],
        lambda: [0, 50, 99],
        lambda: [25, 3, 25, 49],
    ]
    for cuts in cases:
        assert b"".join(_cut(data, cuts())) == data
