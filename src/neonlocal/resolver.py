"""A branch name becomes a Target: from its ``[branches.NAME]`` url, else through the Neon API.

Static tables with a url win over the API for their name. Everything the API answers is
cached in memory (passwords included, never on disk), so a reload or a repeated ``use``
costs no request and a daemon that loses the API keeps serving what it already resolved.
A fresh lookup happens only when a name is new, or when the compute refused the password
we hold (``refresh``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

import structlog

from neonlocal.apikey import api_url, config_relative, open_api
from neonlocal.config.errors import UnknownBranch
from neonlocal.config.values import TlsMode
from neonlocal.neon import (
    DEFAULT_ANNOTATION,
    ApiUnreachable,
    AuthenticationError,
    NeonApiError,
    ProtectedBranch,
    RetryPolicy,
)
from neonlocal.protect import guarded, protection_of
from neonlocal.targets import Target, build_target

if TYPE_CHECKING:
    from neonlocal.config.values import BranchSettings, Settings
    from neonlocal.neon import Branch, NeonApi, ResolvedBranch

__all__ = [
    "API_RETRY",
    "NEON_PORT",
    "BranchNotConfigured",
    "EphemeralSpec",
    "Resolution",
    "TargetResolver",
    "UseTarget",
    "branch_for_use",
    "create_branch",
    "delete_branch_within",
]

log = structlog.get_logger("neonlocal.resolver")

# Neon endpoints always listen here; only the host name differs.
NEON_PORT: Final = 5432
# A client (or a user at the CLI) waits while we talk to the API: give up within seconds,
# not the client's default 20 s budget. Operations are waited for, so 423 stays rare.
API_RETRY: Final = RetryPolicy(max_attempts=4, base_delay=0.25, max_delay=2.0, budget=8.0)
# EndpointState.IDLE and .INIT, which equal their text: the API's models (and msgspec) are
# loaded with the API client, not by a daemon that never asks the API.
_SUSPENDED = frozenset({"idle", "init"})
# How a client reaches the API: its URL and the key file (None: the environment's key).
_Source = tuple[str, str | None]


class BranchNotConfigured(UnknownBranch):
    """Neither a ``[branches.NAME]`` url nor a Neon project to look the name up in."""

    def _describe(self) -> str:
        return (
            super()._describe()
            + "; set [neon] project_id to find branches by name through the Neon API"
        )


@dataclass(frozen=True)
class Resolution:
    """A branch name resolved to a Target; ``neon`` holds what the API said (None: static)."""

    name: str
    target: Target
    neon: ResolvedBranch | None = None
    # Answered from memory: ``neon`` describes the branch as it was when first asked.
    from_cache: bool = False

    @property
    def compute_suspended(self) -> bool:
        """The compute was not running when we asked: the first connection wakes it."""
        return self.neon is not None and self.neon.endpoint_state in _SUSPENDED


@dataclass(frozen=True)
class EphemeralSpec:
    """``up --ephemeral``: a branch created for the daemon's lifetime, deleted at shutdown."""

    parent: str | None = None
    # The safety net: Neon deletes the branch by itself after this, even if we never can.
    expires_in: timedelta = timedelta(days=1)
    annotation: Mapping[str, str] = field(
        default_factory=lambda: {**DEFAULT_ANNOTATION, "purpose": "ephemeral"}
    )

    def new_name(self) -> str:
        """A name no other daemon will pick: when, plus a few random characters."""
        return f"neonlocal-ephemeral-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class _Wanted:
    """What decides the API's answer for a name; the cache key."""

    project_id: str
    name: str
    role: str | None
    database: str | None
    pooled: bool


