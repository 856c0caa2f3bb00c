"""The Neon API client's retry, pagination and error rules, against httpx.MockTransport."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from neonlocal import __version__
from neonlocal.neon import (
    ApiUnreachable,
    AuthenticationError,
    Branch,
    BranchLimit,
    BranchNotFound,
    BranchState,
    Endpoint,
    EndpointState,
    NeonApi,
    NeonApiError,
    Operation,
    OperationFailed,
    OperationStatus,
    OperationTimeout,
    PasswordNotStored,
    ProjectNotFound,
    ProtectedBranch,
    RetryPolicy,
)
from neonlocal.neon.models import decode

KEY = "nk-SECRET-7d1f0c2b9a4e"
BASE = "https://neon.example.invalid/api/v2"
PROJECT = "proj-1"

Step = httpx.Response | type[httpx.TransportError] | Callable[[httpx.Request], httpx.Response]


class Script:
    """Answers requests with the given steps in order; the last step repeats."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, type):
            raise step("simulated failure", request=request)
        if isinstance(step, httpx.Response):
            return step
        return step(request)


class Sleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def api_for(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> NeonApi:
    kwargs.setdefault("sleep", Sleeps())
    return NeonApi(KEY, BASE, transport=httpx.MockTransport(handler), **kwargs)


def ok(body: dict[str, Any], status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def err(status: int, message: str = "boom", **headers: str) -> httpx.Response:
    body = {"code": "", "message": message, "request_id": "req-42"}
    return httpx.Response(status, json=body, headers=headers)


def branch_json(branch_id: str, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": branch_id,
        "project_id": PROJECT,
        "name": name,
        "current_state": "ready",
        "default": False,
        "protected": False,
        "created_at": "2025-01-16T21:02:01Z",
        **extra,
    }


def operation_json(op_id: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"id": op_id, "status": status, "action": "create_branch", **extra}


PROJECTS_OK = ok({"projects": [], "applications": {}, "integrations": {}})


# -- what every request carries ---------------------------------------------------------------


async def test_requests_carry_bearer_key_json_accept_and_neonlocal_user_agent() -> None:
    """Every call authenticates with the key and names neonlocal and its version."""
    script = Script(PROJECTS_OK)
    async with api_for(script) as api:
        await api.validate_key()
    sent = script.requests[0]
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["accept"] == "application/json"
    assert sent.headers["user-agent"] == f"neonlocal/{__version__}"
    assert str(sent.url).startswith(f"{BASE}/projects")


async def test_default_timeouts_are_five_seconds_to_connect_and_fifteen_to_read() -> None:
    """A hung API fails a call in bounded time instead of hanging the CLI."""
    script = Script(PROJECTS_OK)
    async with api_for(script) as api:
        await api.validate_key()
    timeouts = script.requests[0].extensions["timeout"]
    assert timeouts["connect"] == 5.0
    assert timeouts["read"] == 15.0


# -- retries ------------------------------------------------------------------------------------


async def test_get_is_retried_after_server_errors_until_it_succeeds() -> None:
    """A 502 and a 503 on a read are retried; the caller only sees the answer."""
    script = Script(err(502), err(503), ok({"branch": branch_json("br-a", "a")}))
    sleeps = Sleeps()
    async with api_for(script, sleep=sleeps) as api:
        branch = await api.get_branch(PROJECT, "br-a")
    assert branch.name == "a"
    assert len(script.requests) == 3
    assert len(sleeps) == 2


async def test_backoff_doubles_with_jitter_and_gives_up_after_max_attempts() -> None:
    """Waits grow exponentially (each jittered within its half-to-full window), up to 5 tries."""
    script = Script(err(500))
    sleeps = Sleeps()
    policy = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=8.0, budget=60.0)
    async with api_for(script, sleep=sleeps, retry=policy) as api:
        with pytest.raises(NeonApiError) as caught:
            await api.get_branch(PROJECT, "br-a")
    assert caught.value.status == 500
    assert len(script.requests) == 5
    ceilings = [0.5, 1.0, 2.0, 4.0]
    assert len(sleeps) == len(ceilings)
    for slept, ceiling in zip(sleeps, ceilings, strict=True):
        assert ceiling / 2 <= slept <= ceiling


async def test_backoff_is_capped_at_max_delay() -> None:
    """However many retries, no single wait exceeds max_delay."""
    policy = RetryPolicy(max_attempts=8, base_delay=1.0, max_delay=3.0, budget=1000.0)
    waits = [policy.backoff(attempt) for attempt in range(1, 9)]
    assert max(waits) <= 3.0
    assert waits[-1] >= 1.5


async def test_total_waiting_stays_within_the_retry_budget() -> None:
    """A call gives up rather than wait past its budget, whatever max_attempts says."""
    script = Script(err(503))
    sleeps = Sleeps()
    policy = RetryPolicy(max_attempts=50, base_delay=1.0, max_delay=4.0, budget=10.0)
    async with api_for(script, sleep=sleeps, retry=policy) as api:
        with pytest.raises(NeonApiError):
            await api.get_branch(PROJECT, "br-a")
    assert sum(sleeps) <= 10.0
    assert len(script.requests) < 50


async def test_retry_after_seconds_is_waited_exactly() -> None:
    """A 429 with Retry-After: 7 waits 7 seconds, not a backoff guess."""
    script = Script(err(429, **{"Retry-After": "7"}), PROJECTS_OK)
    sleeps = Sleeps()
    async with api_for(script, sleep=sleeps) as api:
        await api.validate_key()
    assert sleeps == [7.0]


async def test_retry_after_as_an_http_date_is_honoured() -> None:
    """Retry-After may be a date; the wait is the time until then."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=4), usegmt=True)
    script = Script(err(429, **{"Retry-After": when}), PROJECTS_OK)
    sleeps = Sleeps()
    async with api_for(script, sleep=sleeps) as api:
        await api.validate_key()
    assert len(sleeps) == 1
    assert 2.0 <= sleeps[0] <= 4.0


async def test_retry_after_beyond_the_budget_gives_up_at_once() -> None:
    """Asked to come back in an hour, the client reports the rate limit instead of hanging."""
    script = Script(err(429, **{"Retry-After": "3600"}))
    sleeps = Sleeps()
    async with api_for(script, sleep=sleeps) as api:
        with pytest.raises(NeonApiError, match=r"too many requests to the Neon API \(429\)"):
            await api.validate_key()
    assert sleeps == []
    assert len(script.requests) == 1


async def test_post_is_not_retried_after_a_server_error() -> None:
    """A 500 on create may have created the branch: it surfaces, it is not sent again."""
    script = Script(err(500, "internal error"))
    async with api_for(script) as api:
        with pytest.raises(NeonApiError) as caught:
            await api.create_branch(PROJECT, "dev")
    assert caught.value.status == 500
    assert "internal error" in str(caught.value)
    assert len(script.requests) == 1


async def test_post_is_not_retried_after_a_timeout_and_says_it_may_have_happened() -> None:
    """A create whose answer never came is reported as possibly done, and not repeated."""
    script = Script(httpx.ReadTimeout)
    async with api_for(script) as api:
        with pytest.raises(ApiUnreachable) as caught:
            await api.create_branch(PROJECT, "dev")
    assert len(script.requests) == 1
    assert "may still have been carried out" in str(caught.value)


async def test_post_is_retried_while_the_project_is_locked() -> None:
    """423 Locked means nothing happened: the create is sent again until it goes through."""
    created = ok(
        {"branch": branch_json("br-dev", "dev"), "endpoints": [], "operations": []}, status=201
    )
    script = Script(err(423), err(423), created)
    async with api_for(script) as api:
        result = await api.create_branch(PROJECT, "dev")
    assert result.branch.id == "br-dev"
    assert [r.method for r in script.requests] == ["POST", "POST", "POST"]


async def test_restore_is_retried_on_429_but_not_on_503() -> None:
    """Restore is a POST: rate limiting is retried, a server failure is not."""
    done = ok({"branch": branch_json("br-a", "a"), "operations": []})
    limited = Script(err(429, **{"Retry-After": "0"}), done)
    async with api_for(limited) as api:
        await api.restore_branch(PROJECT, "br-a", "br-main")
    assert len(limited.requests) == 2

    failing = Script(err(503), done)
    async with api_for(failing) as api:
        with pytest.raises(NeonApiError):
            await api.restore_branch(PROJECT, "br-a", "br-main")
    assert len(failing.requests) == 1


async def test_get_is_retried_after_a_connection_error() -> None:
    """A dropped connection on a read is retried transparently."""
    script = Script(httpx.ConnectError, PROJECTS_OK)
    async with api_for(script) as api:
        await api.validate_key()
    assert len(script.requests) == 2


async def test_delete_is_retried_after_a_server_error() -> None:
    """Deleting twice is harmless, so a 502 on DELETE is retried."""
    get = ok({"branch": branch_json("br-a", "a")})
    script = Script(get, err(502), ok({"branch": branch_json("br-a", "a"), "operations": []}))
    async with api_for(script) as api:
        result = await api.delete_branch(PROJECT, "br-a")
    assert result.existed
    assert [r.method for r in script.requests] == ["GET", "DELETE", "DELETE"]


async def test_unreachable_api_names_the_base_url_and_the_cause() -> None:
    """With no network the error says where we tried to go and what happened, on one line."""
    script = Script(httpx.ConnectError)
    async with api_for(script, retry=RetryPolicy(max_attempts=3)) as api:
        with pytest.raises(ApiUnreachable) as caught:
            await api.validate_key()
    assert str(caught.value) == f"cannot reach the Neon API at {BASE}: simulated failure"
    assert len(script.requests) == 3


# -- pagination ----------------------------------------------------------------------------------


def paged(pages: list[list[dict[str, Any]]], cursors: list[str | None]) -> Callable[..., Any]:
    def answer(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        index = 0 if cursor is None else cursors.index(cursor) + 1
        if index >= len(pages):
            # Past the end, hand out ever new cursors: only the empty page can stop the client.
            return ok({"branches": [], "annotations": {}, "pagination": {"next": f"e{index}"}})
        body: dict[str, Any] = {"branches": pages[index], "annotations": {}}
        body["pagination"] = {"next": cursors[index]} if cursors[index] else {}
        return ok(body)

    return answer


async def test_list_branches_follows_cursors_across_pages_until_an_empty_page() -> None:
    """All branches come back even when Neon hands out a cursor with the last page."""
    pages = [
        [branch_json("br-1", "a"), branch_json("br-2", "b")],
        [branch_json("br-3", "c")],
    ]
    script = Script(paged(pages, ["c1", "c2"]))
    async with api_for(script) as api:
        branches = await api.list_branches(PROJECT, search="x")
    assert [b.id for b in branches] == ["br-1", "br-2", "br-3"]
    sent = [r.url.params for r in script.requests]
    assert [p.get("cursor") for p in sent] == [None, "c1", "c2"]
    assert all(p["search"] == "x" for p in sent)


async def test_list_branches_stops_when_the_cursor_repeats() -> None:
    """A server that keeps returning the same cursor cannot make the client loop forever."""
    page = ok({"branches": [branch_json("br-1", "a")], "pagination": {"next": "same"}})
    script = Script(page)
    async with api_for(script) as api:
        branches = await api.list_branches(PROJECT)
    assert [b.id for b in branches] == ["br-1"]
    assert len(script.requests) == 2


async def test_list_projects_follows_the_pagination_cursor() -> None:
    """Projects page with pagination.cursor, as recorded from the real API."""

    def answer(request: httpx.Request) -> httpx.Response:
        after = request.url.params.get("cursor")
        items = {None: ["p-1", "p-2"], "p-2": ["p-3"]}.get(after, [])
        body: dict[str, Any] = {
            "projects": [{"id": i, "name": i, "region_id": "aws-us-east-2"} for i in items]
        }
        if items:
            body["pagination"] = {"cursor": items[-1]}
        return ok(body)

    async with api_for(answer) as api:
        projects = await api.list_projects()
    assert [p.id for p in projects] == ["p-1", "p-2", "p-3"]


async def test_branch_annotations_from_the_listing_land_on_each_branch() -> None:
    """A branch made by neonlocal can be recognised from its annotation."""
    body = {
        "branches": [branch_json("br-1", "mine"), branch_json("br-2", "theirs")],
        "annotations": {"br-1": {"object": {}, "value": {"created-by": "neonlocal"}}},
        "pagination": {},
    }
    async with api_for(Script(ok(body))) as api:
        mine, theirs = await api.list_branches(PROJECT)
    assert mine.annotations == {"created-by": "neonlocal"}
    assert theirs.annotations == {}


# -- requests we build -------------------------------------------------------------------------


async def test_create_sends_a_read_write_endpoint_annotation_and_utc_expiry() -> None:
    """Create asks for a compute, marks the branch as ours and sets expires_at in UTC."""
    created = ok(
        {"branch": branch_json("br-dev", "dev"), "endpoints": [], "operations": []}, status=201
    )
    script = Script(created)
    expiry = datetime(2030, 5, 1, 14, 30, 15, 999, tzinfo=timezone(timedelta(hours=2)))
    async with api_for(script) as api:
        result = await api.create_branch(PROJECT, "dev", parent_id="br-main", expires_at=expiry)
    body = json.loads(script.requests[0].content)
    assert body == {
        "branch": {"name": "dev", "parent_id": "br-main", "expires_at": "2030-05-01T12:30:15Z"},
        "endpoints": [{"type": "read_write"}],
        "annotation_value": {"created-by": "neonlocal"},
    }
    assert result.branch.annotations == {"created-by": "neonlocal"}


async def test_create_without_parent_or_expiry_leaves_them_to_neon() -> None:
    """No parent means Neon's default branch; no expiry means the branch stays."""
    created = ok({"branch": branch_json("br-x", "x"), "endpoints": [], "operations": []}, 201)
    script = Script(created)
    async with api_for(script) as api:
        await api.create_branch(PROJECT, "x")
    assert json.loads(script.requests[0].content)["branch"] == {"name": "x"}


async def test_create_refuses_an_expiry_without_a_timezone() -> None:
    """A naive datetime would be read in an unknown zone; it is refused before any request."""
    script = Script(PROJECTS_OK)
    async with api_for(script) as api:
        with pytest.raises(ValueError, match="timezone"):
            await api.create_branch(PROJECT, "x", expires_at=datetime(2030, 1, 1))
    assert script.requests == []


async def test_role_names_are_escaped_in_the_password_path() -> None:
    """A role name with spaces or slashes still reaches the right URL."""
    script = Script(ok({"password": "pw"}))
    async with api_for(script) as api:
        assert await api.reveal_password(PROJECT, "br-1", "app user/x") == "pw"
    assert script.requests[0].url.raw_path.endswith(b"/roles/app%20user%2Fx/reveal_password")


# -- error mapping ------------------------------------------------------------------------------


def by_path(routes: dict[str, httpx.Response]) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v2")
        return routes.get(path, err(404, "not found"))

    return answer


async def test_401_says_the_key_was_rejected() -> None:
    async with api_for(Script(err(401, "unauthorized"))) as api:
        with pytest.raises(AuthenticationError) as caught:
            await api.list_branches(PROJECT)
    assert caught.value.message == "the Neon API key was rejected (401)"
    assert caught.value.request_id == "req-42"


async def test_404_listing_branches_means_the_project_is_missing() -> None:
    async with api_for(Script(err(404))) as api:
        with pytest.raises(ProjectNotFound, match=f"no Neon project with id '{PROJECT}'"):
            await api.list_branches(PROJECT)


async def test_404_on_a_branch_of_an_existing_project_means_the_branch_is_missing() -> None:
    """The client asks once more to tell a missing branch from a missing project."""
    project = ok({"project": {"id": PROJECT, "name": "p", "region_id": "aws-us-east-2"}})
    async with api_for(by_path({f"/projects/{PROJECT}": project})) as api:
        with pytest.raises(BranchNotFound, match="no branch with id 'br-gone'"):
            await api.list_endpoints(PROJECT, "br-gone")


async def test_404_on_a_branch_of_a_missing_project_names_the_project() -> None:
    async with api_for(by_path({})) as api:
        with pytest.raises(ProjectNotFound):
            await api.get_branch(PROJECT, "br-any")


async def test_412_on_reveal_password_says_to_configure_a_connection_string() -> None:
    async with api_for(Script(err(412, "storing passwords is disabled"))) as api:
        with pytest.raises(PasswordNotStored) as caught:
            await api.reveal_password(PROJECT, "br-1", "owner", branch_name="dev-maria")
    assert caught.value.message == (
        "project does not store passwords; put a connection string in [branches.dev-maria] url"
    )


async def test_422_on_create_is_the_branch_limit() -> None:
    async with api_for(Script(err(422, "branches limit exceeded"))) as api:
        with pytest.raises(BranchLimit, match=r"branch limit \(422\): branches limit exceeded"):
            await api.create_branch(PROJECT, "one-too-many")


async def test_other_refusals_carry_the_servers_message_and_request_id() -> None:
    async with api_for(Script(err(400, "invalid request: name too long"))) as api:
        with pytest.raises(NeonApiError) as caught:
            await api.create_branch(PROJECT, "x" * 300)
    text = str(caught.value)
    assert "(400): invalid request: name too long" in text
    assert text.endswith("(request id req-42)")


async def test_error_messages_are_a_single_line() -> None:
    """Server text with line breaks still makes one CLI line."""
    async with api_for(Script(err(400, "first line\nsecond line\r\n"))) as api:
        with pytest.raises(NeonApiError) as caught:
            await api.get_branch(PROJECT, "br-1")
    assert "\n" not in str(caught.value)
    assert "first line second line" in str(caught.value)


async def test_an_unexpected_response_shape_names_the_field_but_not_its_values() -> None:
    """A broken answer is reported by field; values (which can be passwords) are not echoed."""
    body = {"roles": [{"password": "hunter2-do-not-print"}]}
    async with api_for(Script(ok(body))) as api:
        with pytest.raises(NeonApiError) as caught:
            await api.list_roles(PROJECT, "br-1")
    assert "name" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(caught.value)


async def test_a_non_json_answer_is_reported_as_unexpected() -> None:
    html = httpx.Response(200, text="<html>captive portal</html>")
    async with api_for(Script(html)) as api:
        with pytest.raises(NeonApiError, match="unexpected non-JSON answer"):
            await api.list_branches(PROJECT)


# -- deletion rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ({"default": True}, "the project's default branch"),
        ({"protected": True}, "a protected branch"),
    ],
)
async def test_delete_refuses_default_and_protected_branches_without_asking_neon(
    flags: dict[str, bool], reason: str
) -> None:
    script = Script(ok({"branch": branch_json("br-main", "main", **flags)}))
    async with api_for(script) as api:
        with pytest.raises(ProtectedBranch) as caught:
            await api.delete_branch(PROJECT, "br-main")
    assert str(caught.value) == f"refusing to delete branch 'main': it is {reason}"
    assert [r.method for r in script.requests] == ["GET"]


