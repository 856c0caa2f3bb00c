"""The Neon API client against the local stand-in: a real HTTP server, real sockets.

Also checks the stand-in itself against the public spec and the recorded real responses in
tests/data/neon-api, so that passing here means something for the real API.
"""

from __future__ import annotations

import json
import socket
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from neon_standin import DEFAULT_PASSWORD, NeonStandIn, neon_api
from neonlocal import __version__
from neonlocal.neon import (
    ApiUnreachable,
    AuthenticationError,
    BranchLimit,
    BranchNotFound,
    EndpointState,
    NeonApi,
    NeonApiError,
    OperationFailed,
    OperationStatus,
    PasswordNotStored,
    ProjectNotFound,
    ProtectedBranch,
    RetryPolicy,
    find_branch,
    format_timestamp,
    resolve_branch,
)

__all__ = ["neon_api"]  # the stand-in fixture, used by name below

FAST = RetryPolicy(max_attempts=5, base_delay=0.02, max_delay=0.2, budget=5.0)
MARIA_HOST = "ep-maria-100101.us-east-2.aws.neon.tech"
NEON_API_DIR = Path(__file__).resolve().parents[1] / "data" / "neon-api"


@pytest.fixture
async def api(neon_api: NeonStandIn) -> AsyncIterator[NeonApi]:
    async with NeonApi(neon_api.api_key, neon_api.base_url, retry=FAST) as client:
        yield client


def maria(standin: NeonStandIn) -> None:
    standin.add_branch("dev", password="pw-dev")
    standin.add_branch("dev-maria", host=MARIA_HOST, password="pw-maria", database="shop")


# -- resolution ------------------------------------------------------------------------------


async def test_use_by_name_finds_the_host_role_database_and_password(
    neon_api: NeonStandIn, api: NeonApi
) -> None:
    maria(neon_api)
    target = await resolve_branch(api, neon_api.project_id, "dev-maria")
    assert target.branch_id == neon_api.branch("dev-maria").id
    assert target.branch_name == "dev-maria"
    assert target.endpoint_host == MARIA_HOST
    assert target.endpoint_state is EndpointState.IDLE
    assert (target.role, target.database, target.password) == ("neondb_owner", "shop", "pw-maria")
    assert [r.query.get("search") for r in neon_api.requests_to("list_branches")] == ["dev-maria"]


async def test_use_by_id_skips_the_name_search(neon_api: NeonStandIn, api: NeonApi) -> None:
    maria(neon_api)
    branch_id = neon_api.branch("dev-maria").id
    target = await resolve_branch(api, neon_api.project_id, branch_id)
    assert target.branch_name == "dev-maria"
    assert neon_api.requests_to("list_branches") == []


async def test_pooled_use_connects_to_the_pooler_host(neon_api: NeonStandIn, api: NeonApi) -> None:
    maria(neon_api)
    target = await resolve_branch(api, neon_api.project_id, "dev-maria", pooled=True)
    assert target.endpoint_host == "ep-maria-100101-pooler.us-east-2.aws.neon.tech"


async def test_branches_are_found_across_many_pages() -> None:
    """With two branches per page, every branch is still listed and found by name."""
    with NeonStandIn(max_page_size=2) as standin:
        for letter in "abcde":
            standin.add_branch(f"feature-{letter}")
        async with NeonApi(standin.api_key, standin.base_url, retry=FAST) as client:
            names = sorted(b.name for b in await client.list_branches(standin.project_id))
            listing_requests = len(standin.requests_to("list_branches"))
            found = await find_branch(client, standin.project_id, "feature-e")
    assert names == ["feature-a", "feature-b", "feature-c", "feature-d", "feature-e", "main"]
    assert listing_requests == 4  # three full pages and the empty one that ends the listing
    assert found.name == "feature-e"


async def test_an_unknown_branch_name_suggests_close_ones(
    neon_api: NeonStandIn, api: NeonApi
) -> None:
    maria(neon_api)
    with pytest.raises(BranchNotFound) as caught:
        await resolve_branch(api, neon_api.project_id, "dev-mraia")
    assert "did you mean 'dev-maria'" in str(caught.value)
    assert neon_api.project_id in str(caught.value)


