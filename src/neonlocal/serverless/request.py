"""What a ``POST /sql`` asks for, read from its headers and JSON body as Neon's edge reads them.

``Neon-Connection-String`` names the role, password and database (its host is not used: the
selected branch decides where queries go); the body is ``{"query", "params"}`` or
``{"queries": [...]}``, the latter run as one transaction shaped by the ``Neon-Batch-*``
headers. Parameters become PostgreSQL text as the edge makes it (``json_to_pg_text``). No I/O
here; every problem with the request is an ``HttpProblem`` with the status to answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neonlocal.conninfo import ConnInfo, ConnInfoError, parse_conninfo
from neonlocal.pgwire import sqlstate
from neonlocal.pgwire.errors import ServerError

# The edge's names for the isolation levels, and what PostgreSQL calls them.
ISOLATION_LEVELS = {
    "Serializable": "SERIALIZABLE",
    "ReadUncommitted": "READ UNCOMMITTED",
    "ReadCommitted": "READ COMMITTED",
    "RepeatableRead": "REPEATABLE READ",
}

HTTP_BAD_REQUEST = 400


class HttpProblem(Exception):
    """A request we answer with an error instead of running it."""

    def __init__(
        self,
        message: str,
        status: int = HTTP_BAD_REQUEST,
        code: str = "",
        server: ServerError | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        # The server's (or the session's) ErrorResponse, when it said why.
        self.server = server


@dataclass(frozen=True)
class Statement:
    query: str
    params: tuple[str | None, ...]
    array_mode: bool | None = None


@dataclass(frozen=True)
class Batch:
    """How a ``queries`` batch runs: always in one transaction."""

    isolation: str | None = None
    read_only: bool = False
    deferrable: bool = False

    def begin(self) -> str:
        words = ["BEGIN"]
        if self.isolation is not None:
            words.append(f"ISOLATION LEVEL {self.isolation}")
        if self.read_only:
            words.append("READ ONLY")
        if self.deferrable:
            words.append("DEFERRABLE")
        return " ".join(words)


@dataclass(frozen=True)
class SqlRequest:
    connection: ConnInfo
    statements: tuple[Statement, ...]
    batch: Batch | None
    array_mode: bool
    raw_text: bool


def parse_sql_request(headers: Mapping[str, str], body: bytes) -> SqlRequest:
    """``headers`` with lower-case names."""
    connection = _connection(headers.get("neon-connection-string"))
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise HttpProblem(f"request is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise HttpProblem("request body must be a JSON object")
    batch = None
    if "queries" in document:
        queries = document["queries"]
        if not isinstance(queries, list):
            raise HttpProblem('"queries" must be a list')
        statements = tuple(_statement(q) for q in queries)
        batch = _batch(headers)
    else:
        statements = (_statement(document),)
    return SqlRequest(
        connection,
        statements,
        batch,
        array_mode=_flag(headers, "neon-array-mode"),
        raw_text=_flag(headers, "neon-raw-text-output"),
    )


def _connection(text: str | None) -> ConnInfo:
    if not text:
        raise HttpProblem("missing connection string: send the Neon-Connection-String header")
    try:
        info = parse_conninfo(text)
    except ConnInfoError as exc:
        raise HttpProblem(f"invalid connection string: {exc.message}") from None
    if not info.user:
        raise HttpProblem("connection string has no user name", code=sqlstate.INVALID_AUTHORIZATION)
    return info


def _statement(item: Any) -> Statement:
    if not isinstance(item, dict) or not isinstance(item.get("query"), str):
        raise HttpProblem('each query must be an object with a "query" string')
    params = item.get("params", [])
    if not isinstance(params, list):
        raise HttpProblem('"params" must be a list')
    array_mode = item.get("arrayMode")
    return Statement(
        item["query"],
        tuple(pg_text(p) for p in params),
        array_mode if isinstance(array_mode, bool) else None,
    )


def _batch(headers: Mapping[str, str]) -> Batch:
    level = headers.get("neon-batch-isolation-level")
    if level is not None and level not in ISOLATION_LEVELS:
        raise HttpProblem("invalid isolation level")
    return Batch(
        ISOLATION_LEVELS[level] if level is not None else None,
        read_only=_flag(headers, "neon-batch-read-only"),
        deferrable=_flag(headers, "neon-batch-deferrable"),
    )


def _flag(headers: Mapping[str, str], name: str) -> bool:
    return headers.get(name) == "true"


def pg_text(value: Any) -> str | None:
    """A JSON parameter as PostgreSQL text: null is NULL, a list an array literal."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _array_literal(value)
    return _compact(value)


def _array_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list):
        return "{" + ",".join(_array_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return _compact(_compact(value))
    return _compact(value)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
