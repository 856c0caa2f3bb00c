"""Branch resolution rules: exact names, ids, endpoint, role, database and password choice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from neonlocal.neon import (
    AuthenticationError,
    BranchNotFound,
    EndpointState,
    NeonApi,
    ResolutionError,
    find_branch,
    pooler_host,
    resolve_branch,
)

PROJECT = "proj-1"


@dataclass
class FakeBranch:
    id: str
    name: str
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    roles: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "owner"}])
    databases: list[dict[str, Any]] = field(
        default_factory=lambda: [{"name": "app", "owner_name": "owner"}]
    )
    passwords: dict[str, str] = field(default_factory=lambda: {"owner": "pw-owner"})


def rw(host: str, state: str = "idle") -> dict[str, Any]:
    endpoint_id = host.split(".", 1)[0]
    return {
        "id": endpoint_id,
        "host": host,
        "type": "read_write",
        "current_state": state,
        "branch_id": "x",
    }


class FakeNeon:
    """Just enough of the API for resolution, with requests recorded."""

    def __init__(self, *branches: FakeBranch) -> None:
        self.branches = {b.id: b for b in branches}
        self.requests: list[httpx.Request] = []
        self.fail: dict[str, int] = {}  # last path segment -> status to answer with

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        failure = self.fail.get(request.url.path.rsplit("/", 1)[-1])
        if failure is not None:
            return httpx.Response(failure, json={"code": "", "message": "injected"})
        parts = request.url.path.removeprefix("/api/v2/").split("/")
        if parts == ["projects", PROJECT]:
            return httpx.Response(
                200, json={"project": {"id": PROJECT, "name": "p", "region_id": "r"}}
            )
        if parts == ["projects", PROJECT, "branches"]:
            search = request.url.params.get("search", "")
            found = [
                self._branch_json(b)
                for b in self.branches.values()
                if search in b.name or search in b.id
            ]
            return httpx.Response(200, json={"branches": found, "pagination": {}})
        if parts[:3] != ["projects", PROJECT, "branches"] or parts[3] not in self.branches:
            return httpx.Response(404, json={"code": "", "message": "not found"})
        branch = self.branches[parts[3]]
        rest = parts[4:]
        if rest == []:
            return httpx.Response(200, json={"branch": self._branch_json(branch)})
        if rest == ["endpoints"]:
            return httpx.Response(200, json={"endpoints": branch.endpoints})
        if rest == ["roles"]:
            return httpx.Response(200, json={"roles": branch.roles})
        if rest == ["databases"]:
            return httpx.Response(200, json={"databases": branch.databases})
        if len(rest) == 3 and rest[0] == "roles" and rest[2] == "reveal_password":
            return httpx.Response(200, json={"password": branch.passwords[rest[1]]})
        return httpx.Response(404, json={"code": "", "message": "not found"})

    @staticmethod
    def _branch_json(branch: FakeBranch) -> dict[str, Any]:
        return {"id": branch.id, "name": branch.name, "current_state": "ready"}

    def paths(self) -> list[str]:
        return [r.url.path.removeprefix(f"/api/v2/projects/{PROJECT}") for r in self.requests]


def api_for(neon: FakeNeon) -> NeonApi:
    return NeonApi("key", "https://neon.invalid/api/v2", transport=httpx.MockTransport(neon))


DEV_HOST = "ep-dev-1.us-east-2.aws.neon.tech"


async def test_a_name_matches_exactly_even_when_search_returns_longer_names() -> None:
    """`use dev` picks "dev", not "dev-maria", although Neon's search returns both."""
    neon = FakeNeon(
        FakeBranch("br-2", "dev-maria", [rw("ep-maria-2.us-east-2.aws.neon.tech")]),
        FakeBranch("br-1", "dev", [rw(DEV_HOST, "active")]),
    )
    async with api_for(neon) as api:
        target = await resolve_branch(api, PROJECT, "dev")
    assert (target.branch_id, target.branch_name) == ("br-1", "dev")
    assert target.endpoint_host == DEV_HOST
    assert target.endpoint_id == "ep-dev-1"
    assert target.endpoint_state is EndpointState.ACTIVE
    assert (target.role, target.database, target.password) == ("owner", "app", "pw-owner")
    assert target.project_id == PROJECT


async def test_a_br_prefix_is_looked_up_as_an_id_without_listing() -> None:
    neon = FakeNeon(FakeBranch("br-cool-1", "feature", [rw(DEV_HOST)]))
    async with api_for(neon) as api:
        branch = await find_branch(api, PROJECT, "br-cool-1")
    assert branch.name == "feature"
    assert neon.paths() == ["/branches/br-cool-1"]


async def test_a_branch_named_like_an_id_is_still_found_by_name() -> None:
    neon = FakeNeon(FakeBranch("br-real-9", "br-ugly-name", [rw(DEV_HOST)]))
    async with api_for(neon) as api:
        branch = await find_branch(api, PROJECT, "br-ugly-name")
    assert branch.id == "br-real-9"