# -- create, restore, delete --------------------------------------------------------------------


async def test_create_with_expiry_sends_what_neon_needs_and_the_branch_is_usable(
    neon_api: NeonStandIn, api: NeonApi
) -> None:
    """The new branch has a compute and an expiry, carries our annotation, and resolves."""
    expires = datetime.now(UTC) + timedelta(days=7)
    main_id = neon_api.branch("main").id
    created = await api.create_branch(neon_api.project_id, "dev-juan", main_id, expires)

    (sent,) = neon_api.requests_to("create_branch")
    assert sent.body == {
        "branch": {
            "name": "dev-juan",
            "parent_id": main_id,
            "expires_at": format_timestamp(expires),
        },
        "endpoints": [{"type": "read_write"}],
        "annotation_value": {"created-by": "neonlocal"},
    }
    assert created.branch.name == "dev-juan"
    assert created.branch.expires_at == expires.replace(microsecond=0)
    assert created.endpoints[0].host == neon_api.branch("dev-juan").host

    done = await api.wait_for_operations(
        neon_api.project_id, created.operations, timeout=5, poll_interval=0.02
    )
    assert all(op.status is OperationStatus.FINISHED for op in done)
    target = await resolve_branch(api, neon_api.project_id, "dev-juan")
    assert target.endpoint_host == created.endpoints[0].host
    assert target.endpoint_state is EndpointState.ACTIVE
    assert target.password == DEFAULT_PASSWORD  # a child branch inherits its parent's roles
    listed = await find_branch(api, neon_api.project_id, "dev-juan")
    assert listed.annotations == {"created-by": "neonlocal"}


async def test_the_test_chooses_the_host_of_branches_created_through_the_api(
    neon_api: NeonStandIn, api: NeonApi
) -> None:
    neon_api.host_factory = lambda name: f"ep-{name}-300003.us-east-2.aws.neon.tech"
    created = await api.create_branch(neon_api.project_id, "git-topic")
    assert created.endpoints[0].host == "ep-git-topic-300003.us-east-2.aws.neon.tech"
    assert created.endpoints[0].id == "ep-git-topic-300003"


async def test_reset_restores_a_branch_from_its_parent(neon_api: NeonStandIn, api: NeonApi) -> None:
    maria(neon_api)
    restored: list[tuple[str, str]] = []
    neon_api.on_restore = lambda branch, source: restored.append((branch.name, source.name))
    branch = await find_branch(api, neon_api.project_id, "dev-maria")
    assert branch.parent_id is not None
    result = await api.restore_branch(neon_api.project_id, branch.id, branch.parent_id)
    await api.wait_for_operations(
        neon_api.project_id, result.operations, timeout=5, poll_interval=0.02
    )
    assert restored == [("dev-maria", "main")]
    assert neon_api.requests_to("restore_branch")[0].body == {"source_branch_id": branch.parent_id}


async def test_delete_removes_the_branch_and_a_second_delete_is_fine(
    neon_api: NeonStandIn, api: NeonApi
) -> None:
    maria(neon_api)
    branch_id = neon_api.branch("dev-maria").id
    first = await api.delete_branch(neon_api.project_id, branch_id)
    await api.wait_for_operations(
        neon_api.project_id, first.operations, timeout=5, poll_interval=0.02
    )
    second = await api.delete_branch(neon_api.project_id, branch_id)
    assert first.existed
    assert not second.existed
    assert not neon_api.has_branch("dev-maria")
    assert len(neon_api.requests_to("delete_branch")) == 1


async def test_a_delete_answered_204_or_404_counts_as_already_gone(
    neon_api: NeonStandIn, api: NeonApi
) -> None:
    maria(neon_api)
    for status in (204, 404):
        neon_api.inject("delete_branch", status=status)
        result = await api.delete_branch(neon_api.project_id, neon_api.branch("dev").id)
        assert result.existed is False


@pytest.mark.parametrize("which", ["default", "protected"])
async def test_delete_refuses_the_default_and_protected_branches(
    neon_api: NeonStandIn, api: NeonApi, which: str
) -> None:
    name = "main" if which == "default" else "prod"
    if which == "protected":
        neon_api.add_branch("prod", protected=True)
    with pytest.raises(ProtectedBranch, match=f"refusing to delete branch '{name}'"):
        await api.delete_branch(neon_api.project_id, neon_api.branch(name).id)
    assert neon_api.requests_to("delete_branch") == []
    assert neon_api.has_branch(name)


