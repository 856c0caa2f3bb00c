"""The exception tree: every error neonlocal raises on purpose belongs to one of two families.

    NeonlocalError
    ├── UserError        one plain line for a person at a terminal or in the log: ``.message``
    │                    (``str(exc)`` is the line to print; it never holds a secret)
    └── Refusal          a PostgreSQL ErrorResponse for a client: ``.message``, ``.sqlstate``
                         and an optional ``.hint``; the session ends after sending it

Each family has one attribute for its text, ``message``, so the code that prints or sends an
error never asks which kind of error it holds. Subclasses live beside the code that raises
them and are listed in the module that defines them; the Neon API's errors keep their own
tree in ``neon/errors.py``. Third-party exceptions (OSError, ssl.SSLError, httpx's) are
mapped into these once, where they are caught; nothing else leaks to a user.
"""

from __future__ import annotations

__all__ = ["NeonlocalError", "Refusal", "UserError"]

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


class Refusal(NeonlocalError):
    """A client is told no with an ErrorResponse carrying ``sqlstate``, ``message``, ``hint``."""

    def __init__(
        self, message: str, sqlstate: str = _INTERNAL_ERROR, *, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.hint = hint
