"""Local password check (LocalPasswordAuth / ScramServerExchange) and the upstream SCRAM client.

The local side is driven by a minimal RFC 5802 client written here, because libpq sends an
empty SCRAM user name (``n=``) and scramp's own client refuses to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import ssl
from dataclasses import dataclass, field

import pytest
import scramp
from cryptography import x509

from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.pgwire.framing import Message, MessageFramer
from neonlocal.pgwire.frontend import LocalPasswordAuth
from neonlocal.pgwire.scram import (
    ChannelBindingPolicy,
    ScramClientExchange,
    ScramSecret,
    ScramServerExchange,
    end_point_hash,
)
from neonlocal.tls.certs import CertificateAuthority

PASSWORD = "correct horse battery staple"
CB_FLAG = "p=tls-server-end-point"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class LibpqLikeClient:
    """The client side of SCRAM-SHA-256 as libpq speaks it: empty user name, optional binding."""

    password: str
    gs2_flag: str = "n"
    cb_data: bytes = b""
    user: str = ""
    nonce: str = field(default_factory=lambda: _b64(secrets.token_bytes(18)))
    _bare: str = ""
    _auth_message: bytes = b""
    _server_key: bytes = b""

    @property
    def gs2_header(self) -> str:
        return f"{self.gs2_flag},,"

    def first(self) -> bytes:
        self._bare = f"n={self.user},r={self.nonce}"
        return (self.gs2_header + self._bare).encode()

    def final(self, server_first: bytes, *, nonce: str | None = None) -> bytes:
        text = server_first.decode()
        attrs = dict(item.split("=", 1) for item in text.split(","))
        assert attrs["r"].startswith(self.nonce)
        assert len(attrs["r"]) > len(self.nonce)
        salted = hashlib.pbkdf2_hmac(
            "sha256", self.password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        self._server_key = hmac.digest(salted, b"Server Key", "sha256")
        binding = _b64(self.gs2_header.encode() + self.cb_data)
        without_proof = f"c={binding},r={nonce or attrs['r']}"
        self._auth_message = f"{self._bare},{text},{without_proof}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), self._auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={_b64(proof)}".encode()

    def server_signature_ok(self, server_final: bytes) -> bool:
        expected = hmac.digest(self._server_key, self._auth_message, "sha256")
        return hmac.compare_digest(server_final, b"v=" + _b64(expected).encode())


@pytest.fixture(scope="module")
def secret() -> ScramSecret:
    return ScramSecret.from_password(PASSWORD)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def cert_der(ca: CertificateAuthority) -> bytes:
    return ssl.PEM_cert_to_DER_cert(ca.issue(["localhost", "127.0.0.1"]).cert_pem.decode())


@pytest.fixture(scope="module")
def other_cert_der(ca: CertificateAuthority) -> bytes:
    return ssl.PEM_cert_to_DER_cert(ca.issue(["localhost"]).cert_pem.decode())


def _independent_end_point_hash(der: bytes) -> bytes:
    """RFC 5929 computed without scramp: the signature's hash (sha256 if md5/sha1) of the DER."""
    algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
    assert algorithm is not None
    name = algorithm.name if algorithm.name not in ("md5", "sha1") else "sha256"
    return hashlib.new(name, der).digest()


def _one(data: bytes) -> Message:
    framer = MessageFramer()
    framer.feed(data)
    msg = framer.next_message()
    assert msg is not None
    assert framer.buffered == 0
    return msg


def _auth_code(msg: Message) -> int:
    assert msg.kind == b"R"
    return codec.parse_auth_request(msg.payload).code


def _run(
    auth: LocalPasswordAuth, client: LibpqLikeClient, mechanism: str = codec.SCRAM_SHA_256
) -> bytes:
    """Drive a whole exchange over the wire; returns the SASLFinal data."""
    cont = _one(auth.receive(codec.sasl_initial_response(mechanism, client.first())))
    assert _auth_code(cont) == codec.AUTH_SASL_CONTINUE
    final = _one(auth.receive(codec.sasl_response(client.final(cont.payload[4:]))))
    assert _auth_code(final) == codec.AUTH_SASL_FINAL
    assert auth.done
    return final.payload[4:]


# --- LocalPasswordAuth over the wire -------------------------------------------------------


def test_offer_without_certificate_is_plain_scram(secret: ScramSecret) -> None:
    """Without local TLS only SCRAM-SHA-256 is offered."""
    auth = LocalPasswordAuth(secret)
    request = codec.parse_auth_request(_one(auth.start()).payload)
    assert request.code == codec.AUTH_SASL
    assert request.sasl_mechanisms() == [codec.SCRAM_SHA_256]


