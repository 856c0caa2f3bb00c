"""Split a byte stream into PostgreSQL packets.

Two shapes exist: the untyped packets of the startup phase (a length, then the body) and the
typed messages of everything after (a type byte, a length, the body). Both framers enforce a
size limit so a hostile peer cannot make us buffer without bound.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from neonlocal.pgwire.errors import ProtocolError, UnansweredProtocolError

# PostgreSQL's own limit for startup packets (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET: Final = 10_000
# Authentication messages in either direction are small; PostgreSQL caps SASL tokens at 64 kB.
MAX_HANDSHAKE_MESSAGE: Final = 65_536

_I32 = struct.Struct("!i")


class _Framer:
    """A bounded buffer of received bytes; subclasses cut packets from its front."""

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self._max = max_size

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take_rest(self) -> bytes:
        """Bytes received past the last whole packet: they belong to whoever reads next."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def buffered(self) -> int:
        return len(self._buf)


class StartupFramer(_Framer):
    """Untyped packets: int32 length (counting itself) then the body. As in PostgreSQL, an
    impossible length gets no reply: the peer may not speak the protocol at all."""

    def __init__(self, max_size: int = MAX_STARTUP_PACKET) -> None:
        super().__init__(max_size)

    def next_packet(self) -> bytes | None:
        """The next complete packet body, or None if more bytes are needed."""
        if len(self._buf) < 4:
            return None
        (length,) = _I32.unpack_from(self._buf)
        if length < 8 or length > self._max:
            raise UnansweredProtocolError(f"invalid length of startup packet: {length}")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        return body


@dataclass(frozen=True)
class Message:
    kind: bytes
    payload: bytes

    def encode(self) -> bytes:
        return struct.pack("!ci", self.kind, len(self.payload) + 4) + self.payload


class MessageFramer(_Framer):
    """Typed messages: one type byte, int32 length (counting itself), then the body."""

    def __init__(self, max_size: int = MAX_HANDSHAKE_MESSAGE) -> None:
        super().__init__(max_size)

    def next_message(self) -> Message | None:
        if len(self._buf) < 5:
            return None
        kind = bytes(self._buf[0:1])
        (length,) = _I32.unpack_from(self._buf, 1)
        if length < 4:
            raise ProtocolError(f"invalid message length {length} for message type {kind!r}")
        if length > self._max:
            raise ProtocolError(
                f"message of type {kind!r} is too large ({length} bytes) during the handshake"
            )
        end = 1 + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[5:end])
        del self._buf[:end]
        return Message(kind, payload)
