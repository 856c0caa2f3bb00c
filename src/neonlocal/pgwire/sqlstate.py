"""The SQLSTATE codes neonlocal sends to clients (PostgreSQL Appendix A)."""

from __future__ import annotations

from typing import Final

PROTOCOL_VIOLATION: Final = "08P01"
CONNECTION_FAILURE: Final = "08006"
UNABLE_TO_CONNECT: Final = "08001"
CONNECTION_REJECTED: Final = "08004"
INVALID_AUTHORIZATION: Final = "28000"
INVALID_PASSWORD: Final = "28P01"  # noqa: S105 - an SQLSTATE, not a password
FEATURE_NOT_SUPPORTED: Final = "0A000"
TOO_MANY_CONNECTIONS: Final = "53300"
ADMIN_SHUTDOWN: Final = "57P01"
CANNOT_CONNECT_NOW: Final = "57P03"
INTERNAL_ERROR: Final = "XX000"