class TargetResolver:
    """Resolves branch names for the daemon and the CLI; one API client, opened lazily."""

    def __init__(
        self,
        settings: Settings,
        env: Mapping[str, str],
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._settings = settings
        self._env = dict(env)
        self._retry = retry
        # One client per way of reaching the API (URL, key file): a reload's candidate
        # settings may name another before they are adopted.
        self._clients: dict[_Source, NeonApi] = {}
        # Clients replaced after a settings change or a 401; a call may still be using one,
        # so they are closed only with the resolver.
        self._retired: list[NeonApi] = []
        self._found: dict[_Wanted, ResolvedBranch] = {}
        self._locks: dict[_Wanted, asyncio.Lock] = {}
        # The protected branch `neonlocal use NAME --write` allowed writes to (protect.py).
        self._writable: str | None = None
        # Point-in-time branches this resolver created (moments.py): branch id -> the name
        # asked for (``main@-1h``), until ``forget_moments`` deletes them.
        self._made: dict[str, str] = {}

    @property
    def settings(self) -> Settings:
        return self._settings

    def update_settings(self, settings: Settings) -> None:
        """Use new settings; cached answers stay valid as long as what decides them does."""
        self._settings = settings
        source = self._source(settings)
        for other in [key for key in self._clients if key != source]:
            self._retired.append(self._clients.pop(other))

    def _source(self, settings: Settings) -> _Source:
        neon = settings.neon
        key_file = str(neon.api_key_file) if neon.api_key_file is not None else None
        return api_url(settings, self._env), key_file

    # --- the API client --------------------------------------------------------------------

    @property
    def project_id(self) -> str | None:
        return self._settings.neon.project_id

    def require_project(self) -> str:
        project = self.project_id
        if project is None:
            raise NeonApiError(
                "no Neon project configured: set [neon] project_id (or run `neonlocal init`)"
            )
        return project

    async def api(self, settings: Settings | None = None) -> NeonApi:
        """The shared API client (for ``settings``, else the resolver's own); raises
        ApiKeyError when there is no usable key."""
        settings = settings or self._settings
        source = self._source(settings)
        client = self._clients.get(source)
        if client is None:
            options = {} if self._retry is None else {"retry": self._retry}
            client = self._clients[source] = open_api(settings, self._env, **options)
        return client

    async def aclose(self) -> None:
        for client in [*self._retired, *self._clients.values()]:
            await client.aclose()
        self._retired.clear()
        self._clients.clear()

    def _drop_client(self, settings: Settings) -> None:
        # After a 401 the key may have been replaced (file or environment): read it again.
        client = self._clients.pop(self._source(settings), None)
        if client is not None:
            self._retired.append(client)

    # --- protection ------------------------------------------------------------------------

    @property
    def writable(self) -> str | None:
        """The protected branch whose sessions may write, if any."""
        return self._writable

    def allow_writes(self, name: str | None) -> None:
        """Let sessions to protected branch ``name`` write (None: to none) from the next
        resolution on; open sessions keep what they logged in with."""
        self._writable = name

    def _guarded(
        self, name: str, target: Target, settings: Settings, found: ResolvedBranch | None
    ) -> Target:
        level = protection_of(name, settings, neon_protected=found is not None and found.protected)
        return guarded(target, level, writes_allowed=self._writable == name)

    # --- resolving -------------------------------------------------------------------------

    def static_table(self, name: str, settings: Settings | None = None) -> BranchSettings | None:
        """The ``[branches.NAME]`` table when it has a url (it then wins over the API)."""
        table = (settings or self._settings).branches.get(name)
        return table if table is not None and table.url is not None else None

    def cached(self, name: str, settings: Settings | None = None) -> Resolution | None:
        """What resolving ``name`` would give without asking anyone, if known."""
        settings = settings or self._settings
        if self.static_table(name, settings) is not None:
            target = self._guarded(name, _static_target(name, settings), settings, None)
            return Resolution(name, target)
        wanted = _wanted(name, settings)
        if wanted is None or wanted not in self._found:
            return None
        found = self._found[wanted]
        target = self._guarded(name, _api_target(name, found, settings), settings, found)
        return Resolution(name, target, found, from_cache=True)

    async def resolve(
        self, name: str, *, fresh: bool = False, settings: Settings | None = None
    ) -> Resolution:
        """The Target for ``name``; raises UnknownBranch, TargetError, NeonApiError, ApiKeyError.

        Without ``fresh`` a name resolved before is answered from memory. With ``settings``
        the name is resolved as those settings say, and the resolver keeps its own: a reload
        checks its candidate this way before it adopts it.
        """
        settings = settings or self._settings
        if self.static_table(name, settings) is not None:
            target = self._guarded(name, _static_target(name, settings), settings, None)
            return Resolution(name, target)
        if not fresh:
            known = self.cached(name, settings)
            if known is not None:
                return known
        wanted = _wanted(name, settings)
        if wanted is None:
            raise BranchNotConfigured(name, list(settings.branches))
        async with self._lock(wanted):
            if not fresh and wanted in self._found:
                found = self._found[wanted]
            else:
                found = await self._ask(wanted, settings)
        target = self._guarded(name, _api_target(name, found, settings), settings, found)
        return Resolution(name, target, found)

    async def refresh(self, name: str, stale: Target) -> Target | None:
        """A Target with credentials newer than ``stale``'s, or None when there are none.

        Sessions refused at the same moment share one lookup: whoever comes second finds
        the answer the first one fetched.
        """
        settings = self._settings
        wanted = _wanted(name, settings)
        if wanted is None or self.static_table(name) is not None:
            return None
        async with self._lock(wanted):
            known = self._found.get(wanted)
            if known is not None and _differs(known, stale):
                return self._guarded(name, _api_target(name, known, settings), settings, known)
            found = await self._ask(wanted, settings)
        if not _differs(found, stale):
            return None
        log.info("credentials_refreshed", branch=name, upstream=f"{found.endpoint_host}")
        return self._guarded(name, _api_target(name, found, settings), settings, found)

    async def _ask(self, wanted: _Wanted, settings: Settings) -> ResolvedBranch:
        from neonlocal.neon import resolve_branch

        api = await self.api(settings)
        try:
            found = await resolve_branch(
                api,
                wanted.project_id,
                await self._branch_for(api, wanted),
                role=wanted.role,
                database=wanted.database,
                pooled=wanted.pooled,
            )
        except AuthenticationError:
            self._drop_client(settings)
            raise
        self._found[wanted] = found
        return found

    async def _branch_for(self, api: NeonApi, wanted: _Wanted) -> str:
        """The name or id to look up for ``wanted``: for ``main@-1h``, the branch made for
        that moment (created now unless it exists)."""
        from neonlocal.moments import branch_at, parse_moment

        moment = parse_moment(wanted.name, datetime.now(UTC))
        if moment is None:
            return wanted.name
        branch, created = await branch_at(api, wanted.project_id, moment)
        if created:
            self._made[branch.id] = wanted.name
        return branch.id

    async def forget_moments(self, keep: set[str], budget: float) -> None:
        """Delete the point-in-time branches made here that no name in ``keep`` is served
        by now; failures are logged (Neon's expires_at is the safety net)."""
        served = {f.branch_id for w, f in self._found.items() if w.name in keep}
        # A name being resolved may have just been made and not yet be in _found.
        busy = {w.name for w, lock in self._locks.items() if lock.locked()}
        unused = [bid for bid, name in self._made.items() if bid not in served and name not in busy]
        project = self.project_id
        if not unused or project is None:
            return
        api = await self.api()
        for branch_id in unused:
            name = self._made.pop(branch_id, None)
            if name is None:
                continue  # another call is deleting it
            for wanted in [w for w, f in self._found.items() if f.branch_id == branch_id]:
                del self._found[wanted]
            log.info("moment_branch_deleting", branch=name, branch_id=branch_id)
            await delete_branch_within(api, project, branch_id, budget)

    def _lock(self, wanted: _Wanted) -> asyncio.Lock:
        return self._locks.setdefault(wanted, asyncio.Lock())


def _wanted(name: str, settings: Settings) -> _Wanted | None:
    """What the API is asked for ``name`` under ``settings``; None without a project."""
    project = settings.neon.project_id
    if project is None:
        return None
    table = settings.branches.get(name)
    pooled = settings.neon.pooled
    if table is not None and table.pooled is not None:
        pooled = table.pooled
    return _Wanted(
        project_id=project,
        name=name,
        role=(table.user if table is not None else None) or settings.neon.role,
        database=(table.database if table is not None else None) or settings.neon.database,
        pooled=pooled,
    )


# --- targets -------------------------------------------------------------------------------


def _static_target(name: str, settings: Settings) -> Target:
    table = settings.branches[name]
    target = build_target(name, table)
    address = _address_of(target.host, settings)
    if target.hostaddr is None and address is not None:
        target = replace(target, hostaddr=address)
    return target


def _api_target(name: str, found: ResolvedBranch, settings: Settings) -> Target:
    table = settings.branches.get(name)
    root = settings.neon.sslrootcert
    return Target(
        branch=name,
        host=found.endpoint_host,
        port=NEON_PORT,
        hostaddr=_address_of(found.endpoint_host, settings),
        user=found.role,
        password=found.password,
        database=found.database,
        # As with a url: a role or database named in the branch's table is pinned.
        pin_user=table is not None and table.user is not None,
        pin_database=table is not None and table.database is not None,
        options=None,
        tls=table.tls if table is not None else TlsMode.VERIFY_FULL,
        sslrootcert=str(config_relative(settings, root)) if root is not None else None,
        # Every Neon endpoint offers SCRAM-SHA-256-PLUS over TLS; settle for nothing less.
        channel_binding="require",
        application_name=None,
    )


def _address_of(host: str, settings: Settings) -> str | None:
    wanted = host.lower().rstrip(".")
    for name, address in settings.network.resolve.items():
        if name.lower().rstrip(".") == wanted:
            return address
    return None


def _differs(found: ResolvedBranch, stale: Target) -> bool:
    return found.password != stale.password or found.endpoint_host != stale.host


# --- `neonlocal use` ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UseTarget:
    """What ``neonlocal use NAME`` switches to, and what happened on the way there."""

    resolution: Resolution
    created: Branch | None = None
    """The branch ``--create`` made; None when it made none."""
    existed: bool = False
    """``--create`` found the branch already there and uses it as it is."""


async def branch_for_use(
    resolver: TargetResolver,
    name: str,
    *,
    create: bool = False,
    parent: str | None = None,
    expires_in: timedelta | None = None,
) -> UseTarget:
    """Resolve ``name``; with ``create``, first make it in the project unless it is there.

    Raises what ``resolve`` and ``create_branch`` raise.
    """
    from neonlocal.neon import BranchNotFound, find_branch

    created, existed = None, False
    if create:
        project = resolver.require_project()
        api = await resolver.api()
        try:
            await find_branch(api, project, name)
            existed = True
        except BranchNotFound:
            created = await create_branch(api, project, name, parent=parent, expires_in=expires_in)
    return UseTarget(await resolver.resolve(name), created, existed)


# --- mutations shared by the CLI, the daemon and git following ---------------------------------


async def create_branch(
    api: NeonApi,
    project_id: str,
    name: str,
    *,
    parent: str | None = None,
    expires_in: timedelta | None = None,
    annotation: Mapping[str, str] = DEFAULT_ANNOTATION,
    timeout: float = 120.0,
) -> Branch:
    """Create ``name`` (with a read-write compute) from ``parent``, and wait until it is ready.

    ``parent`` is a name or id (None: the project's default branch). Waiting for the
    operations means the next change to the branch will not meet 423 Locked.
    """
    from neonlocal.neon import find_branch

    parent_id = (await find_branch(api, project_id, parent)).id if parent else None
    expires_at = datetime.now(UTC) + expires_in if expires_in is not None else None
    created = await api.create_branch(
        project_id, name, parent_id=parent_id, expires_at=expires_at, annotation=annotation
    )
    await api.wait_for_operations(project_id, created.operations, timeout)
    log.info(
        "branch_created",
        branch=created.branch.name,
        branch_id=created.branch.id,
        expires_at=created.branch.expires_at.isoformat() if created.branch.expires_at else None,
    )
    return created.branch


async def delete_branch_within(
    api: NeonApi, project_id: str, branch_id: str, budget: float
) -> bool:
    """Delete a branch, retrying failures for up to ``budget`` seconds; True once it is gone.

    Refusals that another try cannot change (a protected branch, a rejected key, a 4xx)
    end the attempts at once. Errors are logged, not raised: the caller is shutting down.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    delay = 0.25
    while True:
        remaining = deadline - loop.time()
        try:
            async with asyncio.timeout(max(remaining, 0.01)):
                await api.delete_branch(project_id, branch_id)
            return True
        except TimeoutError:
            log.warning("branch_delete_failed", branch_id=branch_id, error="out of time")
            return False
        except (ProtectedBranch, AuthenticationError) as exc:
            log.warning("branch_delete_failed", branch_id=branch_id, error=str(exc))
            return False
        except NeonApiError as exc:
            final = not isinstance(exc, ApiUnreachable) and not _worth_retrying(exc.status)
            remaining = deadline - loop.time()
            if final or remaining <= delay:
                log.warning("branch_delete_failed", branch_id=branch_id, error=str(exc))
                return False
            log.info("branch_delete_retry", branch_id=branch_id, error=str(exc), delay=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 4.0)


def _worth_retrying(status: int | None) -> bool:
    return status is None or status in (408, 423, 429) or status >= 500