def test_correct_password_is_accepted_and_server_proves_itself(secret: ScramSecret) -> None:
    """libpq's empty user name (n=) with the right password passes; the v= signature verifies."""
    client = LibpqLikeClient(PASSWORD)
    assert client.first().startswith(b"n,,n=,r=")
    auth = LocalPasswordAuth(secret)
    server_final = _run(auth, client)
    assert client.server_signature_ok(server_final)


def test_wrong_password_is_refused_with_28p01(secret: ScramSecret) -> None:
    """A wrong password ends with invalid_password, after SASLContinue."""
    client = LibpqLikeClient("not the password")
    auth = LocalPasswordAuth(secret)
    cont = _one(auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256, client.first())))
    with pytest.raises(ProtocolError) as info:
        auth.receive(codec.sasl_response(client.final(cont.payload[4:])))
    assert info.value.sqlstate == sqlstate.INVALID_PASSWORD
    assert not auth.done


def test_named_scram_user_is_accepted_too(secret: ScramSecret) -> None:
    """A client that puts a user name in the SCRAM message (as drivers may) also passes."""
    client = LibpqLikeClient(PASSWORD, user="alice")
    assert client.server_signature_ok(_run(LocalPasswordAuth(secret), client))


def test_scramp_client_interoperates(secret: ScramSecret) -> None:
    """A third-party SCRAM client (scramp, non-empty user) logs in and verifies the server."""
    client = scramp.ScramClient([codec.SCRAM_SHA_256], "alice", PASSWORD)
    auth = LocalPasswordAuth(secret)
    first = client.get_client_first().encode()
    cont = _one(auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256, first)))
    client.set_server_first(cont.payload[4:].decode())
    final = _one(auth.receive(codec.sasl_response(client.get_client_final().encode())))
    client.set_server_final(final.payload[4:].decode())  # raises if the signature is wrong
    assert auth.done


def test_exchange_split_into_single_bytes_still_works(secret: ScramSecret) -> None:
    """Client messages arriving one byte at a time are reassembled."""
    client = LibpqLikeClient(PASSWORD)
    auth = LocalPasswordAuth(secret)
    initial = codec.sasl_initial_response(codec.SCRAM_SHA_256, client.first())
    replies = b"".join(auth.receive(initial[i : i + 1]) for i in range(len(initial)))
    cont = _one(replies)
    response = codec.sasl_response(client.final(cont.payload[4:]))
    replies = b"".join(auth.receive(response[i : i + 1]) for i in range(len(response)))
    assert client.server_signature_ok(_one(replies).payload[4:])


@pytest.mark.parametrize("kind", [b"Q", b"X", b"P"])
def test_non_password_message_during_auth_is_refused(secret: ScramSecret, kind: bytes) -> None:
    """A query, Terminate or Parse instead of a SASL answer is a protocol violation."""
    auth = LocalPasswordAuth(secret)
    with pytest.raises(ProtocolError) as info:
        auth.receive(codec.message(kind, b"SELECT 1\0"))
    assert info.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


def test_non_password_message_between_scram_steps_is_refused(secret: ScramSecret) -> None:
    """After SASLContinue, anything but 'p' is refused."""
    client = LibpqLikeClient(PASSWORD)
    auth = LocalPasswordAuth(secret)
    auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256, client.first()))
    with pytest.raises(ProtocolError):
        auth.receive(codec.message(b"Q", b"SELECT 1\0"))


def test_data_after_successful_auth_is_kept_for_whoever_reads_next(secret: ScramSecret) -> None:
    """A query pipelined behind the final SCRAM message is not refused (PostgreSQL reads it
    once the login is done): it waits, whole and in order, for the relay."""
    client = LibpqLikeClient(PASSWORD)
    auth = LocalPasswordAuth(secret)
    cont = _one(auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256, client.first())))
    final = codec.sasl_response(client.final(cont.payload[4:]))
    query = codec.message(b"Q", b"SELECT 1\0")
    assert _one(auth.receive(final + query)).kind == b"R"
    assert auth.done
    assert auth.take_rest() == query


def test_unknown_mechanism_is_refused(secret: ScramSecret) -> None:
    """Selecting a mechanism that was not offered is refused."""
    auth = LocalPasswordAuth(secret)
    with pytest.raises(ProtocolError):
        auth.receive(codec.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=abc"))


def test_plus_without_local_tls_is_refused(secret: ScramSecret) -> None:
    """SCRAM-SHA-256-PLUS cannot be chosen when it was not offered (no certificate)."""
    client = LibpqLikeClient(PASSWORD, gs2_flag=CB_FLAG, cb_data=b"x" * 32)
    auth = LocalPasswordAuth(secret)
    with pytest.raises(ProtocolError):
        auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256_PLUS, client.first()))


def test_authorization_identity_is_refused(secret: ScramSecret) -> None:
    """A gs2 authzid (n,a=bob,) is not supported."""
    auth = LocalPasswordAuth(secret)
    with pytest.raises(ProtocolError):
        auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256, b"n,a=bob,n=,r=abc"))


