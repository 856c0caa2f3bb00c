"""The exception tree: every error neonlocal raises on purpose belongs to one of two families.

    NeonlocalError
    ├── UserError        one plain line for a person at a terminal or in the log: ``.message``
    │   │                (``str(exc)`` is the line to print; it never holds a secret)
    │   ├── StartupError            the daemon cannot start (here: its pieces raise it too)
    │   ├── ConfigError             config/errors.py; ``str()`` adds ``file:line:``, and one
    │   │                           line per problem when there are several
    │   ├── UnknownBranch           config/errors.py
    │   │   └── BranchNotConfigured resolver.py
    │   ├── ConnInfoError           conninfo.py (also a ValueError, for the schema)
    │   │   └── TargetError         targets.py
    │   ├── ApiKeyError             apikey.py
    │   ├── LocalTlsError           tls/local.py
    │   ├── DaemonNotRunning        control.py
    │   ├── GitFollowError          gitfollow.py
    │   ├── SocketActivationError   sockets.py
    │   ├── ServiceError            service.py
    │   └── LocalPgError            localpg.py
    │       └── PgNotFoundError
    └── Refusal          a PostgreSQL ErrorResponse for a client: ``.message``, ``.sqlstate``
                         and an optional ``.hint``; the session ends after sending it
        ├── ProtocolError           pgwire/errors.py
        ├── SessionRefused          proxy/session.py
        ├── UpstreamError           proxy/upstream.py
        └── ListenError             proxy/server.py

Each family has one attribute for its text, ``message``, so the code that prints or sends an
error never asks which kind of error it holds. Subclasses live beside the code that raises
them (the drawing says where); the Neon API's errors keep their own tree in
``neon/errors.py``. Third-party exceptions (OSError, ssl.SSLError, httpx's) are
mapped into these once, where they are caught; nothing else leaks to a user.
"""

from __future__ import annotations

__all__ = ["NeonlocalError", "Refusal", "StartupError", "UserError"]

# PostgreSQL's "internal_error"; pgwire.sqlstate holds the rest, which this module must not
# import (pgwire imports errors, not the other way round).
_INTERNAL_ERROR = "XX000"


class NeonlocalError(Exception):
    """The root of every error neonlocal raises on purpose."""

    message: str


class UserError(NeonlocalError):
    """Something a person must fix or know, said in one line (``str(exc)``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StartupError(UserError):
    """The daemon cannot start. Here, not in daemon.py, so the pieces the daemon starts (the
    control socket, the admin listener) say so themselves and the daemon need not re-wrap."""


class Refusal(NeonlocalError):
    """A client is told no with an ErrorResponse carrying ``sqlstate``, ``message``, ``hint``
    and, where PostgreSQL gives one, ``detail``."""

    def __init__(
        self,
        message: str,
        sqlstate: str = _INTERNAL_ERROR,
        *,
        hint: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.hint = hint
        self.detail = detail
