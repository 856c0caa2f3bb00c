"""Encoders and decoders for the individual messages neonlocal reads or writes.

Only the startup and authentication phases are parsed; after the first ReadyForQuery the
proxy relays bytes without looking at them, so nothing here is on the hot path.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from neonlocal.pgwire import sqlstate
from neonlocal.pgwire.errors import (
    OldProtocolError,
    ProtocolError,
    ServerError,
    UnansweredProtocolError,
)

# Special request codes sent in place of a protocol version (PostgreSQL pqcomm.h).
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102
PROTOCOL_3_0: Final = 3 << 16

# Authentication request codes carried by an 'R' message.
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

SCRAM_SHA_256: Final = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS: Final = "SCRAM-SHA-256-PLUS"

# The one-byte answers to an SSLRequest or GSSENCRequest: go ahead with TLS, or carry on
# unencrypted. They are not framed messages.
ENCRYPTION_ACCEPTED: Final = b"S"
ENCRYPTION_REFUSED: Final = b"N"

# ReadyForQuery's transaction status: idle, in a transaction block, in a failed one.
IDLE: Final = b"I"
IN_TRANSACTION: Final = b"T"
IN_FAILED_TRANSACTION: Final = b"E"

_I32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")


def _cstring(value: str) -> bytes:
    data = value.encode()
    if b"\0" in data:
        raise ValueError("NUL byte in protocol string")
    return data + b"\0"


def message(kind: bytes, payload: bytes = b"") -> bytes:
    """Frame a typed message: one type byte, a length that counts itself, the payload."""
    return _HEADER.pack(kind, len(payload) + 4) + payload


def _untyped(payload: bytes) -> bytes:
    return _I32.pack(len(payload) + 4) + payload


# --- requests a client sends before (or instead of) a StartupMessage -----------------------


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    process_id: int
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class StartupMessage:
    major: int
    minor: int
    parameters: dict[str, str]

    @property
    def user(self) -> str | None:
        return self.parameters.get("user")

    @property
    def database(self) -> str | None:
        return self.parameters.get("database")


Request = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage

# PostgreSQL 18 allows cancel secrets of up to 256 bytes (protocol 3.2).
MAX_CANCEL_SECRET: Final = 256


def parse_request(payload: bytes) -> Request:
    """Decode the body of an untyped startup-phase packet (the bytes after its length)."""
    if len(payload) < 4:
        raise ProtocolError("invalid startup packet layout: too short")
    (code,) = _I32.unpack_from(payload)
    # PostgreSQL looks only at the code of these two: whatever follows it is ignored.
    if code == SSL_REQUEST_CODE:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        secret = payload[8:]
        if len(payload) < 12 or len(secret) > MAX_CANCEL_SECRET:
            # PostgreSQL: "invalid length of startup packet", logged only.
            raise UnansweredProtocolError("invalid length of CancelRequest")
        (pid,) = _I32.unpack_from(payload, 4)
        return CancelRequest(pid, bytes(secret))
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise unsupported_protocol(code)
    return StartupMessage(major, minor, _parse_parameters(payload[4:]))


def unsupported_protocol(code: int) -> ProtocolError:
    """PostgreSQL's answer to a protocol version other than 3.x: any code that is no special
    request it takes now, an SSLRequest's 1234.5679 included."""
    major, minor = code >> 16, code & 0xFFFF
    refusal = OldProtocolError if major < 3 else ProtocolError
    return refusal(
        f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
        sqlstate.FEATURE_NOT_SUPPORTED,
    )


# PostgreSQL's one complaint about a broken parameter list (ProcessStartupPacket).
_BAD_LAYOUT = "invalid startup packet layout: expected terminator as last byte"


def _parse_parameters(body: bytes) -> dict[str, str]:
    # PostgreSQL checks that the parameters end one byte before the packet does, never what
    # that last byte is: any byte terminates the list.
    if not body:
        raise ProtocolError(_BAD_LAYOUT)
    content = body[:-1]
    if not content:
        return {}
    if not content.endswith(b"\0"):
        raise ProtocolError(_BAD_LAYOUT)
    parts = content[:-1].split(b"\0")
    if len(parts) % 2:
        raise ProtocolError(_BAD_LAYOUT)
    params: dict[str, str] = {}
    for raw_key, raw_value in zip(parts[::2], parts[1::2], strict=True):
        try:
            key, value = raw_key.decode(), raw_value.decode()
        except UnicodeDecodeError:
            raise ProtocolError("invalid startup packet: parameter is not valid UTF-8") from None
        if not key:
            raise ProtocolError(_BAD_LAYOUT)
        params[key] = value
    return params


def startup_message(parameters: Mapping[str, str], minor: int = 0) -> bytes:
    body = b"".join(_cstring(k) + _cstring(v) for k, v in parameters.items()) + b"\0"
    return _untyped(_I32.pack(PROTOCOL_3_0 | minor) + body)


def ssl_request() -> bytes:
    return _untyped(_I32.pack(SSL_REQUEST_CODE))