async def test_a_failed_operation_is_reported(neon_api: NeonStandIn, api: NeonApi) -> None:
    neon_api.set_operation_outcome("failed", "no space left on the pageserver")
    created = await api.create_branch(neon_api.project_id, "doomed")
    with pytest.raises(OperationFailed, match="no space left on the pageserver"):
        await api.wait_for_operations(
            neon_api.project_id, created.operations, timeout=5, poll_interval=0.02
        )


# -- each failure mode -----------------------------------------------------------------------------


async def test_a_wrong_key_is_rejected_with_401(neon_api: NeonStandIn) -> None:
    async with NeonApi("not-the-key", neon_api.base_url, retry=FAST) as client:
        with pytest.raises(AuthenticationError, match=r"the Neon API key was rejected \(401\)"):
            await client.validate_key()


async def test_an_injected_401_is_not_retried(neon_api: NeonStandIn, api: NeonApi) -> None:
    neon_api.inject("list_branches", status=401)
    with pytest.raises(AuthenticationError):
        await api.list_branches(neon_api.project_id)
    assert len(neon_api.requests_to("list_branches")) == 1


async def test_an_unknown_project_is_reported(api: NeonApi) -> None:
    with pytest.raises(ProjectNotFound, match="no Neon project with id 'no-such-project'"):
        await resolve_branch(api, "no-such-project", "main")


async def test_a_project_without_stored_passwords_says_what_to_configure(
    neon_api: NeonStandIn, api: NeonApi
) -> None:
    maria(neon_api)
    neon_api.set_store_passwords(False)
    with pytest.raises(PasswordNotStored, match=r"\[branches\.dev-maria\] url"):
        await resolve_branch(api, neon_api.project_id, "dev-maria")
    assert neon_api.requests_to("reveal_password")[0].status == 412


async def test_the_branch_limit_is_reported_on_create(neon_api: NeonStandIn, api: NeonApi) -> None:
    neon_api.set_branch_limit(1)
    with pytest.raises(BranchLimit, match="branch limit"):
        await api.create_branch(neon_api.project_id, "one-too-many")
    assert not neon_api.has_branch("one-too-many")


async def test_create_is_retried_while_locked_and_happens_once(
    neon_api: NeonStandIn, api: NeonApi
) -> None:
    neon_api.inject("create_branch", status=423, times=2)
    await api.create_branch(neon_api.project_id, "after-the-lock")
    assert [r.status for r in neon_api.requests_to("create_branch")] == [423, 423, 201]
    assert neon_api.has_branch("after-the-lock")


async def test_a_mutation_during_running_operations_waits_for_the_lock() -> None:
    """Deleting right after creating meets 423 Locked from Neon and simply waits it out."""
    patient = RetryPolicy(max_attempts=20, base_delay=0.02, max_delay=0.2, budget=10.0)
    with NeonStandIn(operation_delay=0.3) as standin:
        async with NeonApi(standin.api_key, standin.base_url, retry=patient) as client:
            created = await client.create_branch(standin.project_id, "short-lived")
            deleted = await client.delete_branch(standin.project_id, created.branch.id)
        statuses = [r.status for r in standin.requests_to("delete_branch")]
    assert deleted.existed
    assert statuses[0] == 423
    assert statuses[-1] == 200


async def test_retry_after_on_429_is_honoured(neon_api: NeonStandIn, api: NeonApi) -> None:
    neon_api.inject("list_branches", status=429, retry_after="1")
    started = time.monotonic()
    await api.list_branches(neon_api.project_id)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.95
    assert [r.status for r in neon_api.requests_to("list_branches")][:2] == [429, 200]


async def test_a_read_is_retried_after_500s(neon_api: NeonStandIn, api: NeonApi) -> None:
    neon_api.inject("get_branch", status=500, times=2)
    branch = await api.get_branch(neon_api.project_id, neon_api.branch("main").id)
    assert branch.default
    assert [r.status for r in neon_api.requests_to("get_branch")] == [500, 500, 200]


