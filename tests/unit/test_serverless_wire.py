"""The sans-IO parts of the serverless side: requests, parameters, answers, local auth."""

from __future__ import annotations

import json

import pytest

from neonlocal.pgwire import codec
from neonlocal.pgwire.errors import ProtocolError
from neonlocal.serverless import answer
from neonlocal.serverless.cleartext import CleartextPasswordAuth
from neonlocal.serverless.pgclient import Reply, extended_query
from neonlocal.serverless.request import Batch, HttpProblem, parse_sql_request, pg_text

URL = "postgresql://alice:pw@ep-x.neon.tech/appdb"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, None),
        ("it's", "it's"),
        (True, "true"),
        (1.5, "1.5"),
        (12, "12"),
        ({"a": [1, None]}, '{"a":[1,null]}'),
        ([1, [2, None], "x y", {"k": 1}], '{1,{2,NULL},"x y","{\\"k\\":1}"}'),
    ],
)
def test_parameters_become_postgres_text_as_the_edge_makes_it(value: object, text: str) -> None:
    assert pg_text(value) == text


def test_a_request_names_role_database_and_batch_options() -> None:
    headers = {
        "neon-connection-string": URL,
        "neon-array-mode": "true",
        "neon-batch-isolation-level": "RepeatableRead",
        "neon-batch-read-only": "true",
    }
    body = json.dumps({"queries": [{"query": "SELECT $1", "params": [1], "arrayMode": False}]})
    request = parse_sql_request(headers, body.encode())
    assert (request.connection.user, request.connection.dbname) == ("alice", "appdb")
    assert request.array_mode is True
    assert request.statements[0].params == ("1",)
    assert request.statements[0].array_mode is False
    assert request.batch == Batch("REPEATABLE READ", read_only=True)
    assert request.batch.begin() == "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({}, b'{"query": "SELECT 1"}', "missing connection string"),
        ({"neon-connection-string": "postgresql://"}, b'{"query": "x"}', "no user name"),
        ({"neon-connection-string": URL}, b"[1]", "must be a JSON object"),
        ({"neon-connection-string": URL}, b'{"query": 1}', '"query" string'),
        (
            {"neon-connection-string": URL, "neon-batch-isolation-level": "Snapshot"},
            b'{"queries": []}',
            "invalid isolation level",
        ),
    ],
)
def test_bad_requests_are_400_with_a_reason(
    headers: dict[str, str], body: bytes, message: str
) -> None:
    with pytest.raises(HttpProblem) as caught:
        parse_sql_request(headers, body)
    assert caught.value.status == 400
    assert message in caught.value.message


def _server_answer(*messages: bytes) -> bytes:
    return b"".join(messages)


def _row_description(name: str, type_oid: int) -> bytes:
    field = name.encode() + b"\0" + (0).to_bytes(4, "big") + (0).to_bytes(2, "big")
    field += type_oid.to_bytes(4, "big") + (4).to_bytes(2, "big", signed=True)
    field += (-1).to_bytes(4, "big", signed=True) + (0).to_bytes(2, "big")
    return codec.message(b"T", (1).to_bytes(2, "big") + field)


def _data_row(*values: bytes | None) -> bytes:
    body = len(values).to_bytes(2, "big")
    for value in values:
        if value is None:
            body += (-1).to_bytes(4, "big", signed=True)
        else:
            body += len(value).to_bytes(4, "big") + value
    return codec.message(b"D", body)


def test_a_reply_reads_columns_rows_and_the_tag_in_any_chunks() -> None:
    stream = _server_answer(
        codec.message(b"1"),
        codec.message(b"2"),
        _row_description("n", 23),
        _data_row(b"7"),
        _data_row(None),
        codec.message(b"C", b"SELECT 2\0"),
        codec.ready_for_query(),
    )
    reply = Reply()
    for i in range(0, len(stream), 3):
        reply.receive(stream[i : i + 3])
    assert reply.done
    assert reply.rows == [["7"], [None]]
    document = answer.result(reply, array_mode=False, raw_text=False)
    assert document == {
        "fields": [
            {
                "name": "n",
                "dataTypeID": 23,
                "tableID": 0,
                "columnID": 0,
                "dataTypeSize": 4,
                "dataTypeModifier": -1,
                "format": "text",
            }
        ],
        "rows": [{"n": 7}, {"n": None}],
        "command": "SELECT",
        "rowCount": 2,
        "rowAsArray": False,
    }
    assert list(document) == ["fields", "rows", "command", "rowCount", "rowAsArray"]


def test_rows_past_the_limit_are_dropped_but_the_reply_still_ends() -> None:
    reply = Reply(max_bytes=10)
    reply.receive(_data_row(b"x" * 20) + codec.message(b"C", b"SELECT 1\0"))
    reply.receive(codec.ready_for_query())
    assert reply.done
    assert reply.too_large
    assert reply.rows == []


@pytest.mark.parametrize(
    ("tag", "command", "count"),
    [
        ("INSERT 0 5", "INSERT", 5),
        ("UPDATE 3", "UPDATE", 3),
        ("CREATE TABLE", "CREATE", None),
        ("", "", None),
    ],
)
def test_the_command_and_row_count_come_from_the_tag(
    tag: str, command: str, count: int | None
) -> None:
    reply = Reply(command_tag=tag)
    document = answer.result(reply, array_mode=True, raw_text=True)
    assert (document["command"], document["rowCount"]) == (command, count)


def test_an_error_answer_has_every_field_the_driver_copies() -> None:
    error = codec.parse_error_fields(codec.error_response("division by zero", "22012")[5:])
    body = answer.error("ignored", error)
    assert body["message"] == "division by zero"
    assert body["code"] == "22012"
    assert body["detail"] is None
    assert {"hint", "position", "where", "table", "constraint", "routine"} <= set(body)


def test_extended_query_sends_text_parameters_and_null() -> None:
    data = extended_query("SELECT $1, $2", ("a", None))
    assert [data[i : i + 1] for i in (0,)] == [b"P"]
    assert b"\xff\xff\xff\xff" in data  # NULL
    assert data.endswith(codec.message(b"S"))


def test_cleartext_auth_keeps_what_the_driver_pipelined_after_the_password() -> None:
    auth = CleartextPasswordAuth("secret")
    query = codec.message(b"Q", b"SELECT 1\0")
    assert auth.start() == codec.message(b"R", (3).to_bytes(4, "big"))
    auth.receive(codec.password_message("secret") + query)
    assert auth.done
    assert auth.take_rest() == query


def test_cleartext_auth_refuses_a_wrong_password_with_28p01() -> None:
    auth = CleartextPasswordAuth("secret")
    with pytest.raises(ProtocolError) as caught:
        auth.receive(codec.password_message("guess"))
    assert caught.value.sqlstate == "28P01"


def test_cleartext_auth_in_trust_mode_takes_any_password() -> None:
    auth = CleartextPasswordAuth(None)
    auth.receive(codec.password_message("anything"))
    assert auth.done
