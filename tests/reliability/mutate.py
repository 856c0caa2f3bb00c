"""Mutations of valid inputs, for the fuzzers: edits a Hypothesis strategy can draw and shrink.

A mutation is a list of ``(operation, position, payload)`` applied in order to the bytes of a
valid input; positions wrap around the current length, so every draw applies somewhere.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from enum import Enum

from hypothesis import strategies as st


class Op(Enum):
    INSERT = "insert"
    DELETE = "delete"
    OVERWRITE = "overwrite"
    TRUNCATE = "truncate"
    DUPLICATE_LINE = "duplicate line"
    SWAP_LINES = "swap lines"
    REPLACE_VALUE = "replace value"
    FLIP_BIT = "flip bit"


Edit = tuple[Op, int, bytes]

# What makes TOML and conninfo parsers take unusual paths.
CONFIG_TOKENS: tuple[bytes, ...] = (
    b'"',
    b"'",
    b'"""',
    b"'''",
    b"[",
    b"]",
    b"[[",
    b"{",
    b"}",
    b"=",
    b".",
    b",",
    b"#",
    b"\\",
    b"\\u0000",
    b"\n",
    b"\r\n",
    b"\t",
    b"\x00",
    b"\xff\xfe",
    b"\xc3\x28",
    "é".encode(),
    "\u202e".encode(),
    b"true",
    b"false",
    b"nan",
    b"inf",
    b"-0",
    b"1e999",
    b"99999999999999999999999",
    b"-1",
    b"0",
    b"65536",
    b"2024-01-01T00:00:00Z",
    b"[]",
    b"{}",
    b'["0.0.0.0"]',
    b'"0.0.0.0"',
    b'"::"',
    b"branch",
    b"branches",
    b"url",
    b"host",
    b"hostaddr",
    b"port",
    b"password",
    b"listen",
    b"local",
    b"upstream",
    b"max_sessions",
    b"connect_timeout",
    b"allow_non_loopback",
    b"tls",
    b"postgresql://",
    b"postgres://u:p@h:0/d",
    b"?sslmode=disable",
    b"&hostaddr=not-an-ip",
    b"%",
    b"%zz",
    b"@",
    b":",
    b"/",
    b"[" * 64,
    b"a" * 300,
)

_ops = st.sampled_from(list(Op))
_payloads = st.one_of(st.sampled_from(CONFIG_TOKENS), st.binary(min_size=1, max_size=12))
EDITS = st.lists(st.tuples(_ops, st.integers(0, 1 << 16), _payloads), min_size=1, max_size=4)


def apply(data: bytes, edits: Sequence[Edit]) -> bytes:
    for op, pos, payload in edits:
        data = _apply_one(data, op, pos, payload)
    return data


def _apply_one(data: bytes, op: Op, pos: int, payload: bytes) -> bytes:
    size = len(data)
    at = pos % (size + 1)
    if op is Op.INSERT:
        return data[:at] + payload + data[at:]
    if op is Op.DELETE:
        return data[:at] + data[at + 1 + len(payload) * 3 :]
    if op is Op.OVERWRITE:
        return data[:at] + payload + data[at + len(payload) :]
    if op is Op.TRUNCATE:
        return data[:at]
    if op is Op.FLIP_BIT:
        if not size:
            return data
        index = pos % size
        return data[:index] + bytes([data[index] ^ (1 << (pos % 8))]) + data[index + 1 :]
    lines = data.split(b"\n")
    index = pos % len(lines)
    if op is Op.DUPLICATE_LINE:
        lines.insert(index, lines[index])
    elif op is Op.SWAP_LINES:
        other = (index + 1 + len(payload)) % len(lines)
        lines[index], lines[other] = lines[other], lines[index]
    elif op is Op.REPLACE_VALUE:
        key, sep, _value = lines[index].partition(b"=")
        lines[index] = key + (sep or b"=") + b" " + payload
    return b"\n".join(lines)


def random_edits(rng: random.Random, count: int | None = None) -> list[Edit]:
    """The same kind of edits as EDITS, drawn from ``rng`` (for fuzzers outside Hypothesis)."""
    edits = []
    for _ in range(count or rng.randint(1, 4)):
        if rng.random() < 0.5:
            payload = rng.choice(CONFIG_TOKENS)
        else:
            payload = rng.randbytes(rng.randint(1, 12))
        edits.append((rng.choice(list(Op)), rng.randrange(1 << 16), payload))
    return edits


# --- wire-level mutations ---------------------------------------------------------------------

_I32 = struct.Struct("!i")
# Lengths and codes at the edges of what the startup parser accepts.
INTERESTING_INTS = (0, 1, 4, 7, 8, 9, 16, 10_000, 10_001, 65_535, 2**31 - 1, -1, -8, 80877103)


def mutate_packet(rng: random.Random, seeds: Sequence[bytes]) -> bytes:
    """A startup-phase byte string: a seed packet, edited at the byte level."""
    data = rng.choice(seeds)
    for _ in range(rng.randint(1, 3)):
        choice = rng.random()
        if choice < 0.25 and len(data) >= 4:
            # Lie about a length or a code at a 4-byte boundary.
            at = rng.randrange(0, len(data) - 3, 4) if len(data) >= 8 else 0
            data = data[:at] + _I32.pack(rng.choice(INTERESTING_INTS)) + data[at + 4 :]
        elif choice < 0.4:
            data += rng.choice(seeds)  # pipelined packets
        elif choice < 0.5:
            other = rng.choice(seeds)
            data = data[: rng.randint(0, len(data))] + other[rng.randint(0, len(other)) :]
        else:
            op = rng.choice([Op.INSERT, Op.DELETE, Op.OVERWRITE, Op.TRUNCATE, Op.FLIP_BIT])
            payload = rng.randbytes(rng.randint(1, 8))
            data = _apply_one(data, op, rng.randrange(1 << 16), payload)
    return data