async def test_deleting_a_branch_that_is_already_gone_is_fine() -> None:
    """404 on the branch (project present) or 204 on DELETE both mean: nothing to do."""
    project = ok({"project": {"id": PROJECT, "name": "p", "region_id": "aws-us-east-2"}})
    async with api_for(by_path({f"/projects/{PROJECT}": project})) as api:
        assert (await api.delete_branch(PROJECT, "br-gone")).existed is False

    raced = Script(ok({"branch": branch_json("br-x", "x")}), httpx.Response(204))
    async with api_for(raced) as api:
        assert (await api.delete_branch(PROJECT, "br-x")).existed is False


# -- operations ---------------------------------------------------------------------------------


async def test_waiting_polls_each_operation_until_it_finishes() -> None:
    script = Script(
        ok({"operation": operation_json("op-1", "running")}),
        ok({"operation": operation_json("op-1", "finished")}),
    )
    started = [decode(Operation, operation_json("op-1", "scheduling"))]
    async with api_for(script) as api:
        final = await api.wait_for_operations(PROJECT, started, timeout=10)
    assert [op.status for op in final] == [OperationStatus.FINISHED]
    assert len(script.requests) == 2


async def test_a_failed_operation_raises_with_its_error() -> None:
    script = Script(ok({"operation": operation_json("op-1", "failed", error="disk full")}))
    ops = [decode(Operation, operation_json("op-1", "running"))]
    async with api_for(script) as api:
        with pytest.raises(
            OperationFailed, match=r"create_branch \(op-1\) ended failed: disk full"
        ):
            await api.wait_for_operations(PROJECT, ops, timeout=10)


