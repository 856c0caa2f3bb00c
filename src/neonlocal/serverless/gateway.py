"""``POST /sql``: one request, run on a pooled link, answered in the edge's JSON.

A single statement runs on its own; ``queries`` run in one transaction (BEGIN with the
batch's isolation level, each statement, COMMIT; ROLLBACK after the first error). A link
left inside a transaction, or one whose session ended, is never reused.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from neonlocal.pgwire import codec
from neonlocal.proxy.context import SessionContext
from neonlocal.proxy.endpoint import Endpoint
from neonlocal.serverless import answer
from neonlocal.serverless.link import Link, LinkClosed
from neonlocal.serverless.pgclient import Reply, extended_query, simple_query
from neonlocal.serverless.pool import LinkPool
from neonlocal.serverless.request import HttpProblem, SqlRequest, parse_sql_request
from neonlocal.serverless.session import CARRIED_TLS, CarriedSession

if TYPE_CHECKING:
    from neonlocal.proxy.session import Session
    from neonlocal.targets import Target


class GatewayHost(SessionContext, Protocol):
    """What the serverless side needs of the server that owns it (proxy/server.py): the
    session context its WebSocket sessions run in, the selection, and a place to run them."""

    @property
    def selected(self) -> tuple[str, Target] | None: ...

    def start_session(self, session: Session) -> None: ...


# The edge's limits on a request body and on the rows of an answer.
MAX_REQUEST_BYTES = 10 * 1024 * 1024
MAX_RESPONSE_BYTES = 10 * 1024 * 1024
HTTP_OK = 200
HTTP_BAD_REQUEST = 400
HTTP_INSUFFICIENT_STORAGE = 507

Answer = tuple[int, bytes]


def problem_answer(problem: HttpProblem) -> Answer:
    body = answer.error(problem.message, problem.server, code=problem.code)
    return problem.status, answer.encode(body)


class Gateway:
    """The daemon's serverless side: what HTTP connections on the listener are served by."""

    def __init__(self, server: GatewayHost) -> None:
        self._server = server
        self.pool = LinkPool()

    def start_session(self, endpoint: Endpoint) -> None:
        self._server.start_session(CarriedSession(self._server, endpoint))

    def close(self) -> None:
        self.pool.clear()

    async def sql(
        self, headers: Mapping[str, str], body: bytes, carrier: Mapping[str, Any]
    ) -> Answer:
        """Answer one request; ``carrier`` is what the HTTP connection tells its sessions."""
        try:
            request = parse_sql_request(headers, body)
        except HttpProblem as problem:
            return problem_answer(problem)
        info = request.connection
        key: Hashable = (
            info.user,
            info.dbname,
            info.password,
            info.options,
            info.application_name,
            bool(carrier.get(CARRIED_TLS)),
        )
        selection = self._server.selected
        link = self.pool.take(key, selection)
        try:
            if link is None:
                link = await self._open(request, carrier)
            result = await self._run(link, request)
        except HttpProblem as problem:
            result = problem_answer(problem)
        except LinkClosed:
            result = problem_answer(HttpProblem("connection to the database was closed"))
        except BaseException:
            # The client hung up mid-query (or worse): the link's state is unknown.
            if link is not None:
                link.end()
            raise
        if link is not None:
            self.pool.give(key, selection, link)
        return result

    async def _open(self, request: SqlRequest, carrier: Mapping[str, Any]) -> Link:
        info = request.connection
        params = {"user": info.user or "", "database": info.dbname or info.user or ""}
        if info.application_name:
            params["application_name"] = info.application_name
        if info.options:
            params["options"] = info.options
        link = Link(self.start_session, dict(carrier))
        hello = codec.startup_message(params) + codec.password_message(info.password or "")
        reply = await link.exchange(hello, Reply())
        if reply.error is not None:
            link.end()
            raise HttpProblem(reply.error.message, server=reply.error)
        return link

    async def _run(self, link: Link, request: SqlRequest) -> Answer:
        if request.batch is None:
            statement = request.statements[0]
            reply = await link.exchange(
                extended_query(statement.query, statement.params), Reply(MAX_RESPONSE_BYTES)
            )
            failed = _failure(reply)
            if failed is not None:
                return failed
            return _ok(_result(reply, request, statement.array_mode))
        return await self._run_batch(link, request)

    async def _run_batch(self, link: Link, request: SqlRequest) -> Answer:
        assert request.batch is not None
        begin = await link.exchange(simple_query(request.batch.begin()), Reply())
        failed = _failure(begin)
        if failed is not None:
            return failed
        results = []
        budget = MAX_RESPONSE_BYTES
        for statement in request.statements:
            reply = await link.exchange(
                extended_query(statement.query, statement.params), Reply(budget)
            )
            failed = _failure(reply)
            if failed is not None:
                await link.exchange(simple_query("ROLLBACK"), Reply())
                return failed
            budget -= sum(len(v or "") for row in reply.rows for v in row)
            results.append(_result(reply, request, statement.array_mode))
        commit = await link.exchange(simple_query("COMMIT"), Reply())
        return _failure(commit) or _ok({"results": results})


def _result(reply: Reply, request: SqlRequest, array_mode: bool | None) -> dict[str, Any]:
    mode = request.array_mode if array_mode is None else array_mode
    return answer.result(reply, array_mode=mode, raw_text=request.raw_text)


def _failure(reply: Reply) -> Answer | None:
    if reply.error is not None:
        return HTTP_BAD_REQUEST, answer.encode(answer.error(reply.error.message, reply.error))
    if reply.too_large:
        message = f"response is too large (max is {MAX_RESPONSE_BYTES} bytes)"
        return HTTP_INSUFFICIENT_STORAGE, answer.encode(answer.error(message))
    return None


def _ok(document: object) -> Answer:
    body = answer.encode(document)
    if len(body) > MAX_RESPONSE_BYTES:
        message = f"response is too large (max is {MAX_RESPONSE_BYTES} bytes)"
        return HTTP_INSUFFICIENT_STORAGE, answer.encode(answer.error(message))
    return HTTP_OK, body
