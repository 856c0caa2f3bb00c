"""libpq connection strings, parsed without I/O.

Both forms libpq accepts are understood: the URI form
(``postgresql://user:pw@host:port/db?sslmode=require``) and the keyword form
(``host=... user=... password='it''s'``). The rules follow libpq's own parser
(``fe-connect.c``), so a string that works with ``psql`` means the same here.

Error messages never repeat the input: a connection string usually carries a
password, and a typo (an unescaped ``/`` or ``@`` in the password) can move part of
it into any other component. Only keyword names that look like keywords are named.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final
from urllib.parse import quote

from neonlocal.errors import UserError

__all__ = ["KNOWN_KEYWORDS", "ConnInfo", "ConnInfoError", "parse_conninfo", "validate_upstream"]

DEFAULT_PORT: Final = 5432


# The fields of ConnInfo, in the order its repr shows them.
_REPR_ORDER: Final = (
    "host",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "hostaddr",
    "options",
    "channel_binding",
    "application_name",
)
_FIELDS: Final = frozenset(_REPR_ORDER)

# Keywords libpq (up to PostgreSQL 18) recognises but neonlocal does not act on. They are
# accepted so a connection string copied from elsewhere keeps working, and kept in `extra`.
_OTHER_KEYWORDS: Final = frozenset(
    {
        "client_encoding",
        "connect_timeout",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "gsslib",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",
        "max_protocol_version",
        "min_protocol_version",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_issuer",
        "oauth_scope",
        "passfile",
        "replication",
        "require_auth",
        "requirepeer",
        "scram_client_key",
        "scram_server_key",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcertmode",
        "sslcompression",
        "sslcrl",
        "sslcrldir",
        "sslkey",
        "sslkeylogfile",
        "sslnegotiation",
        "sslpassword",
        "sslsni",
        "target_session_attrs",
        "tcp_user_timeout",
    }
)

KNOWN_KEYWORDS: Final = _FIELDS | _OTHER_KEYWORDS

# Extra keywords whose values are secrets, hidden like the password.
_SECRET_EXTRAS: Final = frozenset(
    {"sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key"}
)

_SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_CHANNEL_BINDINGS: Final = ("disable", "prefer", "require")
_URI_PREFIXES: Final = ("postgresql://", "postgres://")
# libpq splits the keyword form on C isspace(), not on Unicode whitespace.
_SPACE: Final = frozenset(" \t\n\v\f\r")
# Tokens are quoted in messages only when they look like libpq keywords or values
# (lowercase, no digits); anything else might be a password in the wrong place.
_SHOWABLE: Final = re.compile(r"[a-z_][a-z_-]{0,39}")
_HEX: Final = frozenset("0123456789abcdefABCDEF")


class ConnInfoError(UserError, ValueError):
    """A connection string libpq would reject. The message never contains the input.

    Also a ValueError: a schema validator that meets one reports it as a bad value.
    """


@dataclass(frozen=True)
class ConnInfo:
    """The parts of a connection string; absent parts are None (port defaults to 5432)."""

    host: str | None = None
    port: int = DEFAULT_PORT
    user: str | None = None
    password: str | None = None
    dbname: str | None = None
    sslmode: str | None = None
    sslrootcert: str | None = None
    hostaddr: str | None = None
    options: str | None = None
    channel_binding: str | None = None
    application_name: str | None = None
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __repr__(self) -> str:
        parts = []
        for name in _REPR_ORDER:
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}='***'" if name == "password" else f"{name}={value!r}")
        if self.extra:
            parts.append(f"extra={_redacted_extra(self.extra)!r}")
        return f"ConnInfo({', '.join(parts)})"

    def redacted(self) -> str:
        """The connection string as a URI with every secret replaced by ``***``, for logs."""
        userinfo = ""
        if self.user is not None:
            userinfo = quote(self.user, safe="")
        if self.password is not None:
            userinfo += ":***"
        netloc = f"{userinfo}@" if userinfo else ""
        if self.host is not None:
            netloc += f"[{self.host}]" if ":" in self.host else quote(self.host, safe="")
        if self.host is not None or self.port != DEFAULT_PORT:
            netloc += f":{self.port}"
        path = f"/{quote(self.dbname, safe='')}" if self.dbname is not None else ""
        params = [
            (name, value)
            for name in (
                "sslmode",
                "channel_binding",
                "sslrootcert",
                "hostaddr",
                "options",
                "application_name",
            )
            if (value := getattr(self, name)) is not None
        ]
        params.extend(sorted(_redacted_extra(self.extra).items()))
        query = "&".join(f"{key}={quote(value, safe='*')}" for key, value in params)
        return f"postgresql://{netloc}{path}{'?' + query if query else ''}"


def parse_conninfo(text: str) -> ConnInfo:
    """Parse a libpq connection string in URI or keyword form.

    Raises ConnInfoError for anything libpq would refuse, and for multi-host strings,
    which neonlocal does not support.
    """
    if "\0" in text:
        raise ConnInfoError("the connection string contains a NUL character")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme is not None and not text.startswith(_URI_PREFIXES):
        # Said by name: the keyword parser would choke on the rest, which holds the password.
        raise ConnInfoError(
            f'the URL scheme "{scheme.group(1)}" is not one libpq knows: '
            "use postgresql:// or postgres://"
        )
    values = _parse_uri(text) if text.startswith(_URI_PREFIXES) else _parse_keywords(text)
    return _build(values)


def _build(values: dict[str, str]) -> ConnInfo:
    # Empty values mean "use the default" in libpq, the same as leaving the keyword out.
    present = {key: value for key, value in values.items() if value != ""}
    for key in ("host", "hostaddr", "port"):
        if "," in present.get(key, ""):
            raise ConnInfoError("multiple hosts are not supported; give a single host")
    sslmode = present.get("sslmode")
    if sslmode is not None and sslmode not in _SSLMODES:
        raise ConnInfoError(
            f"invalid sslmode {_show(sslmode, present)}; expected one of {_SSLMODES}"
        )
    binding = present.get("channel_binding")
    if binding is not None and binding not in _CHANNEL_BINDINGS:
        shown = _show(binding, present)
        raise ConnInfoError(f"invalid channel_binding {shown}; expected one of {_CHANNEL_BINDINGS}")
    return ConnInfo(
        host=present.get("host"),
        port=_parse_port(present["port"]) if "port" in present else DEFAULT_PORT,
        user=present.get("user"),
        password=present.get("password"),
        dbname=present.get("dbname"),
        sslmode=sslmode,
        sslrootcert=present.get("sslrootcert"),
        hostaddr=present.get("hostaddr"),
        options=present.get("options"),
        channel_binding=binding,
        application_name=present.get("application_name"),
        extra=MappingProxyType(
            {key: value for key, value in sorted(present.items()) if key not in _FIELDS}
        ),
    )


def _parse_port(text: str) -> int:
    # As libpq's parse_int_param: digits, optionally surrounded by whitespace. The value is
    # not echoed: an unescaped "/" in a password can land part of it in the port position.
    digits = text.strip("".join(_SPACE))
    if not (digits.isascii() and digits.isdigit()):
        raise ConnInfoError("invalid port number: not an integer")
    port = int(digits)
    if not 1 <= port <= 65535:
        raise ConnInfoError("invalid port number: must be between 1 and 65535")
    return port


def _store(values: dict[str, str], keyword: str, value: str, *, what: str) -> None:
    if keyword not in KNOWN_KEYWORDS:
        raise ConnInfoError(f"invalid {what} {_show(keyword, values)}")
    values[keyword] = value


def _parse_keywords(text: str) -> dict[str, str]:
    """The ``key=value key='quoted \\' value'`` form, as libpq's conninfo_parse reads it."""
    values: dict[str, str] = {}
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in _SPACE:
            pos += 1
        if pos == end:
            return values
        start = pos
        while pos < end and text[pos] != "=" and text[pos] not in _SPACE:
            pos += 1
        keyword = text[start:pos]
        while pos < end and text[pos] in _SPACE:
            pos += 1
        if pos == end or text[pos] != "=":
            shown = _show(keyword, values)
            after = f" after {shown}" if shown.startswith('"') else ""
            raise ConnInfoError(
                f'missing "="{after} in the connection string '
                "(expected key=value pairs or a postgresql:// URI)"
            )
        pos += 1
        while pos < end and text[pos] in _SPACE:
            pos += 1
        value: list[str] = []
        if pos < end and text[pos] == "'":
            pos += 1
            while True:
                if pos == end:
                    raise ConnInfoError("unterminated quoted string in the connection string")
                ch = text[pos]
                if ch == "\\":
                    pos += 1
                    if pos < end:
                        value.append(text[pos])
                        pos += 1
                elif ch == "'":
                    pos += 1
                    break
                else:
                    value.append(ch)
                    pos += 1
        else:
            while pos < end and text[pos] not in _SPACE:
                if text[pos] == "\\":
                    pos += 1
                    if pos < end:
                        value.append(text[pos])
                        pos += 1
                else:
                    value.append(text[pos])
                    pos += 1
        _store(values, keyword, "".join(value), what="connection option")


def _parse_uri(text: str) -> dict[str, str]:
    """The URI form, following libpq's conninfo_uri_parse_options step by step."""
    values: dict[str, str] = {}
    prefix = next(p for p in _URI_PREFIXES if text.startswith(p))
    rest = text[len(prefix) :]

    # Credentials are recognised only before the first "/" (as in libpq).
    at = _first_of(rest, "@/")
    if at < len(rest) and rest[at] == "@":
        credentials, rest = rest[:at], rest[at + 1 :]
        user, colon, password = credentials.partition(":")
        if user:
            values["user"] = _decode(user)
        if colon and password:
            values["password"] = _decode(password)

    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise ConnInfoError('missing "]" after an IPv6 host address in the URI')
        if close == 1:
            raise ConnInfoError("the IPv6 host address in the URI is empty")
        host, rest = rest[1:close], rest[close + 1 :]
        if rest and rest[0] not in ":/?,":
            raise ConnInfoError('unexpected character after "]" in the URI')
    else:
        cut = _first_of(rest, ":/?,")
        host, rest = rest[:cut], rest[cut:]
    if host:
        values["host"] = _decode(host)
    if rest.startswith(":"):
        cut = _first_of(rest, "/?,", 1)
        port, rest = rest[1:cut], rest[cut:]
        if port:
            values["port"] = _decode(port)
    if rest.startswith(","):
        raise ConnInfoError("multiple hosts are not supported; give a single host")

    if rest.startswith("/"):
        cut = _first_of(rest, "?")
        dbname, rest = rest[1:cut], rest[cut:]
        if dbname:
            values["dbname"] = _decode(dbname)
    if rest.startswith("?"):
        _parse_query(rest[1:], values)
    return values


