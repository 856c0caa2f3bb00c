"""Busy or idle comes from the protocol: every request awaiting a ReadyForQuery is counted.

The messages are built with the raw test client's own encoder, not neonlocal's.
"""

from __future__ import annotations

import itertools
import struct

import hypothesis.strategies as st
from hypothesis import given

from fixtures.rawpg import query, typed
from neonlocal.pgwire.inflight import InFlight

# The six bytes of ReadyForQuery(idle): row data may contain them too.
READY_BYTES = b"Z\x00\x00\x00\x05I"


def ready(status: bytes = b"I") -> bytes:
    return typed(b"Z", status)


def row(*values: bytes) -> bytes:
    fields = b"".join(struct.pack("!i", len(v)) + v for v in values)
    return typed(b"D", struct.pack("!h", len(values)) + fields)


def complete(tag: str) -> bytes:
    return typed(b"C", tag.encode() + b"\0")


def answer(value: bytes, status: bytes = b"I") -> bytes:
    return row(value) + complete("SELECT 1") + ready(status)


PARSE = typed(b"P", b"\0SELECT 1\0\0\0")
BIND = typed(b"B", b"\0\0\0\0\0\0\0\0")
EXECUTE = typed(b"E", b"\0\0\0\0\0")
SYNC = typed(b"S")
FLUSH = typed(b"H")
COPY_DATA = typed(b"d", b"1\tone\n")
COPY_DONE = typed(b"c")
COPY_IN = typed(b"G", b"\0\0\0")
COPY_OUT = typed(b"H", b"\0\0\0")
NOTIFY = typed(b"A", b"\0\0\0\x07chan\0payload\0")


def test_a_fresh_session_is_idle_outside_a_transaction() -> None:
    flight = InFlight()
    assert flight.idle
    assert flight.status == ord("I")


def test_a_query_is_running_until_its_ready_for_query() -> None:
    flight = InFlight()
    flight.client_sent(query("SELECT 1"))
    assert not flight.idle
    assert flight.server_sent(answer(b"1"))
    assert flight.idle


def test_two_pipelined_queries_are_busy_until_the_second_answer() -> None:
    flight = InFlight()
    flight.client_sent(query("SELECT 1") + query("SELECT pg_sleep(10)"))
    assert not flight.server_sent(answer(b"1"))
    assert not flight.idle
    assert flight.server_sent(answer(b""))
    assert flight.idle


def test_extended_batches_each_with_a_sync_count_separately() -> None:
    flight = InFlight()
    batch = PARSE + BIND + EXECUTE + SYNC
    flight.client_sent(batch + batch)
    assert not flight.server_sent(typed(b"1") + typed(b"2") + answer(b"1"))
    assert flight.server_sent(typed(b"1") + typed(b"2") + answer(b"1"))


def test_extended_messages_without_a_sync_keep_the_session_busy() -> None:
    flight = InFlight()
    flight.client_sent(PARSE + BIND + EXECUTE + FLUSH)
    flight.server_sent(typed(b"1") + typed(b"2") + row(b"1") + complete("SELECT 1"))
    assert not flight.idle
    flight.client_sent(SYNC)
    assert flight.server_sent(ready())


def test_row_data_that_looks_like_ready_for_query_at_a_chunk_end_is_not_an_answer() -> None:
    flight = InFlight()
    flight.client_sent(query("COPY t TO STDOUT (FORMAT binary)"))
    first = COPY_OUT + typed(b"d", b"payload" + READY_BYTES)
    assert first.endswith(READY_BYTES)
    assert not flight.server_sent(first)
    assert not flight.idle
    assert flight.server_sent(typed(b"c") + complete("COPY 1") + ready())


def test_a_notification_while_idle_leaves_the_session_idle() -> None:
    flight = InFlight()
    assert not flight.server_sent(NOTIFY)
    assert flight.idle


def test_half_a_notification_is_not_a_boundary() -> None:
    flight = InFlight()
    flight.server_sent(NOTIFY[:7])
    assert not flight.server_at_boundary
    flight.server_sent(NOTIFY[7:])
    assert flight.idle


