"""A session over an in-memory client and a fake context: its refusals, with no socket at all."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from neonlocal.config.values import ListenSettings, Settings
from neonlocal.metrics import ErrorKind, Metrics
from neonlocal.pgwire import codec, sqlstate
from neonlocal.pgwire.codec import CancelRequest
from neonlocal.pgwire.errors import ServerError
from neonlocal.pgwire.framing import MessageFramer
from neonlocal.pgwire.scram import ScramSecret
from neonlocal.proxy.addresses import AddressBook
from neonlocal.proxy.cancel import CancelRegistry
from neonlocal.proxy.context import LiveSession, SaslOffers, SessionRefused, SessionReport
from neonlocal.proxy.endpoint import Endpoint
from neonlocal.proxy.pool import SessionPool
from neonlocal.proxy.session import Session
from neonlocal.targets import Target
from neonlocal.tls.local import LocalTls

STARTUP = codec.startup_message({"user": "alice", "database": "app"})


class MemoryTransport(asyncio.Transport):
    """The client's side of a connection that exists only in memory."""

    def __init__(self, protocol: Endpoint) -> None:
        super().__init__()
        self.protocol = protocol
        self.sent = bytearray()
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeContext:
    """A server with nothing selected, or full, that remembers what sessions asked of it."""

    def __init__(self, *, max_sessions: int = 10) -> None:
        self.settings = Settings(listen=ListenSettings(max_sessions=max_sessions))
        self.local_tls: LocalTls | None = None
        self.local_secret: ScramSecret | None = None
        self.cancels = CancelRegistry()
        self.pool: SessionPool | None = None
        self.addresses = AddressBook()
        self.sasl_offers: SaslOffers = {}
        self.metrics = Metrics()
        self.sessions: set[LiveSession] = set()
        self.forwarded: list[CancelRequest] = []
        self.errors: list[str] = []
        self.opened = 0

    def scram_secret_for(self, password: str) -> ScramSecret:
        return ScramSecret.from_password(password)

    def current_target(self) -> tuple[str, Target]:
        raise SessionRefused(
            "neonlocal: no branch is selected",
            sqlstate.UNABLE_TO_CONNECT,
            ErrorKind.NO_BRANCH,
            hint="Select one with `neonlocal use NAME`.",
        )

    async def refresh_credentials(self, branch: str, stale: Target) -> Target | None:
        return None

    async def forward_cancel(self, request: CancelRequest) -> None:
        self.forwarded.append(request)

    def cancel_query(self, cancel_key: tuple[int, bytes]) -> None:
        pass

    def login_slots(self, target: Target) -> asyncio.Semaphore:
        return asyncio.Semaphore(1)

    def remembered_failure(self, target: Target) -> SessionRefused | None:
        return None

    def remember_failure(self, target: Target, refusal: SessionRefused) -> None:
        pass

    def admit(self, session: LiveSession) -> None:
        if len(self.sessions) >= self.settings.listen.max_sessions:
            raise SessionRefused("too many", sqlstate.TOO_MANY_CONNECTIONS, ErrorKind.TOO_MANY)
        self.sessions.add(session)

    def release(self, session: LiveSession) -> None:
        self.sessions.discard(session)

    def report(self, session_id: int) -> SessionReport:
        return SessionReport(
            session_id,
            self.metrics,
            record_error=lambda message, _branch: self.errors.append(message),
            count_session=self._count,
        )

    def _count(self) -> None:
        self.opened += 1


async def run_session(context: FakeContext, *chunks: bytes) -> tuple[Session, bytes]:
    """A session whose client sends ``chunks``, one read each, run to its end; returns what
    the session wrote back."""
    client = Endpoint()
    transport = MemoryTransport(client)
    client.connection_made(transport)
    loop = asyncio.get_running_loop()
    for delay, chunk in enumerate(chunks):
        loop.call_later(delay * 0.01, client.data_received, chunk)
    session = Session(context, client)
    async with asyncio.timeout(5):
        await session.run()
    return session, bytes(transport.sent)


def error_of(data: bytes) -> ServerError:
    framer = MessageFramer()
    framer.feed(data)
    message = framer.next_message()
    assert message is not None
    assert message.kind == b"E"
    return codec.parse_error_fields(message.payload)


def errors_counted(metrics: Metrics, kind: ErrorKind) -> bool:
    return f'neonlocal_errors_total{{kind="{kind.value}"}} 1.0' in metrics.exposition().decode()


async def test_without_a_selected_branch_the_client_is_told_how_to_select_one() -> None:
    context = FakeContext()
    session, sent = await run_session(context, STARTUP)
    error = error_of(sent)
    assert error.sqlstate == sqlstate.UNABLE_TO_CONNECT
    assert error.message == "neonlocal: no branch is selected"
    assert error.fields["H"] == "Select one with `neonlocal use NAME`."
    assert session.close_reason == "neonlocal: no branch is selected"
    assert errors_counted(context.metrics, ErrorKind.NO_BRANCH)
    assert not context.sessions  # admitted, then let go
    assert context.opened == 0  # never counted as opened: it had no branch
    assert len(context.cancels) == 0


async def test_a_full_server_refuses_with_too_many_connections() -> None:
    context = FakeContext(max_sessions=0)
    _session, sent = await run_session(context, STARTUP)
    assert error_of(sent).sqlstate == sqlstate.TOO_MANY_CONNECTIONS
    assert errors_counted(context.metrics, ErrorKind.TOO_MANY)


