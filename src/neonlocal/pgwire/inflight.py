"""Which of a client's requests still await their answer, read off both byte streams.

PostgreSQL answers every Query, Sync and FunctionCall with exactly one ReadyForQuery, in order.
A session is idle when each of those has had its ReadyForQuery, no extended-protocol message
waits for a Sync, and both streams sit between messages. Counting this way keeps a cancel for
the second of two pipelined queries, where "the last chunk ended with ReadyForQuery" did not.

Only message headers are read: each body is skipped by its length and nothing is copied, so a
chunk of row data costs one step per message. A header split between chunks is kept until the
rest arrives.

The one request PostgreSQL leaves unanswered: while it reads COPY FROM STDIN data it ignores
Sync and Flush (libpq sends a Sync behind every Execute, not knowing it starts a COPY, and one
more after CopyDone). So when a COPY FROM ends (CommandComplete or ErrorResponse after
CopyInResponse), the Syncs the client sent before its CopyDone are forgotten (protocol
documentation 55.2.6, "COPY Operations"; pgbouncer's server.c clears its queue the same way).
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from neonlocal.pgwire import codec

_HEADER = struct.Struct("!BI").unpack_from
_HEADER_SIZE: Final = 5

# Client messages PostgreSQL answers with one ReadyForQuery: Query, Sync, FunctionCall.
_SYNC: Final = ord("S")
_SYNC_POINTS: Final = frozenset(b"QSF")
# Extended-protocol messages whose answers end only at the next Sync: Parse, Bind, Describe,
# Execute, Close.
_EXTENDED: Final = frozenset(b"PBDEC")
# CopyDone, CopyFail: the client's end of COPY FROM data.
_COPY_ENDS: Final = frozenset(b"cf")
_NOTABLE_FROM_CLIENT: Final = _SYNC_POINTS | _EXTENDED | _COPY_ENDS
# Our marker in the queue of awaited answers for where the client ended its COPY data.
_COPY_END: Final = 0

_READY: Final = ord("Z")
# CopyInResponse, CopyBothResponse: the server now reads copy data and ignores Syncs.
_COPY_IN_STARTS: Final = frozenset(b"GW")
# CommandComplete, ErrorResponse: what ends a COPY FROM on the server's side.
_COPY_IN_ENDS: Final = frozenset(b"CE")
# The server messages that change anything here, outside and inside COPY FROM; row data is
# none of them.
_NOTABLE_FROM_SERVER: Final = frozenset((_READY, *_COPY_IN_STARTS))
_NOTABLE_IN_COPY_IN: Final = _NOTABLE_FROM_SERVER | _COPY_IN_ENDS


class InFlight:
    """The requests a client has sent that the server has not yet answered.

    Feed it every chunk in each direction, in the order they pass; it never changes them.
    """

    __slots__ = (
        "_awaiting",
        "_client_head",
        "_client_skip",
        "_copy_in",
        "_server_head",
        "_server_skip",
        "_unsynced",
        "status",
    )

    def __init__(self, status: bytes = codec.IDLE) -> None:
        # One entry per awaited ReadyForQuery (the request's type byte), oldest first, and
        # _COPY_END where the client finished a COPY FROM.
        self._awaiting: deque[int] = deque()
        # Extended-protocol messages sent since the last Sync: their answers are still due.
        self._unsynced = False
        self._copy_in = False
        # Per direction: body bytes of the current message still to come, or the start of a
        # header that the chunk cut short.
        self._client_skip = 0
        self._client_head = b""
        self._server_skip = 0
        self._server_head = b""
        # The transaction status of the last ReadyForQuery: I, T or E.
        self.status = status[0]

    @property
    def idle(self) -> bool:
        """Nothing is running or due: every request is answered and both streams are whole."""
        return (
            not self._awaiting
            and not self._unsynced
            and not self._copy_in
            and self.client_at_boundary
            and self.server_at_boundary
        )

    @property
    def client_at_boundary(self) -> bool:
        """The client's stream ends with a whole message: one of ours could follow it."""
        return self._client_skip == 0 and not self._client_head

    @property
    def server_at_boundary(self) -> bool:
        """The server's stream ends with a whole message: one of ours could follow it."""
        return self._server_skip == 0 and not self._server_head

    def client_sent(self, data: bytes) -> None:
        pos, end = self._client_skip, len(data)
        if not pos and not self._client_head and end >= _HEADER_SIZE:
            kind, length = _HEADER(data, 0)
            if length + 1 == end:
                # One whole message, as most requests come: no loop, nothing left over.
                if kind in _NOTABLE_FROM_CLIENT:
                    self._client_message(kind)
                return
        if pos >= end:
            self._client_skip = pos - end
            return
        if self._client_head:
            data = self._client_head + data
            end = len(data)
        last = end - _HEADER_SIZE
        header, notable = _HEADER, _NOTABLE_FROM_CLIENT  # locals: this loop runs per message
        while pos <= last:
            kind, length = header(data, pos)
            if kind in notable:
                self._client_message(kind)
            pos += 1 + length
        # Inline rather than shared: this runs for every chunk a client sends.
        if pos < end:
            self._client_head, self._client_skip = data[pos:], 0
        else:
            self._client_head, self._client_skip = b"", pos - end

    def _client_message(self, kind: int) -> None:
        if kind in _SYNC_POINTS:
            self._awaiting.append(kind)
            if kind == _SYNC:
                self._unsynced = False
        elif kind in _EXTENDED:
            self._unsynced = True
        elif self._copy_in:
            self._awaiting.append(_COPY_END)

    def server_sent(self, data: bytes) -> bool:
        """Account for a server chunk; True when it answered the last request awaited."""
        pos, end = self._server_skip, len(data)
        if pos >= end:
            self._server_skip = pos - end
            return False
        if self._server_head:
            data = self._server_head + data
            end = len(data)
        answered = False
        last = end - _HEADER_SIZE
        header = _HEADER  # a local: this loop runs per message
        notable = _NOTABLE_IN_COPY_IN if self._copy_in else _NOTABLE_FROM_SERVER
        while pos <= last:
            kind, length = header(data, pos)
            if kind in notable:
                if kind == _READY:
                    if pos == last:
                        break  # its status byte is in the next chunk
                    self.status = data[pos + _HEADER_SIZE]
                    if self._awaiting:
                        self._awaiting.popleft()
                    answered = True
                elif kind in _COPY_IN_STARTS:
                    self._copy_in = True
                    notable = _NOTABLE_IN_COPY_IN
                else:
                    self._copy_in_ended()
                    notable = _NOTABLE_FROM_SERVER
            pos += 1 + length
        if pos < end:
            self._server_head, self._server_skip = data[pos:], 0
            return False
        self._server_head, self._server_skip = b"", pos - end
        # self.idle, spelt out: this runs for every chunk the server sends.
        return (
            answered
            and pos == end
            and not self._awaiting
            and not self._unsynced
            and not self._copy_in
            and self._client_skip == 0
            and not self._client_head
        )

    def _copy_in_ended(self) -> None:
        # The Syncs that reached the server before the client's CopyDone were read in copy
        # mode and ignored; the request that started the COPY (a Query, or the Sync after
        # the client's CopyDone) is still answered.
        self._copy_in = False
        awaiting = self._awaiting
        kept: deque[int] = deque()
        while awaiting:
            kind = awaiting.popleft()
            if kind == _COPY_END:
                break
            if kind != _SYNC:
                kept.append(kind)
        kept.extend(awaiting)
        self._awaiting = kept