def test_tampered_nonce_in_client_final_is_refused(secret: ScramSecret) -> None:
    """A client-final whose nonce is not the combined nonce is refused."""
    client = LibpqLikeClient(PASSWORD)
    auth = LocalPasswordAuth(secret)
    cont = _one(auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256, client.first())))
    forged = client.final(cont.payload[4:], nonce=client.nonce + "forged")
    with pytest.raises(ProtocolError):
        auth.receive(codec.sasl_response(forged))


def test_secret_repr_hides_keys(secret: ScramSecret) -> None:
    """ScramSecret's repr never shows the stored or server key."""
    text = repr(secret)
    assert secret.stored_key.hex() not in text
    assert repr(secret.stored_key) not in text
    assert repr(secret.server_key) not in text


# --- channel binding (local TLS) -----------------------------------------------------------


def test_end_point_hash_matches_rfc_5929(cert_der: bytes) -> None:
    """tls-server-end-point data is the certificate hashed with its signature hash."""
    assert end_point_hash(cert_der) == _independent_end_point_hash(cert_der)


def test_offer_with_certificate_includes_plus(secret: ScramSecret, cert_der: bytes) -> None:
    """With a local certificate both SCRAM-SHA-256-PLUS and SCRAM-SHA-256 are offered."""
    auth = LocalPasswordAuth(secret, certificate_der=cert_der)
    mechanisms = codec.parse_auth_request(_one(auth.start()).payload).sasl_mechanisms()
    assert set(mechanisms) == {codec.SCRAM_SHA_256_PLUS, codec.SCRAM_SHA_256}


def test_client_bound_to_the_same_certificate_succeeds(
    secret: ScramSecret, cert_der: bytes
) -> None:
    """SCRAM-SHA-256-PLUS with p=tls-server-end-point over the right certificate passes."""
    client = LibpqLikeClient(
        PASSWORD, gs2_flag=CB_FLAG, cb_data=_independent_end_point_hash(cert_der)
    )
    auth = LocalPasswordAuth(secret, certificate_der=cert_der)
    server_final = _run(auth, client, codec.SCRAM_SHA_256_PLUS)
    assert client.server_signature_ok(server_final)


def test_client_bound_to_a_different_certificate_fails(
    secret: ScramSecret, cert_der: bytes, other_cert_der: bytes
) -> None:
    """A client that saw another certificate (a man in the middle) is refused."""
    client = LibpqLikeClient(
        PASSWORD, gs2_flag=CB_FLAG, cb_data=_independent_end_point_hash(other_cert_der)
    )
    auth = LocalPasswordAuth(secret, certificate_der=cert_der)
    cont = _one(auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256_PLUS, client.first())))
    with pytest.raises(ProtocolError) as info:
        auth.receive(codec.sasl_response(client.final(cont.payload[4:])))
    assert info.value.sqlstate == sqlstate.INVALID_PASSWORD
    assert not auth.done


def test_y_client_is_refused_when_plus_was_offered(secret: ScramSecret, cert_der: bytes) -> None:
    """gs2 flag 'y' ("server cannot bind") after PLUS was offered is a downgrade: refused."""
    client = LibpqLikeClient(PASSWORD, gs2_flag="y")
    auth = LocalPasswordAuth(secret, certificate_der=cert_der)
    with pytest.raises(ProtocolError):
        auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256, client.first()))


def test_y_client_is_accepted_when_plus_was_not_offered(secret: ScramSecret) -> None:
    """gs2 flag 'y' without local TLS is honest and passes."""
    client = LibpqLikeClient(PASSWORD, gs2_flag="y")
    assert client.server_signature_ok(_run(LocalPasswordAuth(secret), client))


def test_n_client_may_skip_binding_over_tls(secret: ScramSecret, cert_der: bytes) -> None:
    """A client that cannot bind at all (gs2 'n', plain SCRAM) passes, as in PostgreSQL."""
    client = LibpqLikeClient(PASSWORD)
    auth = LocalPasswordAuth(secret, certificate_der=cert_der)
    assert client.server_signature_ok(_run(auth, client))


def test_binding_flag_with_plain_mechanism_is_refused(secret: ScramSecret, cert_der: bytes) -> None:
    """p=tls-server-end-point with mechanism SCRAM-SHA-256 (not -PLUS) is refused."""
    client = LibpqLikeClient(PASSWORD, gs2_flag=CB_FLAG, cb_data=end_point_hash(cert_der))
    auth = LocalPasswordAuth(secret, certificate_der=cert_der)
    with pytest.raises(ProtocolError):
        auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256, client.first()))


