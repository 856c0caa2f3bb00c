"""Where a session and the server that runs it meet: each sees only the other's narrow face.

A ``Session`` is given a ``SessionContext`` (the server implements it) and reports through
a ``SessionReport``; the server keeps ``LiveSession``s. Neither imports the other's module,
so a session can be built in a test over a fake context, without a listener or a socket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

import structlog

from neonlocal.errors import Refusal
from neonlocal.localtls import LocalTls
from neonlocal.metrics import ErrorKind, Metrics
from neonlocal.pgwire import sqlstate
from neonlocal.pgwire.codec import CancelRequest
from neonlocal.pgwire.scram import ScramSecret
from neonlocal.proxy.addresses import AddressBook
from neonlocal.proxy.cancel import CancelKey, CancelRegistry
from neonlocal.proxy.pool import SessionPool
from neonlocal.settings import Settings
from neonlocal.targets import Target

log = structlog.get_logger("neonlocal.server")

# How long a client may take to send its startup packet and answer local authentication
# (PostgreSQL's authentication_timeout). Waiting for the upstream is bounded separately.
STARTUP_TIMEOUT_S: Final = 60.0

# `use --terminate`: how long a query in flight may run before it is cancelled, and how long
# the cancelled query then has to come back before the sockets are simply closed.
TERMINATE_GRACE_S: Final = 5.0
CANCEL_WAIT_S: Final = 2.0

# An upstream connect slower than this is worth a line in the log.
SLOW_CONNECT_S: Final = 2.0

# (host, port, role, database) -> the SASL mechanisms that server offered last time: what
# lets the next login to it be pipelined (pgwire/login.py).
SaslOffers = dict[tuple[str, int, str, str], tuple[str, ...]]


class SessionRefused(Refusal):
    """End the session before relaying; ``kind`` counts it (by default, its SQLSTATE class)."""

    def __init__(
        self, message: str, code: str, kind: ErrorKind | None = None, *, hint: str | None = None
    ) -> None:
        super().__init__(message, code, hint=hint)
        self.kind = kind or _kind_of_sqlstate(code)


class LiveSession(Protocol):
    """What the server sees of a session it admitted."""

    @property
    def branch(self) -> str | None: ...

    @property
    def busy(self) -> bool: ...

    def terminate(self, message: str, reason: str, *, grace: float = TERMINATE_GRACE_S) -> None: ...


class SessionReport:
    """Everything one session tells the outside: log events (the logger is bound to the
    session), error counts, the last failure for ``status``, and its traffic at the end."""

    def __init__(
        self,
        session_id: int,
        metrics: Metrics,
        *,
        record_error: Callable[[str], None],
        count_session: Callable[[], None],
    ) -> None:
        self._log = log.bind(session=session_id, branch=None)
        self._metrics = metrics
        self._record_error = record_error
        self._count_session = count_session

    def bind(self, **fields: Any) -> None:
        """Fields every later event of this session carries (branch, upstream, role)."""
        self._log = self._log.bind(**fields)

    def event(self, name: str, **fields: Any) -> None:
        self._log.info(name, **fields)

    def error(self, kind: ErrorKind) -> None:
        self._metrics.error(kind)

    def failure(self, message: str) -> None:
        """The client-facing text of a failure, kept for ``status``."""
        self._record_error(message)

    def opened(self, branch: str) -> None:
        self._count_session()
        self._metrics.session_opened(branch)
        self.event("session_opened")

    def connected(self, branch: str | None, seconds: float) -> None:
        if branch is not None:
            self._metrics.upstream_connected(branch, seconds)
        if seconds > SLOW_CONNECT_S:
            log.info("upstream_slow_connect", seconds=round(seconds, 2))

    def closed(self, branch: str, *, to_upstream: int, to_client: int, **fields: Any) -> None:
        self.event("session_closed", **fields)
        self._metrics.session_closed(branch, to_upstream=to_upstream, to_client=to_client)


class SessionContext(Protocol):
    """What a session may use of the server that runs it. Read at each use: a reload
    replaces the settings, the selection and the pool."""

    @property
    def settings(self) -> Settings: ...

    @property
    def local_tls(self) -> LocalTls | None: ...

    @property
    def local_secret(self) -> ScramSecret | None:
        """The configured local password's SCRAM keys, if one is set."""

    def scram_secret_for(self, password: str) -> ScramSecret: ...

    def current_target(self) -> tuple[str, Target]:
        """The selected (branch, target); SessionRefused when none is."""

    async def refresh_credentials(self, branch: str, stale: Target) -> Target | None: ...

    @property
    def cancels(self) -> CancelRegistry: ...

    async def forward_cancel(self, request: CancelRequest) -> None: ...

    def cancel_query(self, cancel_key: CancelKey) -> None:
        """Cancel, in the background, what the session holding ``cancel_key`` runs upstream."""

    @property
    def pool(self) -> SessionPool | None: ...

    @property
    def addresses(self) -> AddressBook: ...

    @property
    def sasl_offers(self) -> SaslOffers: ...

    def admit(self, session: LiveSession) -> None:
        """Count ``session`` as open; SessionRefused when the server is full."""

    def release(self, session: LiveSession) -> None: ...

    def report(self, session_id: int) -> SessionReport: ...


def _kind_of_sqlstate(code: str) -> ErrorKind:
    """For refusals raised without a kind: the SQLSTATE class says enough."""
    if code == sqlstate.TOO_MANY_CONNECTIONS:
        return ErrorKind.TOO_MANY
    if code.startswith("28"):
        return ErrorKind.AUTH
    if code.startswith("08") and code != sqlstate.PROTOCOL_VIOLATION:
        return ErrorKind.UPSTREAM_UNREACHABLE
    return ErrorKind.PROTOCOL