async def test_a_create_is_not_retried_after_a_500(neon_api: NeonStandIn, api: NeonApi) -> None:
    neon_api.inject("create_branch", status=500)
    with pytest.raises(NeonApiError) as caught:
        await api.create_branch(neon_api.project_id, "maybe")
    assert caught.value.status == 500
    assert len(neon_api.requests_to("create_branch")) == 1


async def test_a_slow_read_times_out_and_is_retried(neon_api: NeonStandIn) -> None:
    maria(neon_api)
    neon_api.inject("list_endpoints", delay=2.0)
    timeout = httpx.Timeout(0.3, connect=2.0)
    async with NeonApi(neon_api.api_key, neon_api.base_url, timeout=timeout, retry=FAST) as client:
        target = await resolve_branch(client, neon_api.project_id, "dev-maria")
    assert target.endpoint_host == MARIA_HOST
    assert len(neon_api.requests_to("list_endpoints")) == 2


async def test_a_slow_create_is_not_retried_and_may_have_happened(neon_api: NeonStandIn) -> None:
    """The answer came too late, but the branch exists: the error says so, nothing is resent."""
    neon_api.inject("create_branch", delay=2.0)
    timeout = httpx.Timeout(0.3, connect=2.0)
    async with NeonApi(neon_api.api_key, neon_api.base_url, timeout=timeout, retry=FAST) as client:
        with pytest.raises(ApiUnreachable, match="may still have been carried out"):
            await client.create_branch(neon_api.project_id, "late")
    assert len(neon_api.requests_to("create_branch")) == 1
    assert neon_api.has_branch("late")


async def test_an_unreachable_api_is_named_in_the_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/api/v2"
    async with NeonApi("key", base_url, retry=RetryPolicy(max_attempts=2, base_delay=0.01)) as c:
        with pytest.raises(ApiUnreachable) as caught:
            await c.list_projects()
    assert str(caught.value).startswith(f"cannot reach the Neon API at {base_url}: ")


async def test_requests_name_neonlocal_and_never_log_the_key(
    neon_api: NeonStandIn, api: NeonApi
) -> None:
    await api.list_projects()
    sent = neon_api.requests_to("list_projects")[0]
    assert sent.headers["user-agent"] == f"neonlocal/{__version__}"
    assert "authorization" not in sent.headers


# -- the key never leaks ------------------------------------------------------------------------

SECRET_KEY = "nk-INTEGRATION-SECRET-93e1b7"


async def _wrong_key(standin: NeonStandIn) -> None:
    async with NeonApi(SECRET_KEY, standin.base_url, retry=FAST) as client:
        await client.list_projects()


def _with_secret_key(
    call: Callable[[NeonApi, NeonStandIn], Awaitable[Any]],
    setup: Callable[[NeonStandIn], None] = lambda s: None,
    timeout: float = 5.0,
) -> Callable[[NeonStandIn], Awaitable[None]]:
    async def run(standin: NeonStandIn) -> None:
        standin.api_key = SECRET_KEY
        setup(standin)
        async with NeonApi(SECRET_KEY, standin.base_url, timeout=timeout, retry=FAST) as client:
            await call(client, standin)

    return run


