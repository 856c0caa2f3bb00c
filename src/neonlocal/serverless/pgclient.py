"""The PostgreSQL client half of ``/sql``: the messages we send and the answers we read.

Each statement goes as the edge sends it: Parse, Bind with every parameter as text, Describe,
Execute, Sync, so the server infers parameter types and answers in text. ``Reply`` reads the
server's messages up to ReadyForQuery and keeps the columns, the rows (as text), the command
tag or the error. Rows past ``max_bytes`` are dropped but still read, so the connection
stays usable and the caller can say the answer was too large. No I/O here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from neonlocal.pgwire import codec
from neonlocal.pgwire.errors import ProtocolError, ServerError
from neonlocal.pgwire.framing import MessageFramer

# PostgreSQL's own limit on one message (MaxAllocSize).
MAX_MESSAGE_BYTES = 0x3FFFFFFF

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!IhIhih")  # oids are unsigned


def _cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def extended_query(query: str, params: tuple[str | None, ...]) -> bytes:
    """One statement, unnamed, with text parameters and text results, then Sync."""
    if len(params) > 0xFFFF:
        raise ProtocolError("too many parameters (at most 65535)")
    bind = bytearray(b"\0\0")  # unnamed portal, unnamed statement
    bind += _I16.pack(0) + _I16.pack(len(params))
    for param in params:
        if param is None:
            bind += _I32.pack(-1)
        else:
            data = param.encode()
            bind += _I32.pack(len(data)) + data
    bind += _I16.pack(0)  # every result column in text
    return (
        codec.message(b"P", b"\0" + _cstring(query) + _I16.pack(0))
        + codec.message(b"B", bytes(bind))
        + codec.message(b"D", b"P\0")
        + codec.message(b"E", b"\0" + _I32.pack(0))
        + codec.message(b"S")
    )


def simple_query(sql: str) -> bytes:
    return codec.message(b"Q", _cstring(sql))


@dataclass(frozen=True)
class Column:
    name: str
    table_oid: int
    column_id: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


@dataclass
class Reply:
    """What the server said up to ReadyForQuery. Feed with ``receive`` until ``done``."""

    max_bytes: int = MAX_MESSAGE_BYTES
    columns: list[Column] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    command_tag: str | None = None
    error: ServerError | None = None
    status: bytes = codec.IDLE
    too_large: bool = False
    done: bool = False
    _size: int = 0
    _framer: MessageFramer = field(default_factory=lambda: MessageFramer(MAX_MESSAGE_BYTES))

    def receive(self, data: bytes) -> bytes:
        """Feed server bytes; returns what came after ReadyForQuery (normally nothing)."""
        self._framer.feed(data)
        while not self.done:
            msg = self._framer.next_message()
            if msg is None:
                return b""
            self._on_message(msg.kind, msg.payload)
        return self._framer.take_rest()

    def _on_message(self, kind: bytes, payload: bytes) -> None:
        if kind == b"D":
            self._on_row(payload)
        elif kind == b"T":
            self.columns = _columns(payload)
        elif kind == b"C":
            self.command_tag = payload.rstrip(b"\0").decode()
        elif kind == b"E" and self.error is None:
            self.error = codec.parse_error_fields(payload)
        elif kind == b"Z":
            self.status = payload[:1]
            self.done = True
        # ParseComplete, BindComplete, NoData, notices, ParameterStatus, AuthenticationOk,
        # BackendKeyData and notifications need no answer here.

    def _on_row(self, payload: bytes) -> None:
        self._size += len(payload)
        if self._size > self.max_bytes:
            self.too_large = True
            self.rows.clear()
            return
        (count,) = _I16.unpack_from(payload)
        pos = 2
        row: list[str | None] = []
        for _ in range(count):
            (length,) = _I32.unpack_from(payload, pos)
            pos += 4
            if length < 0:
                row.append(None)
                continue
            row.append(payload[pos : pos + length].decode(errors="replace"))
            pos += length
        self.rows.append(row)


def _columns(payload: bytes) -> list[Column]:
    (count,) = _I16.unpack_from(payload)
    pos = 2
    columns = []
    for _ in range(count):
        end = payload.index(b"\0", pos)
        name = payload[pos:end].decode(errors="replace")
        table, column_id, type_oid, size, modifier, fmt = _FIELD.unpack_from(payload, end + 1)
        pos = end + 1 + _FIELD.size
        columns.append(Column(name, table, column_id, type_oid, size, modifier, fmt))
    return columns