def _parse_query(query: str, values: dict[str, str]) -> None:
    # Query parameters are stored after the authority, so they override it, as in libpq.
    if not query:
        return
    for param in query.split("&"):
        keyword, equals, value = param.partition("=")
        if not equals:
            raise ConnInfoError('missing "=" in a URI query parameter')
        if "=" in value:
            raise ConnInfoError('extra "=" in a URI query parameter')
        keyword, value = _decode(keyword), _decode(value)
        # libpq accepts the JDBC spelling ssl=true for sslmode=require.
        if keyword == "ssl" and value == "true":
            keyword, value = "sslmode", "require"
        _store(values, keyword, value, what="URI query parameter")


def _first_of(text: str, chars: str, start: int = 0) -> int:
    """Index of the first of ``chars`` in ``text`` at or after ``start``, or ``len(text)``."""
    for index in range(start, len(text)):
        if text[index] in chars:
            return index
    return len(text)


def _decode(text: str) -> str:
    """Percent-decode like libpq: every ``%`` needs two hex digits, and ``%00`` is refused."""
    if "%" not in text:
        return text
    out = bytearray()
    pos = 0
    while pos < len(text):
        ch = text[pos]
        if ch != "%":
            out += ch.encode("utf-8", "surrogatepass")
            pos += 1
            continue
        digits = text[pos + 1 : pos + 3]
        if len(digits) != 2 or not set(digits) <= _HEX:
            raise ConnInfoError("invalid percent-encoded token in the URI")
        if digits == "00":
            raise ConnInfoError("forbidden value %00 in a percent-encoded URI value")
        out.append(int(digits, 16))
        pos += 3
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ConnInfoError("a percent-encoded URI value is not valid UTF-8") from None


def _show(token: str, values: Mapping[str, str]) -> str:
    """Quote ``token`` for a message only when it looks like a keyword, never a secret."""
    secrets = [values[key] for key in ("password", *_SECRET_EXTRAS) if values.get(key)]
    if _SHOWABLE.fullmatch(token) and not any(token in s or s in token for s in secrets):
        return f'"{token}"'
    return "(not shown)"


def _redacted_extra(extra: Mapping[str, str]) -> dict[str, str]:
    return {key: "***" if key in _SECRET_EXTRAS else value for key, value in extra.items()}


def validate_upstream(info: ConnInfo) -> None:
    """Refuse connection strings neonlocal cannot serve; raises ConnInfoError."""
    if info.host is None:
        raise ConnInfoError("the connection string has no host")
    if info.host.startswith("/") or info.host.startswith("@"):
        raise ConnInfoError("Unix-domain socket hosts are not supported; give a TCP host name")
    if info.hostaddr is not None:
        try:
            ipaddress.ip_address(info.hostaddr)
        except ValueError:
            raise ConnInfoError("hostaddr must be a numeric IP address") from None
