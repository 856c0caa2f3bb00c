"""The JSON ``/sql`` answers with, shaped as Neon's edge shapes it (``sql_over_http.rs``).

A result is ``fields``, ``rows``, ``command``, ``rowCount``, ``rowAsArray`` in that order;
a batch is ``{"results": [...]}``; an error carries every PostgreSQL error field under the
names the driver copies onto its ``NeonDbError``. With ``Neon-Raw-Text-Output`` (what the
driver always sends) values stay PostgreSQL text; without it booleans, numbers and JSON
become JSON values, as the edge converts them. No I/O here.
"""

from __future__ import annotations

import json
import math
from typing import Any

from neonlocal.pgwire.errors import ServerError
from neonlocal.serverless.pgclient import Reply

# Type oids (pg_type.dat) the edge converts when raw text is not asked for.
_BOOL = 16
_INTEGERS = frozenset({21, 23})  # int2, int4 (int8 stays text: JSON numbers are doubles)
_FLOATS = frozenset({700, 701})
_JSON = frozenset({114, 3802})

# The edge's error fields, and the ErrorResponse field code each comes from.
_ERROR_FIELDS = (
    ("position", "P"),
    ("internalPosition", "p"),
    ("internalQuery", "q"),
    ("severity", "S"),
    ("where", "W"),
    ("table", "t"),
    ("column", "c"),
    ("schema", "s"),
    ("dataType", "d"),
    ("constraint", "n"),
    ("file", "F"),
    ("line", "L"),
    ("routine", "R"),
)


def encode(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def result(reply: Reply, *, array_mode: bool, raw_text: bool) -> dict[str, Any]:
    names = [c.name for c in reply.columns]
    types = [c.type_oid for c in reply.columns]
    rows: list[Any] = []
    for row in reply.rows:
        values = row if raw_text else [_value(v, t) for v, t in zip(row, types, strict=True)]
        rows.append(values if array_mode else dict(zip(names, values, strict=True)))
    command, count = _command(reply.command_tag or "")
    return {
        "fields": [
            {
                "name": c.name,
                "dataTypeID": c.type_oid,
                "tableID": c.table_oid,
                "columnID": c.column_id,
                "dataTypeSize": c.type_size,
                "dataTypeModifier": c.type_modifier,
                "format": "text",
            }
            for c in reply.columns
        ],
        "rows": rows,
        "command": command,
        "rowCount": count,
        "rowAsArray": array_mode,
    }


def _command(tag: str) -> tuple[str, int | None]:
    """The tag's first word and its row count; INSERT puts an oid before the count."""
    words = tag.split(" ")
    count_word = words[2] if words[0] == "INSERT" and len(words) > 2 else None
    if words[0] != "INSERT" and len(words) > 1:
        count_word = words[1]
    try:
        return words[0], int(count_word) if count_word is not None else None
    except ValueError:
        return words[0], None


def _value(text: str | None, type_oid: int) -> Any:
    if text is None:
        return None
    if type_oid == _BOOL:
        return text == "t"
    if type_oid in _INTEGERS:
        return int(text)
    if type_oid in _FLOATS:
        number = float(text)
        return number if math.isfinite(number) else text
    if type_oid in _JSON:
        return json.loads(text)
    return text


def error(message: str, server: ServerError | None = None, code: str = "") -> dict[str, Any]:
    """The edge's error body; fields PostgreSQL did not send are null."""
    fields = server.fields if server is not None else {}
    body: dict[str, Any] = {
        "message": fields.get("M", message),
        "code": fields.get("C", code),
        "detail": fields.get("D"),
        "hint": fields.get("H"),
    }
    for name, letter in _ERROR_FIELDS:
        body[name] = fields.get(letter)
    if server is None:
        body["severity"] = ""
    return body