async def test_a_cancel_request_is_forwarded_and_answered_with_nothing() -> None:
    context = FakeContext()
    session, sent = await run_session(context, codec.cancel_request(77, b"\1\2\3\4"))
    assert context.forwarded == [CancelRequest(77, b"\1\2\3\4")]
    assert sent == b""
    assert session.close_reason == "cancel request"
    assert not context.sessions


async def test_a_malformed_startup_packet_is_a_protocol_violation_without_a_reply() -> None:
    """As PostgreSQL: an invalid startup length is logged and the connection closed, unanswered."""
    context = FakeContext()
    session, sent = await run_session(context, b"\0\0\0\3garbage")
    assert sent == b""
    assert session.close_reason.startswith("protocol error: invalid length of startup packet")
    assert errors_counted(context.metrics, ErrorKind.PROTOCOL)


async def test_a_query_pipelined_behind_the_startup_packet_is_not_refused() -> None:
    """PostgreSQL reads it after the login: the session goes on (here: to no branch)."""
    context = FakeContext()
    _session, sent = await run_session(context, STARTUP + codec.message(b"Q", b"SELECT 1\0"))
    assert error_of(sent).sqlstate == sqlstate.UNABLE_TO_CONNECT


async def test_a_startup_packet_cut_short_by_eof_gets_no_reply() -> None:
    context = FakeContext()
    client = Endpoint()
    transport = MemoryTransport(client)
    client.connection_made(transport)
    client.data_received(STARTUP[:9])
    client.eof_received()
    session = Session(context, client)
    async with asyncio.timeout(5):
        await session.run()
    assert bytes(transport.sent) == b""
    assert not context.sessions


async def test_an_ssl_request_without_local_tls_is_answered_no() -> None:
    """As PostgreSQL without ssl: 'N', then the client carries on in plaintext."""
    context = FakeContext()
    _session, sent = await run_session(context, codec.ssl_request(), STARTUP)
    assert sent[:1] == codec.ENCRYPTION_REFUSED
    assert error_of(sent[1:]).sqlstate == sqlstate.UNABLE_TO_CONNECT


async def test_a_startup_packet_unfinished_at_the_deadline_is_closed_without_a_reply() -> None:
    """As PostgreSQL's authentication_timeout: the connection is dropped, nothing is sent."""
    context = FakeContext()
    client = Endpoint()
    transport = MemoryTransport(client)
    client.connection_made(transport)
    client.data_received(STARTUP[:9])
    deadline = asyncio.get_running_loop().time() + 0.1
    session = Session(context, client, startup_deadline=deadline)
    async with asyncio.timeout(5):
        await session.run()
    assert bytes(transport.sent) == b""
    assert transport.is_closing()
    assert session.close_reason == "timeout while waiting for the startup packet"
    assert errors_counted(context.metrics, ErrorKind.STARTUP_TIMEOUT)


async def test_the_startup_deadline_is_the_listeners_not_restarted_by_a_request() -> None:
    """An answered SSLRequest does not buy the client more time: the bound runs from accept."""
    context = FakeContext()
    client = Endpoint()
    transport = MemoryTransport(client)
    client.connection_made(transport)
    loop = asyncio.get_running_loop()
    client.data_received(codec.ssl_request())
    loop.call_later(0.05, client.data_received, STARTUP[:9])
    began = loop.time()
    session = Session(context, client, startup_deadline=began + 0.1)
    async with asyncio.timeout(5):
        await session.run()
    assert bytes(transport.sent) == codec.ENCRYPTION_REFUSED
    assert loop.time() - began < 1.0


async def test_a_repeated_ssl_request_is_refused_as_an_unsupported_protocol() -> None:
    context = FakeContext()
    _session, sent = await run_session(context, codec.ssl_request(), codec.ssl_request())
    assert sent[:1] == codec.ENCRYPTION_REFUSED
    error = error_of(sent[1:])
    assert (error.sqlstate, error.message) == (
        sqlstate.FEATURE_NOT_SUPPORTED,
        "unsupported frontend protocol 1234.5679: server supports 3.0 to 3.0",
    )


async def test_plaintext_behind_an_ssl_request_is_refused_after_the_answer() -> None:
    """CVE-2021-23214, in PostgreSQL's order: 'N' first, then the refusal; never read."""
    context = FakeContext()
    _session, sent = await run_session(context, codec.ssl_request() + STARTUP)
    assert sent[:1] == codec.ENCRYPTION_REFUSED
    error = error_of(sent[1:])
    assert (error.sqlstate, error.message) == (
        sqlstate.PROTOCOL_VIOLATION,
        "received unencrypted data after SSL request",
    )
    assert errors_counted(context.metrics, ErrorKind.PROTOCOL)


async def test_a_protocol_2_client_is_refused_in_the_protocol_2_format() -> None:
    """As PostgreSQL: no v3 ErrorResponse for a client that cannot read one."""
    body = struct.pack("!i", 2 << 16) + b"user\0u\0\0"
    _session, sent = await run_session(FakeContext(), struct.pack("!i", len(body) + 4) + body)
    assert sent == b"EFATAL:  unsupported frontend protocol 2.0: server supports 3.0 to 3.0\n\0"