def test_a_request_half_sent_is_busy() -> None:
    flight = InFlight()
    message = query("SELECT 1")
    flight.client_sent(message[:3])
    assert not flight.idle
    assert not flight.client_at_boundary
    flight.client_sent(message[3:])
    assert not flight.idle
    assert flight.server_sent(answer(b"1"))


def test_the_status_of_the_last_ready_for_query_is_kept() -> None:
    flight = InFlight()
    flight.client_sent(query("BEGIN"))
    flight.server_sent(complete("BEGIN") + ready(b"T"))
    assert flight.idle
    assert flight.status == ord("T")


def test_copy_from_with_a_simple_query() -> None:
    flight = InFlight()
    flight.client_sent(query("COPY t FROM STDIN"))
    flight.server_sent(COPY_IN)
    flight.client_sent(COPY_DATA + COPY_DATA + COPY_DONE)
    assert not flight.server_sent(complete("COPY 2"))
    assert flight.server_sent(ready())


def test_copy_from_with_the_extended_protocol_forgets_the_sync_sent_in_copy_mode() -> None:
    """libpq: Parse/Bind/Describe/Execute/Sync, then data, CopyDone and one more Sync."""
    flight = InFlight()
    flight.client_sent(PARSE + BIND + EXECUTE + SYNC)
    flight.server_sent(typed(b"1") + typed(b"2") + COPY_IN)
    flight.client_sent(COPY_DATA + COPY_DONE + SYNC)
    assert flight.server_sent(complete("COPY 1") + ready())
    assert flight.idle


def test_copy_from_that_fails_in_the_middle() -> None:
    """The server stops reading copy data at the error: the late CopyDone is not a request."""
    flight = InFlight()
    flight.client_sent(PARSE + BIND + EXECUTE + SYNC)
    flight.server_sent(typed(b"1") + typed(b"2") + COPY_IN)
    flight.client_sent(COPY_DATA)
    error = typed(b"E", b"SERROR\0C22P02\0Mbad\0\0")
    assert not flight.server_sent(error)
    flight.client_sent(COPY_DATA + COPY_DONE + SYNC)
    assert flight.server_sent(ready(b"I"))
    assert flight.idle


def test_copy_from_a_simple_query_that_fails_in_the_middle() -> None:
    flight = InFlight()
    flight.client_sent(query("COPY t FROM STDIN"))
    flight.server_sent(COPY_IN)
    flight.client_sent(COPY_DATA)
    assert flight.server_sent(typed(b"E", b"SERROR\0C22P02\0Mbad\0\0") + ready())
    flight.client_sent(COPY_DATA + COPY_DONE)  # too late: PostgreSQL drops these
    assert flight.idle


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


CONVERSATION_CLIENT = query("SELECT 1") + PARSE + BIND + EXECUTE + SYNC + query("SELECT 2")
CONVERSATION_SERVER = (
    answer(b"1")
    + NOTIFY
    + typed(b"1")
    + typed(b"2")
    + row(b"x" + READY_BYTES)
    + row(READY_BYTES)
    + complete("SELECT 2")
    + ready(b"T")
    + answer(READY_BYTES, b"E")
)


@given(
    client_cuts=st.lists(st.integers(0, len(CONVERSATION_CLIENT)), max_size=8),
    server_cuts=st.lists(st.integers(0, len(CONVERSATION_SERVER)), max_size=12),
)
def test_chunk_boundaries_never_change_the_outcome(
    client_cuts: list[int], server_cuts: list[int]
) -> None:
    flight = InFlight()
    for chunk in _chunks(CONVERSATION_CLIENT, client_cuts):
        flight.client_sent(chunk)
    became_idle = [flight.server_sent(c) for c in _chunks(CONVERSATION_SERVER, server_cuts)]
    assert became_idle[-1]
    assert not any(became_idle[:-1])
    assert flight.idle
    assert flight.status == ord("E")


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_any_bytes_leave_it_answering(client: bytes, server: bytes) -> None:
    """Garbage never raises or loops: the server will end such a session itself."""
    flight = InFlight()
    flight.client_sent(client)
    flight.server_sent(server)
    assert isinstance(flight.idle, bool)