async def test_waiting_gives_up_after_the_timeout_naming_what_is_pending() -> None:
    script = Script(ok({"operation": operation_json("op-1", "running")}))
    ops = [decode(Operation, operation_json("op-1", "running"))]
    async with NeonApi(KEY, BASE, transport=httpx.MockTransport(script)) as api:
        with pytest.raises(OperationTimeout, match=r"create_branch \(running\)"):
            await api.wait_for_operations(PROJECT, ops, timeout=0.2, poll_interval=0.02)


# -- models ---------------------------------------------------------------------------------------


def test_states_neon_adds_later_do_not_break_parsing() -> None:
    branch = decode(Branch, branch_json("br-1", "a", current_state="hibernating"))
    endpoint = decode(
        Endpoint,
        {
            "id": "ep-1",
            "host": "h",
            "type": "read_write",
            "branch_id": "br-1",
            "current_state": "x",
        },
    )
    op = decode(Operation, operation_json("op", "paused"))
    assert branch.current_state is BranchState.UNKNOWN
    assert endpoint.current_state is EndpointState.UNKNOWN
    assert op.status is OperationStatus.UNKNOWN
    assert not op.status.succeeded
    assert not op.status.failed


# -- the key stays secret ------------------------------------------------------------------------


def _echo_key(request: httpx.Request) -> httpx.Response:
    return err(400, f"bad header {request.headers['authorization']}")


