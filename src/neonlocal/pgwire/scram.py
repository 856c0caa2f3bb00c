"""SCRAM-SHA-256 in both directions; the only module that imports scramp.

Upstream (we are the client) uses scramp's ScramClient, with ``tls-server-end-point`` channel
binding computed from the server certificate the proxy hands us as DER bytes.

Locally (we are the server) scramp's ScramServer cannot be used: libpq sends an empty SCRAM
user name (``n=,r=...``, because PostgreSQL takes the role from the startup packet) and scramp
rejects empty attribute values. The server side of RFC 5802 is a few HMACs, so it lives here,
with scramp still deriving the stored keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from enum import Enum

import scramp
from scramp.core import CBindData

from neonlocal.pgwire import sqlstate
from neonlocal.pgwire.codec import SCRAM_SHA_256, SCRAM_SHA_256_PLUS
from neonlocal.pgwire.errors import ProtocolError

CB_TYPE = "tls-server-end-point"
# PostgreSQL uses 4096; anything far above would block the event loop for seconds.
MAX_ITERATIONS = 100_000


def end_point_hash(certificate_der: bytes) -> bytes:
    """RFC 5929 tls-server-end-point data: the certificate hashed with its signature hash."""
    return bytes(CBindData.from_der(certificate_der))


class ChannelBindingPolicy(Enum):
    PREFER = "prefer"
    REQUIRE = "require"
    DISABLE = "disable"


class ScramClientExchange:
    """Our side of SCRAM towards the upstream server."""

    def __init__(
        self,
        offered: list[str],
        user: str,
        password: str,
        *,
        certificate_der: bytes | None,
        policy: ChannelBindingPolicy,
    ) -> None:
        bind = (
            certificate_der is not None
            and policy is not ChannelBindingPolicy.DISABLE
            and SCRAM_SHA_256_PLUS in offered
        )
        if policy is ChannelBindingPolicy.REQUIRE and not bind:
            raise ProtocolError(
                "channel binding is required, but the server did not offer SCRAM-SHA-256-PLUS",
                sqlstate.UNABLE_TO_CONNECT,
            )
        if not bind and SCRAM_SHA_256 not in offered:
            raise ProtocolError(
                f"the server offers none of the SASL mechanisms neonlocal supports: {offered}",
                sqlstate.UNABLE_TO_CONNECT,
            )
        cb = None
        if certificate_der is not None and policy is not ChannelBindingPolicy.DISABLE:
            # Passing the binding even for plain SCRAM makes scramp send gs2 flag "y":
            # "I could bind, you did not offer it" - what libpq sends, and what lets a
            # server that did offer PLUS detect a downgrade.
            cb = (CB_TYPE, end_point_hash(certificate_der))
        mechanisms = [SCRAM_SHA_256_PLUS] if bind else [SCRAM_SHA_256]
        try:
            self._client = scramp.ScramClient(mechanisms, user or "*", password, channel_binding=cb)
        except scramp.ScramException as exc:
            raise ProtocolError(f"SCRAM setup failed: {exc}", sqlstate.UNABLE_TO_CONNECT) from None
        self.mechanism: str = self._client.mechanism_name
        self.channel_bound = bind

    def client_first(self) -> bytes:
        """The client-first message with an empty user name (``n=,``), as libpq sends it.

        PostgreSQL takes the role from the StartupMessage and ignores this one; Neon's edge
        accepts an empty one and only tolerates others (proxy/src/sasl/ in neondatabase/neon).
        scramp insists on a user name, so its message is rewritten, together with the bare
        part that its client proof signs.
        """
        first: str = self._client.get_client_first()
        bare: str = self._client.client_first_bare
        _user, _, rest = bare.partition(",")  # the user is escaped: it holds no comma
        anonymous = "n=," + rest
        self._client.client_first_bare = anonymous
        return (first[: len(first) - len(bare)] + anonymous).encode()

    def client_final(self, server_first: bytes) -> bytes:
        iterations = dict(_attributes_lenient(server_first)).get(b"i", b"0")
        if not iterations.isdigit() or int(iterations) > MAX_ITERATIONS:
            # Each iteration is a hash on the event loop: refuse a server asking for minutes.
            raise ProtocolError(
                "the server asked for an unreasonable SCRAM iteration count",
                sqlstate.CONNECTION_FAILURE,
            )
        try:
            self._client.set_server_first(server_first.decode())
            return str(self._client.get_client_final()).encode()
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise ProtocolError(
                f"invalid SCRAM message from server: {exc}", sqlstate.CONNECTION_FAILURE
            ) from None

    def verify_server_final(self, server_final: bytes) -> None:
        try:
            self._client.set_server_final(server_final.decode())
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            raise ProtocolError(
                f"the server's SCRAM signature did not verify: {exc}",
                sqlstate.CONNECTION_FAILURE,
            ) from None


@dataclass(frozen=True)
class ScramSecret:
    """What a server stores for a password: never the password itself."""

    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    iterations: int

    @classmethod
    def from_password(cls, password: str, iterations: int = 4096) -> ScramSecret:
        salt, stored, server, its = scramp.ScramMechanism().make_auth_info(
            password, iteration_count=iterations
        )
        return cls(salt, stored, server, its)


class _ServerStage(Enum):
    START = 1
    SENT_FIRST = 2
    DONE = 3


def _auth_failed() -> ProtocolError:
    return ProtocolError("password authentication failed", sqlstate.INVALID_PASSWORD)


class ScramServerExchange:
    """The server side of SCRAM-SHA-256[-PLUS] towards a local client."""

    def __init__(self, secret: ScramSecret, *, certificate_der: bytes | None = None) -> None:
        self._secret = secret
        self._cb_data = end_point_hash(certificate_der) if certificate_der else None
        self._stage = _ServerStage.START
        self._nonce = ""
        self._gs2 = ""
        self._auth_prefix = ""

    @property
    def mechanisms(self) -> list[str]:
        if self._cb_data is not None:
            return [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        return [SCRAM_SHA_256]

    def server_first(self, mechanism: str, client_first: bytes) -> bytes:
        if self._stage is not _ServerStage.START:
            raise RuntimeError("server_first called twice")
        if mechanism not in self.mechanisms:
            raise ProtocolError(
                f'client selected an invalid SASL authentication mechanism "{mechanism}"',
                sqlstate.PROTOCOL_VIOLATION,
            )
        try:
            text = client_first.decode()
        except UnicodeDecodeError:
            raise ProtocolError("malformed SCRAM message: not UTF-8") from None
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ProtocolError("malformed SCRAM message: no GS2 header")
        flag, authzid, bare = parts
        if authzid:
            raise ProtocolError("client uses authorization identity, which is not supported")
        plus = mechanism == SCRAM_SHA_256_PLUS
        if flag.startswith("p="):
            if not plus or flag[2:] != CB_TYPE:
                raise ProtocolError(
                    "SCRAM channel binding negotiation error: "
                    "client requested binding the server did not offer"
                )
        elif plus:
            raise ProtocolError("SCRAM channel binding negotiation error: PLUS without binding")
        elif flag == "y":
            if self._cb_data is not None:
                # We offered PLUS; a client that says we did not is being downgraded.
                raise ProtocolError(
                    "SCRAM channel binding negotiation error: "
                    "client supports binding but thinks the server does not"
                )
        elif flag != "n":
            raise ProtocolError("malformed SCRAM message: bad GS2 flag")
        attrs = dict(_attributes(bare))
        client_nonce = attrs.get("r", "")
        if not client_nonce or "n" not in attrs:
            raise ProtocolError("malformed SCRAM message: missing nonce or user")
        self._gs2 = f"{flag},{authzid},"
        self._nonce = client_nonce + base64.b64encode(secrets.token_bytes(18)).decode()
        salt = base64.b64encode(self._secret.salt).decode()
        first = f"r={self._nonce},s={salt},i={self._secret.iterations}"
        self._auth_prefix = f"{bare},{first}"
        self._stage = _ServerStage.SENT_FIRST
        return first.encode()

    def server_final(self, client_final: bytes) -> bytes:
        if self._stage is not _ServerStage.SENT_FIRST:
            raise RuntimeError("server_final before server_first")
        self._stage = _ServerStage.DONE
        try:
            text = client_final.decode()
        except UnicodeDecodeError:
            raise ProtocolError("malformed SCRAM message: not UTF-8") from None
        without_proof, sep, proof_attr = text.rpartition(",p=")
        if not sep:
            raise ProtocolError("malformed SCRAM message: no proof")
        attrs = dict(_attributes(without_proof))
        expected_cb = self._gs2.encode()
        if self._gs2.startswith("p="):
            assert self._cb_data is not None
            expected_cb += self._cb_data
        try:
            cb = base64.b64decode(attrs.get("c", ""), validate=True)
            proof = base64.b64decode(proof_attr, validate=True)
        except ValueError:
            raise ProtocolError("malformed SCRAM message: bad base64") from None
        if not hmac.compare_digest(cb, expected_cb):
            raise ProtocolError("SCRAM channel binding check failed", sqlstate.INVALID_PASSWORD)
        if attrs.get("r") != self._nonce:
            raise ProtocolError("malformed SCRAM message: nonce mismatch")
        auth_message = f"{self._auth_prefix},{without_proof}".encode()
        signature = hmac.digest(self._secret.stored_key, auth_message, "sha256")
        if len(proof) != len(signature):
            raise _auth_failed()
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._secret.stored_key):
            raise _auth_failed()
        verifier = hmac.digest(self._secret.server_key, auth_message, "sha256")
        return b"v=" + base64.b64encode(verifier)


def _attributes_lenient(data: bytes) -> list[tuple[bytes, bytes]]:
    pairs = []
    for item in data.split(b","):
        key, sep, value = item.partition(b"=")
        if sep:
            pairs.append((key, value))
    return pairs


def _attributes(text: str) -> list[tuple[str, str]]:
    out = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or len(key) != 1:
            raise ProtocolError("malformed SCRAM message: bad attribute")
        out.append((key, value))
    return out
