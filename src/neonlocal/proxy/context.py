"""Where a session and the server that runs it meet: each sees only the other's narrow face.

A ``Session`` is given a ``SessionContext`` (the server implements it) and reports through
a ``SessionReport``; the server keeps ``LiveSession``s. Neither imports the other's module,
so a session can be built in a test over a fake context, without a listener or a socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, Protocol

import structlog

from neonlocal.config.values import Settings
from neonlocal.errors import Refusal
from neonlocal.metrics import ErrorKind, Metrics
from neonlocal.pgwire import sqlstate
from neonlocal.pgwire.codec import CancelRequest
from neonlocal.pgwire.scram import ScramSecret
from neonlocal.proxy.addresses import AddressBook
from neonlocal.proxy.cancel import CancelKey, CancelRegistry
from neonlocal.proxy.pool import SessionPool
from neonlocal.targets import Target
from neonlocal.tls.local import LocalTls

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

# A login silent this long after its last authentication message is waiting for Neon to
# wake the compute: worth a log line and a count in `status`.
WAKE_NOTICE_S: Final = 1.0

# A branch that failed slowly (it took TCP but never answered) is answered with the same
# error at once for this long: psql's default sslmode=prefer tries again without TLS right
# after the first failure, and waiting out the same timeout twice helps no one.
FAILURE_MEMORY_S: Final = 5.0

# Logins in flight at once to one branch host. Neon's edge allows 100 concurrent connects
# per compute and rate-limits bursts (proxy/src/rate_limiter/); a pool opening fifty
# connections at once must not trip that for everyone sharing the endpoint.
MAX_CONCURRENT_LOGINS: Final = 32

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

    def end_when_idle(self, message: str, reason: str) -> None: ...


class SessionReport:
    """Everything one session tells the outside: log events (the logger is bound to the
    session), error counts, the last failure for ``status``, and its traffic at the end."""

    def __init__(
        self,
        session_id: int,
        metrics: Metrics,
        *,
        record_error: Callable[[str, str | None], None],
        count_session: Callable[[], None],
        waking: set[int] | None = None,
        warned: set[tuple[str, ...]] | None = None,
        served: Callable[[str], None] | None = None,
    ) -> None:
        self._branch: str | None = None
        self._served = served
        self._id = session_id
        self._log = log.bind(session=session_id, branch=None)
        self._metrics = metrics
        self._record_error = record_error
        self._count_session = count_session
        self._waking = waking if waking is not None else set()
        self._warned = warned if warned is not None else set()

    def bind(self, **fields: Any) -> None:
        """Fields every later event of this session carries (branch, upstream, role)."""
        self._log = self._log.bind(**fields)

    def event(self, name: str, **fields: Any) -> None:
        self._log.info(name, **fields)

    def error(self, kind: ErrorKind) -> None:
        self._metrics.error(kind)

    def failure(self, message: str) -> None:
        """The client-facing text of a failure, kept for ``status``."""
        self._record_error(message, self._branch)

    def ready(self) -> None:
        """The session is served: an older failure of its branch is over."""
        if self._served is not None and self._branch is not None:
            self._served(self._branch)

    def warn_once(self, key: tuple[str, ...], name: str, **fields: Any) -> None:
        """A warning worth saying once per daemon for each ``key``, not once per session."""
        if key not in self._warned:
            self._warned.add(key)
            self._log.warning(name, **fields)

    def waking(self, waiting: bool, **fields: Any) -> None:
        """The session waits (or no longer waits) for a compute to wake; ``status`` counts."""
        if waiting and self._id not in self._waking:
            self._waking.add(self._id)
            self.event("compute_waking", **fields)
        elif not waiting:
            self._waking.discard(self._id)

    def opened(self, branch: str) -> None:
        self._branch = branch
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

    def login_slots(self, target: Target) -> asyncio.Semaphore:
        """The logins to ``target``'s host that may be in flight at once."""

    def remembered_failure(self, target: Target) -> SessionRefused | None:
        """How ``target`` failed a moment ago, if it failed slowly (FAILURE_MEMORY_S)."""

    def remember_failure(self, target: Target, refusal: SessionRefused) -> None: ...

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