def cancel_request(process_id: int, secret: bytes) -> bytes:
    return _untyped(_I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(process_id) + secret)


# --- backend messages we write to clients ---------------------------------------------------


def error_response(
    message_text: str,
    code: str,
    *,
    severity: str = "FATAL",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    fields = [("S", severity), ("V", severity), ("C", code), ("M", message_text)]
    if detail:
        fields.append(("D", detail))
    if hint:
        fields.append(("H", hint))
    return error_from_fields(dict(fields))


def old_style_error(message_text: str, severity: str = "FATAL") -> bytes:
    """An error in the format of protocol 2.0 and before: 'E', the text, NUL; no length."""
    return b"E" + _cstring(f"{severity}:  {message_text}\n")


def error_from_fields(fields: Mapping[str, str], kind: bytes = b"E") -> bytes:
    body = b"".join(k.encode() + _cstring(v) for k, v in fields.items()) + b"\0"
    return message(kind, body)


def auth_ok() -> bytes:
    return message(b"R", _I32.pack(AUTH_OK))


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    body = b"".join(_cstring(m) for m in mechanisms) + b"\0"
    return message(b"R", _I32.pack(AUTH_SASL) + body)


def auth_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(AUTH_SASL_CONTINUE) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(b"R", _I32.pack(AUTH_SASL_FINAL) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", _cstring(name) + _cstring(value))


def backend_key_data(process_id: int, secret: bytes) -> bytes:
    return message(b"K", _I32.pack(process_id) + secret)


def ready_for_query(status: bytes = IDLE) -> bytes:
    return message(b"Z", status)


def login_tail(
    server_messages: bytes,
    extra_status: Mapping[str, str],
    client_key: tuple[int, bytes],
    status: bytes = IDLE,
) -> bytes:
    """What a client gets once its login is done, AuthenticationOk through ReadyForQuery.

    ``server_messages`` are the server's ParameterStatus and NoticeResponse messages, as
    sent; ``extra_status`` adds our own parameters; the cancel key is ours, never the
    server's (proxy/cancel.py).
    """
    pid, secret = client_key
    return (
        auth_ok()
        + server_messages
        + b"".join(parameter_status(k, v) for k, v in extra_status.items())
        + backend_key_data(pid, secret)
        + ready_for_query(status)
    )


def negotiate_protocol_version(newest_minor: int, unsupported: Iterable[str]) -> bytes:
    names = list(unsupported)
    body = _I32.pack(PROTOCOL_3_0 | newest_minor) + _I32.pack(len(names))
    return message(b"v", body + b"".join(_cstring(n) for n in names))


# --- frontend messages we write upstream ------------------------------------------------------


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", _cstring(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


def password_message(password: str) -> bytes:
    return message(b"p", _cstring(password))


def terminate() -> bytes:
    return message(b"X")


# --- decoding typed messages ------------------------------------------------------------------


@dataclass(frozen=True)
class AuthRequest:
    code: int
    data: bytes = b""

    def sasl_mechanisms(self) -> list[str]:
        if self.code != AUTH_SASL:
            raise ProtocolError("not an AuthenticationSASL message")
        names = self.data.split(b"\0")
        if len(names) < 2 or names[-1] != b"" or names[-2] != b"":
            raise ProtocolError("malformed AuthenticationSASL message")
        return [n.decode(errors="replace") for n in names[:-2]]


def parse_auth_request(payload: bytes) -> AuthRequest:
    if len(payload) < 4:
        raise ProtocolError("malformed authentication request")
    (code,) = _I32.unpack_from(payload)
    return AuthRequest(code, bytes(payload[4:]))


def parse_error_fields(payload: bytes) -> ServerError:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        end = payload.find(b"\0", pos + 1)
        if end < 0:
            raise ProtocolError("malformed error message")
        fields[chr(payload[pos])] = payload[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return ServerError(fields)


def parse_backend_key_data(payload: bytes) -> tuple[int, bytes]:
    """The server's (process id, secret); the secret is 4 bytes, or up to 256 in 3.2."""
    if len(payload) < 8 or len(payload) - 4 > MAX_CANCEL_SECRET:
        raise ProtocolError("malformed BackendKeyData message")
    (pid,) = _I32.unpack_from(payload)
    return pid, bytes(payload[4:])


def parse_sasl_initial_response(payload: bytes) -> tuple[str, bytes]:
    end = payload.find(b"\0")
    if end < 0 or len(payload) < end + 5:
        raise ProtocolError("malformed SASLInitialResponse message")
    mechanism = payload[:end].decode(errors="replace")
    (length,) = _I32.unpack_from(payload, end + 1)
    data = payload[end + 5 :]
    if length == -1:
        data = b""
    elif length != len(data):
        raise ProtocolError("malformed SASLInitialResponse message: wrong data length")
    return mechanism, bytes(data)


def parse_password_message(payload: bytes) -> str:
    if not payload.endswith(b"\0") or b"\0" in payload[:-1]:
        raise ProtocolError("malformed password message")
    return payload[:-1].decode(errors="replace")