async def test_an_unknown_name_suggests_the_closest_names() -> None:
    neon = FakeNeon(
        FakeBranch("br-1", "dev-maria"), FakeBranch("br-2", "main"), FakeBranch("br-3", "staging")
    )
    async with api_for(neon) as api:
        with pytest.raises(BranchNotFound) as caught:
            await find_branch(api, PROJECT, "dev-mria")
    assert caught.value.close_matches == ("dev-maria",)
    assert str(caught.value) == (
        f"no branch named 'dev-mria' in project {PROJECT}; did you mean 'dev-maria'?"
    )


async def test_pooled_resolution_inserts_pooler_after_the_endpoint_id() -> None:
    neon = FakeNeon(FakeBranch("br-1", "dev", [rw(DEV_HOST)]))
    async with api_for(neon) as api:
        target = await resolve_branch(api, PROJECT, "dev", pooled=True)
    assert target.endpoint_host == "ep-dev-1-pooler.us-east-2.aws.neon.tech"
    assert target.pooled


def test_pooler_host_is_idempotent_and_touches_only_the_first_label() -> None:
    assert pooler_host("ep-a-1.eu-central-1.aws.neon.tech") == (
        "ep-a-1-pooler.eu-central-1.aws.neon.tech"
    )
    assert pooler_host("ep-a-1-pooler.x.neon.tech") == "ep-a-1-pooler.x.neon.tech"


async def test_a_read_only_compute_alone_is_not_used() -> None:
    read_only = {**rw(DEV_HOST), "type": "read_only"}
    neon = FakeNeon(FakeBranch("br-1", "dev", [read_only]))
    async with api_for(neon) as api:
        with pytest.raises(ResolutionError, match="no read-write compute"):
            await resolve_branch(api, PROJECT, "dev")


async def test_the_role_defaults_to_the_owner_of_the_chosen_database() -> None:
    branch = FakeBranch(
        "br-1",
        "dev",
        [rw(DEV_HOST)],
        roles=[{"name": "alice"}, {"name": "bob"}],
        databases=[{"name": "one", "owner_name": "alice"}, {"name": "two", "owner_name": "bob"}],
        passwords={"alice": "pw-a", "bob": "pw-b"},
    )
    async with api_for(FakeNeon(branch)) as api:
        first = await resolve_branch(api, PROJECT, "dev")
        second = await resolve_branch(api, PROJECT, "dev", database="two")
        chosen = await resolve_branch(api, PROJECT, "dev", role="bob", database="one")
    assert (first.database, first.role, first.password) == ("one", "alice", "pw-a")
    assert (second.database, second.role, second.password) == ("two", "bob", "pw-b")
    assert (chosen.database, chosen.role, chosen.password) == ("one", "bob", "pw-b")


async def test_without_an_owner_role_the_only_unprotected_role_is_used() -> None:
    branch = FakeBranch(
        "br-1",
        "dev",
        [rw(DEV_HOST)],
        roles=[{"name": "neon_superuser", "protected": True}, {"name": "app"}],
        databases=[{"name": "db", "owner_name": "cloud_admin"}],
        passwords={"app": "pw-app"},
    )
    async with api_for(FakeNeon(branch)) as api:
        target = await resolve_branch(api, PROJECT, "dev")
    assert target.role == "app"


async def test_an_ambiguous_role_asks_for_configuration() -> None:
    branch = FakeBranch(
        "br-1",
        "dev",
        [rw(DEV_HOST)],
        roles=[{"name": "a"}, {"name": "b"}],
        databases=[{"name": "db", "owner_name": "cloud_admin"}],
    )
    async with api_for(FakeNeon(branch)) as api:
        with pytest.raises(ResolutionError, match=r"\(has: a, b\); set \[neon\] role"):
            await resolve_branch(api, PROJECT, "dev")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "ghost"}, "no role 'ghost' on branch 'dev' (has: owner)"),
        ({"database": "nope"}, "no database 'nope' on branch 'dev' (has: app)"),
    ],
)
async def test_a_configured_role_or_database_must_exist(
    kwargs: dict[str, str], message: str
) -> None:
    async with api_for(FakeNeon(FakeBranch("br-1", "dev", [rw(DEV_HOST)]))) as api:
        with pytest.raises(ResolutionError) as caught:
            await resolve_branch(api, PROJECT, "dev", **kwargs)
    assert str(caught.value) == message


async def test_the_password_is_not_in_the_resolved_branch_repr() -> None:
    neon = FakeNeon(FakeBranch("br-1", "dev", [rw(DEV_HOST)], passwords={"owner": "s3cr3t-pw"}))
    async with api_for(neon) as api:
        target = await resolve_branch(api, PROJECT, "dev")
    assert target.password == "s3cr3t-pw"
    assert "s3cr3t-pw" not in repr(target)
    assert "s3cr3t-pw" not in str(target)


async def test_a_failure_reading_the_branch_details_surfaces_as_itself() -> None:
    """Parallel reads still raise the plain error, not an ExceptionGroup."""
    neon = FakeNeon(FakeBranch("br-1", "dev", [rw(DEV_HOST)]))
    neon.fail["roles"] = 401
    async with api_for(neon) as api:
        with pytest.raises(AuthenticationError):
            await resolve_branch(api, PROJECT, "dev")