SCENARIOS: dict[str, Callable[[NeonStandIn], Awaitable[None]]] = {
    "401": _wrong_key,
    "404 project": _with_secret_key(lambda c, s: resolve_branch(c, "nope", "main")),
    "unknown branch": _with_secret_key(lambda c, s: resolve_branch(c, s.project_id, "nope")),
    "412": _with_secret_key(
        lambda c, s: resolve_branch(c, s.project_id, "main"),
        lambda s: s.set_store_passwords(False),
    ),
    "422": _with_secret_key(
        lambda c, s: c.create_branch(s.project_id, "x"), lambda s: s.set_branch_limit(1)
    ),
    "500 on create": _with_secret_key(
        lambda c, s: c.create_branch(s.project_id, "x"),
        lambda s: s.inject("create_branch", status=500),
    ),
    "423 forever": _with_secret_key(
        lambda c, s: c.list_branches(s.project_id),
        lambda s: s.inject("*", status=423, times=None),
    ),
    "slow": _with_secret_key(
        lambda c, s: c.create_branch(s.project_id, "x"),
        lambda s: s.inject("create_branch", delay=1.0),
        timeout=0.2,
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_the_api_key_is_never_in_errors_or_logs(
    neon_api: NeonStandIn, capsys: pytest.CaptureFixture[str], scenario: str
) -> None:
    with pytest.raises(NeonApiError) as caught:
        await SCENARIOS[scenario](neon_api)
    printed = capsys.readouterr()
    assert SECRET_KEY not in str(caught.value)
    assert SECRET_KEY not in repr(caught.value)
    assert SECRET_KEY not in "".join(traceback.format_exception(caught.value))
    assert SECRET_KEY not in printed.out + printed.err
    assert all(SECRET_KEY not in json.dumps(r.headers) for r in neon_api.requests)


# -- the stand-in speaks the real API's shapes -----------------------------------------------------


@cache
def _spec() -> dict[str, Any]:
    path = NEON_API_DIR / "openapi-v2.yaml"
    assert path.exists(), f"the Neon API spec is missing: {path}"
    with path.open() as f:
        return dict(yaml.load(f, Loader=yaml.CSafeLoader))


def _schema(name: str) -> dict[str, Any]:
    return dict(_spec()["components"]["schemas"][name])


def _required(schema: dict[str, Any]) -> set[str]:
    if "$ref" in schema:
        return _required(_schema(schema["$ref"].rsplit("/", 1)[-1]))
    found = set(schema.get("required", ()))
    for part in schema.get("allOf", ()):
        found |= _required(part)
    return found


def _properties(schema: dict[str, Any]) -> set[str]:
    if "$ref" in schema:
        return _properties(_schema(schema["$ref"].rsplit("/", 1)[-1]))
    found = set(schema.get("properties", {}))
    for part in schema.get("allOf", ()):
        found |= _properties(part)
    return found


def _recorded(method: str, uri_suffix: str) -> list[dict[str, Any]]:
    """Bodies of the recorded real responses to ``method`` on URIs ending ``uri_suffix``."""
    folder = NEON_API_DIR / "cassettes"
    assert folder.is_dir(), f"the recorded Neon API responses are missing: {folder}"
    bodies = []
    for path in sorted(folder.glob("*.yaml")):
        with path.open() as f:
            cassette = yaml.load(f, Loader=yaml.CSafeLoader)
        for exchange in cassette["interactions"]:
            request, response = exchange["request"], exchange["response"]
            uri = request["uri"].split("?", 1)[0]
            wanted = request["method"] == method and uri.endswith(uri_suffix)
            if wanted and response["status"]["code"] < 300 and response["body"]["string"]:
                bodies.append(json.loads(response["body"]["string"]))
    assert bodies, f"no recorded {method} ...{uri_suffix}"
    return bodies


@pytest.fixture(scope="module")
def shapes() -> Iterator[dict[str, dict[str, Any]]]:
    """One raw answer per route, from a stand-in with a freshly created branch."""
    with (
        NeonStandIn() as standin,
        httpx.Client(
            base_url=standin.base_url, headers={"Authorization": f"Bearer {standin.api_key}"}
        ) as http,
    ):

        def call(method: str, path: str, body: Any = None) -> dict[str, Any]:
            response = http.request(method, path, json=body)
            assert response.is_success, response.text
            return dict(response.json())

        p = f"/projects/{standin.project_id}"
        main = standin.branch("main").id
        created = call(
            "POST",
            f"{p}/branches",
            {"branch": {"name": "shape"}, "endpoints": [{"type": "read_write"}]},
        )
        yield {
            "list_projects": call("GET", "/projects"),
            "get_project": call("GET", p),
            "list_branches": call("GET", f"{p}/branches"),
            "get_branch": call("GET", f"{p}/branches/{main}"),
            "create_branch": created,
            "list_endpoints": call("GET", f"{p}/branches/{main}/endpoints"),
            "list_roles": call("GET", f"{p}/branches/{main}/roles"),
            "list_databases": call("GET", f"{p}/branches/{main}/databases"),
            "get_operation": call("GET", f"{p}/operations/{created['operations'][0]['id']}"),
            "me": call("GET", "/users/me"),
        }


# (route, key holding the object or list, schema of one item)
SPEC_OBJECTS = [
    ("list_projects", "projects", "ProjectListItem"),
    ("get_project", "project", "Project"),
    ("list_branches", "branches", "Branch"),
    ("get_branch", "branch", "Branch"),
    ("get_branch", "annotation", "AnnotationData"),
    ("create_branch", "branch", "Branch"),
    ("create_branch", "endpoints", "Endpoint"),
    ("create_branch", "operations", "Operation"),
    ("create_branch", "roles", "Role"),
    ("create_branch", "databases", "Database"),
    ("list_endpoints", "endpoints", "Endpoint"),
    ("list_roles", "roles", "Role"),
    ("list_databases", "databases", "Database"),
    ("get_operation", "operation", "Operation"),
    ("me", None, "CurrentUserInfoResponse"),
]


@pytest.mark.parametrize(("route", "key", "schema"), SPEC_OBJECTS)
def test_standin_answers_carry_every_field_the_spec_requires(
    shapes: dict[str, dict[str, Any]], route: str, key: str | None, schema: str
) -> None:
    value: Any = shapes[route] if key is None else shapes[route][key]
    items = value if isinstance(value, list) else [value]
    assert items
    for item in items:
        assert _required(_schema(schema)) <= set(item), f"{route}.{key} lacks required fields"


def test_standin_list_answers_carry_the_spec_envelopes(shapes: dict[str, dict[str, Any]]) -> None:
    assert _required(_schema("AnnotationsMapResponse")) <= set(shapes["list_branches"])
    assert "next" in shapes["list_branches"]["pagination"]
    assert "cursor" in shapes["list_projects"]["pagination"]


# (route, recorded method, recorded URI suffix, key)
RECORDED_OBJECTS = [
    ("list_projects", "GET", "/api/v2/projects", "projects"),
    ("list_branches", "GET", "/branches", "branches"),
    ("list_endpoints", "GET", "/endpoints", "endpoints"),
    ("list_roles", "GET", "/roles", "roles"),
    ("list_databases", "GET", "/databases", "databases"),
    ("create_branch", "POST", "/api/v2/projects", "operations"),
]


@pytest.mark.parametrize(("route", "method", "suffix", "key"), RECORDED_OBJECTS)
def test_standin_answers_carry_every_field_the_real_api_returned(
    shapes: dict[str, dict[str, Any]], route: str, method: str, suffix: str, key: str
) -> None:
    real_fields = {
        field
        for body in _recorded(method, suffix)
        for item in body.get(key, [])
        for field in item
        # Fields tied to the moment of recording: a state change under way, a project's
        # last activity.
        if field not in {"pending_state", "compute_last_active_at"}
    }
    ours = {field for item in shapes[route][key] for field in item}
    assert real_fields - ours == set()


async def test_client_requests_use_only_what_the_spec_defines(
    neon_api: NeonStandIn, api: NeonApi
) -> None:
    """Create bodies and listing parameters exist in the spec, so the real API accepts them."""
    expires = datetime.now(UTC) + timedelta(hours=1)
    await api.create_branch(neon_api.project_id, "conform", None, expires)
    await api.list_branches(neon_api.project_id, search="conf")
    await api.list_projects()

    create = neon_api.requests_to("create_branch")[-1].body
    branch_fields = _schema("BranchCreateRequest")["properties"]["branch"]["properties"]
    assert set(create) <= _properties(_schema("BranchCreateRequest")) | _properties(
        _schema("AnnotationCreateValueRequest")
    )
    assert set(create["branch"]) <= set(branch_fields)
    assert set(create["endpoints"][0]) <= _properties(_schema("BranchCreateRequestEndpointOptions"))

    parameters = _spec()["components"]["parameters"]
    for route, spec_path in (
        ("list_branches", "/projects/{project_id}/branches"),
        ("list_projects", "/projects"),
    ):
        allowed = set()
        for parameter in _spec()["paths"][spec_path]["get"]["parameters"]:
            if "$ref" in parameter:
                parameter = parameters[parameter["$ref"].rsplit("/", 1)[-1]]
            allowed.add(parameter["name"])
        for request in neon_api.requests_to(route):
            assert set(request.query) <= allowed, route
