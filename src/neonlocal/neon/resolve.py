"""From a branch name to everything needed to log in to it.

name -> branch (exact name; ``br-...`` is an id) -> its read-write endpoint host (``-pooler``
host when pooled) -> database (given, else the only or first) -> role (given, else the
database's owner, else the only unprotected role) -> password (reveal_password).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from neonlocal.neon.errors import BranchNotFound, NeonApiError, ResolutionError
from neonlocal.neon.models import Branch, Database, Endpoint, EndpointState, EndpointType, Role

if TYPE_CHECKING:
    from neonlocal.neon.client import NeonApi

_A = TypeVar("_A")
_B = TypeVar("_B")
_C = TypeVar("_C")
_POOLER_SUFFIX = "-pooler"


@dataclass(frozen=True)
class ResolvedBranch:
    """Where and as whom to connect for one branch. The password stays out of repr."""

    project_id: str
    branch_id: str
    branch_name: str
    endpoint_id: str
    endpoint_host: str
    endpoint_state: EndpointState
    pooled: bool
    role: str
    database: str
    password: str = field(repr=False)
    # Neon's own `protected` flag on the branch.
    protected: bool = False


def pooler_host(host: str) -> str:
    """``ep-x-123.region.aws.neon.tech`` -> ``ep-x-123-pooler.region.aws.neon.tech``."""
    label, dot, rest = host.partition(".")
    if label.endswith(_POOLER_SUFFIX):
        return host
    return f"{label}{_POOLER_SUFFIX}{dot}{rest}"


async def find_branch(api: NeonApi, project_id: str, name_or_id: str) -> Branch:
    """The branch with exactly this name, or this id when it starts with ``br-``.

    Raises BranchNotFound listing the closest names in the project.
    """
    if name_or_id.startswith("br-"):
        try:
            return await api.get_branch(project_id, name_or_id)
        except BranchNotFound:
            pass  # a branch may also be *named* br-something; look for that below
    # search= matches substrings of names and ids; only an exact name counts. Stopping at
    # the match saves the request for the (empty) page that would end the listing.
    async with contextlib.aclosing(api.iter_branches(project_id, search=name_or_id)) as found:
        async for branch in found:
            if branch.name == name_or_id:
                return branch
    names = [b.name for b in await api.list_branches(project_id)]
    close = difflib.get_close_matches(name_or_id, names, n=3, cutoff=0.6)
    raise BranchNotFound(name_or_id, close, project_id)


async def resolve_branch(
    api: NeonApi,
    project_id: str,
    name_or_id: str,
    *,
    role: str | None = None,
    database: str | None = None,
    pooled: bool = False,
) -> ResolvedBranch:
    """Everything needed to connect to a branch, found by name or id through the API."""
    branch = await find_branch(api, project_id, name_or_id)
    endpoints, roles, databases = await _together(
        api.list_endpoints(project_id, branch.id),
        api.list_roles(project_id, branch.id),
        api.list_databases(project_id, branch.id),
    )
    endpoint = _read_write_endpoint(branch, endpoints)
    chosen_db = _choose_database(branch, databases, database)
    chosen_role = _choose_role(branch, roles, role, chosen_db)
    password = await api.reveal_password(
        project_id, branch.id, chosen_role, branch_name=branch.name
    )
    return ResolvedBranch(
        project_id=project_id,
        branch_id=branch.id,
        branch_name=branch.name,
        endpoint_id=endpoint.id,
        endpoint_host=pooler_host(endpoint.host) if pooled else endpoint.host,
        endpoint_state=endpoint.current_state,
        pooled=pooled,
        role=chosen_role,
        database=chosen_db.name,
        password=password,
        protected=branch.protected,
    )


def _read_write_endpoint(branch: Branch, endpoints: Sequence[Endpoint]) -> Endpoint:
    for endpoint in endpoints:
        if endpoint.type is EndpointType.READ_WRITE:
            return endpoint
    raise ResolutionError(
        f"branch '{branch.name}' has no read-write compute; add one in the Neon console"
    )


def _choose_database(branch: Branch, databases: Sequence[Database], wanted: str | None) -> Database:
    if wanted is not None:
        for db in databases:
            if db.name == wanted:
                return db
        raise ResolutionError(
            f"no database '{wanted}' on branch '{branch.name}' ({_names_of(databases)})"
        )
    if not databases:
        raise ResolutionError(f"branch '{branch.name}' has no database")
    return databases[0]


def _choose_role(
    branch: Branch, roles: Sequence[Role], wanted: str | None, database: Database
) -> str:
    names = [r.name for r in roles]
    if wanted is not None:
        if wanted not in names:
            raise ResolutionError(
                f"no role '{wanted}' on branch '{branch.name}' ({_names_of(roles)})"
            )
        return wanted
    if database.owner_name in names:
        return database.owner_name
    unprotected = [r.name for r in roles if not r.protected]
    if len(unprotected) == 1:
        return unprotected[0]
    raise ResolutionError(
        f"cannot tell which role to use on branch '{branch.name}' ({_names_of(roles)}); "
        "set [neon] role"
    )


def _names_of(items: Sequence[Role] | Sequence[Database]) -> str:
    names = [item.name for item in items]
    return "has: " + ", ".join(names) if names else "it has none"


async def _together(
    a: Coroutine[Any, Any, _A], b: Coroutine[Any, Any, _B], c: Coroutine[Any, Any, _C]
) -> tuple[_A, _B, _C]:
    """Run three reads at once; on failure cancel the rest and raise the first error."""
    try:
        async with asyncio.TaskGroup() as group:
            ta, tb, tc = group.create_task(a), group.create_task(b), group.create_task(c)
    except BaseExceptionGroup as failures:
        first = failures.exceptions[0]
        if isinstance(first, NeonApiError):
            raise first from None
        raise
    return ta.result(), tb.result(), tc.result()