@pytest.mark.parametrize("flag", ["n", "y", "p=tls-unique"])
def test_plus_mechanism_without_end_point_binding_is_refused(
    secret: ScramSecret, cert_der: bytes, flag: str
) -> None:
    """SCRAM-SHA-256-PLUS with flag n, y or another binding type is refused."""
    client = LibpqLikeClient(PASSWORD, gs2_flag=flag)
    auth = LocalPasswordAuth(secret, certificate_der=cert_der)
    with pytest.raises(ProtocolError):
        auth.receive(codec.sasl_initial_response(codec.SCRAM_SHA_256_PLUS, client.first()))


def test_scramp_plus_client_interoperates(secret: ScramSecret, cert_der: bytes) -> None:
    """scramp's channel-binding client passes against our server over the same certificate."""
    client = scramp.ScramClient(
        [codec.SCRAM_SHA_256_PLUS],
        "alice",
        PASSWORD,
        channel_binding=("tls-server-end-point", _independent_end_point_hash(cert_der)),
    )
    server = ScramServerExchange(secret, certificate_der=cert_der)
    first = server.server_first(codec.SCRAM_SHA_256_PLUS, client.get_client_first().encode())
    client.set_server_first(first.decode())
    final = server.server_final(client.get_client_final().encode())
    client.set_server_final(final.decode())


# --- ScramClientExchange: our side towards the upstream server -----------------------------


def test_upstream_client_requires_plus_when_policy_is_require(cert_der: bytes) -> None:
    """channel_binding=require against a server without PLUS fails with 08001."""
    with pytest.raises(ProtocolError) as info:
        ScramClientExchange(
            [codec.SCRAM_SHA_256],
            "u",
            PASSWORD,
            certificate_der=cert_der,
            policy=ChannelBindingPolicy.REQUIRE,
        )
    assert info.value.sqlstate == sqlstate.UNABLE_TO_CONNECT


def test_upstream_client_refuses_servers_without_scram_sha_256() -> None:
    """A server offering only unknown mechanisms is refused with 08001."""
    with pytest.raises(ProtocolError) as info:
        ScramClientExchange(
            ["SCRAM-SHA-1"], "u", PASSWORD, certificate_der=None, policy=ChannelBindingPolicy.PREFER
        )
    assert info.value.sqlstate == sqlstate.UNABLE_TO_CONNECT


@pytest.mark.parametrize(
    ("offered", "policy", "expected_mechanism", "expected_flag"),
    [
        ([codec.SCRAM_SHA_256_PLUS, codec.SCRAM_SHA_256], "prefer", "SCRAM-SHA-256-PLUS", "p="),
        ([codec.SCRAM_SHA_256], "prefer", "SCRAM-SHA-256", "y,"),
        ([codec.SCRAM_SHA_256_PLUS, codec.SCRAM_SHA_256], "disable", "SCRAM-SHA-256", "n,"),
    ],
)
def test_upstream_client_chooses_mechanism_by_offer_and_policy(
    cert_der: bytes, offered: list[str], policy: str, expected_mechanism: str, expected_flag: str
) -> None:
    """PLUS when offered and allowed; otherwise 'y' (could bind) or 'n' (binding disabled)."""
    exchange = ScramClientExchange(
        offered,
        "u",
        PASSWORD,
        certificate_der=cert_der,
        policy=ChannelBindingPolicy(policy),
    )
    assert exchange.mechanism == expected_mechanism
    assert exchange.channel_bound == (expected_mechanism == codec.SCRAM_SHA_256_PLUS)
    assert exchange.client_first().decode().startswith(expected_flag)


@pytest.mark.parametrize(
    "server_first",
    [b"garbage", b"\xff\xfe", b"r=other,s=c2FsdHNhbHRzYWx0,i=4096", b"e=other-error"],
)
def test_upstream_client_refuses_malformed_server_first(server_first: bytes) -> None:
    """A broken or foreign server-first message is a ProtocolError (08006), not a crash."""
    exchange = ScramClientExchange(
        [codec.SCRAM_SHA_256],
        "u",
        PASSWORD,
        certificate_der=None,
        policy=ChannelBindingPolicy.PREFER,
    )
    exchange.client_first()
    with pytest.raises(ProtocolError) as info:
        exchange.client_final(server_first)
    assert info.value.sqlstate == sqlstate.CONNECTION_FAILURE


def test_upstream_client_refuses_a_wrong_server_signature(secret: ScramSecret) -> None:
    """A server that cannot produce the right v= signature is refused."""
    exchange = ScramClientExchange(
        [codec.SCRAM_SHA_256],
        "u",
        PASSWORD,
        certificate_der=None,
        policy=ChannelBindingPolicy.PREFER,
    )
    server = ScramServerExchange(secret)
    first = server.server_first(codec.SCRAM_SHA_256, exchange.client_first())
    server.server_final(exchange.client_final(first))
    with pytest.raises(ProtocolError):
        exchange.verify_server_final(b"v=" + base64.b64encode(b"\0" * 32))