FAILURES: dict[str, tuple[Step, Callable[[NeonApi], Any]]] = {
    "401": (err(401), lambda api: api.list_branches(PROJECT)),
    "404": (err(404), lambda api: api.list_branches(PROJECT)),
    "412": (err(412), lambda api: api.reveal_password(PROJECT, "br-1", "r")),
    "422": (err(422), lambda api: api.create_branch(PROJECT, "x")),
    "500": (err(500), lambda api: api.create_branch(PROJECT, "x")),
    "connect": (httpx.ConnectError, lambda api: api.get_branch(PROJECT, "br-1")),
    "timeout": (httpx.ReadTimeout, lambda api: api.create_branch(PROJECT, "x")),
    "not json": (httpx.Response(200, text="nope"), lambda api: api.me()),
    "bad shape": (ok({"branch": {"id": 5}}), lambda api: api.get_branch(PROJECT, "br-1")),
    "server echoes key": (_echo_key, lambda api: api.get_branch(PROJECT, "br-1")),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_the_api_key_never_appears_in_an_error(failure: str) -> None:
    """Whatever goes wrong, the key is in no message, repr or traceback."""
    step, call = FAILURES[failure]
    async with api_for(Script(step), retry=RetryPolicy(max_attempts=2)) as api:
        with pytest.raises(NeonApiError) as caught:
            await call(api)
        assert KEY not in repr(api)
    text = "".join(traceback.format_exception(caught.value))
    assert KEY not in str(caught.value)
    assert KEY not in repr(caught.value)
    assert KEY not in text


def test_a_malformed_key_is_refused_without_repeating_it() -> None:
    """A key with a line break (a bad key file) fails clearly and is not echoed."""
    with pytest.raises(NeonApiError) as caught:
        NeonApi("nk-SECRET\nsecond-line")
    assert "SECRET" not in str(caught.value)
    assert "SECRET" not in repr(caught.value)


@pytest.mark.parametrize("url", ["console.neon.tech/api/v2", "ftp://neon.example/api", "http://"])
def test_a_base_url_that_is_not_http_is_refused_up_front(url: str) -> None:
    with pytest.raises(NeonApiError, match="is not an http"):
        NeonApi(KEY, url)
