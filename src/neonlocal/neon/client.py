"""The Neon HTTP API v2, as one async client.

Retry rules, in one place: a call is retried with exponential backoff and jitter, within
``RetryPolicy`` bounds, when the answer is 423 Locked or 429 Too Many Requests (the server did
nothing; ``Retry-After`` is honoured), and - for idempotent calls only (GET, DELETE) - on 5xx
answers and network failures. A POST that failed in a way that may have been applied (5xx,
timeout, dropped connection) is never retried: the error surfaces to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx
import msgspec
import structlog

from neonlocal import __version__
from neonlocal.neon.errors import (
    ApiUnreachable,
    AuthenticationError,
    BranchLimit,
    BranchNotFound,
    NeonApiError,
    OperationFailed,
    OperationTimeout,
    PasswordNotStored,
    ProjectNotFound,
    ProtectedBranch,
    ResolutionError,
)
from neonlocal.neon.models import (
    Branch,
    BranchOperations,
    CreatedBranch,
    Database,
    DeletedBranch,
    Endpoint,
    Operation,
    Project,
    Role,
    User,
    decode,
)
from neonlocal.neon.options import (
    DEFAULT_ANNOTATION,
    DEFAULT_API_URL,
    RetryPolicy,
    format_timestamp,
)
from neonlocal.tls.system_ca import system_context

DEFAULT_TIMEOUT = httpx.Timeout(15.0, connect=5.0)

_log = structlog.get_logger("neonlocal.neon")
_M = TypeVar("_M", bound=msgspec.Struct)

# Neon answers these before doing anything, so even a POST may be sent again.
_NOTHING_DONE = frozenset({423, 429})
_IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE"})
# Failures after which the request may or may not have reached the server.
_RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# A guard against a server that keeps handing out cursors.
_MAX_PAGES = 1000


class NeonApi:
    """An async client for the Neon API; use as ``async with NeonApi(key) as api: ...``.

    ``transport`` replaces the network (``httpx.MockTransport`` in tests); ``sleep`` replaces
    ``asyncio.sleep`` so tests can observe backoff without waiting for it.
    """

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_API_URL,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        page_size: int = 100,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        key = api_key.strip()
        if not key or not key.isascii() or not key.isprintable() or " " in key:
            # Say nothing about the value itself: it is a secret even when malformed.
            raise NeonApiError("the Neon API key is empty or contains characters a key cannot")
        self._key = key
        self.base_url = base_url.rstrip("/")
        try:
            url = httpx.URL(self.base_url)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise NeonApiError(f"the Neon API URL {base_url!r} is not an http(s) URL")
        self.retry = retry or RetryPolicy()
        self.page_size = page_size
        self._sleep = sleep
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {key}",
                "Accept": "application/json",
                "User-Agent": f"neonlocal/{__version__}",
            },
            timeout=self._timeout,
            transport=transport,
            # The system's CAs, as for the computes (system_ca says why), not certifi's.
            verify=system_context() if transport is None else True,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"NeonApi(base_url={self.base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- account and projects -------------------------------------------------------------

    async def me(self) -> User:
        """The user behind a personal API key (organisation keys get an error here)."""
        data = await self._get("/users/me")
        return self._parse(User, data, "GET /users/me")

    async def validate_key(self) -> None:
        """Raise AuthenticationError unless the key is accepted; works for any kind of key."""
        await self._get("/projects", params={"limit": 1})

    async def list_projects(self, org_id: str | None = None) -> list[Project]:
        params: dict[str, Any] = {"limit": min(self.page_size, 400)}
        if org_id:
            params["org_id"] = org_id
        projects: dict[str, Project] = {}
        async for page in self._pages("/projects", params, "projects", cursor_field="cursor"):
            for item in _list_of(page, "projects"):
                project = self._parse(Project, item, "GET /projects")
                projects.setdefault(project.id, project)
        return list(projects.values())

    async def get_project(self, project_id: str) -> Project:
        path = f"/projects/{_seg(project_id)}"
        data = await self._get(path, on_404=lambda rid: ProjectNotFound(project_id, rid))
        return self._parse(Project, data.get("project"), f"GET {path}")

    # -- branches ---------------------------------------------------------------------------

    async def list_branches(self, project_id: str, search: str | None = None) -> list[Branch]:
        """Every branch of the project (or those whose name or id contains ``search``)."""
        async with contextlib.aclosing(self.iter_branches(project_id, search)) as branches:
            return [branch async for branch in branches]

    async def iter_branches(
        self, project_id: str, search: str | None = None
    ) -> AsyncGenerator[Branch, None]:
        """Like ``list_branches``, one page at a time, so a caller can stop early.

        Close it when stopping early (``contextlib.aclosing``).
        """
        path = f"/projects/{_seg(project_id)}/branches"
        params: dict[str, Any] = {
            "limit": self.page_size,
            # Name order does not shift while we page, unlike the default updated_at order.
            "sort_by": "name",
            "sort_order": "asc",
        }
        if search is not None:
            params["search"] = search
        seen: set[str] = set()
        pages = self._pages(
            path,
            params,
            "branches",
            cursor_field="next",
            on_404=lambda rid: ProjectNotFound(project_id, rid),
        )
        async with contextlib.aclosing(pages):
            async for page in pages:
                notes = page.get("annotations") or {}
                for item in _list_of(page, "branches"):
                    branch = self._parse(Branch, item, f"GET {path}")
                    if branch.id not in seen:
                        seen.add(branch.id)
                        yield _annotated(branch, notes.get(branch.id))

    async def get_branch(self, project_id: str, branch_id: str) -> Branch:
        path = _branch_path(project_id, branch_id)
        data = await self._branch_get(project_id, branch_id, path)
        branch = self._parse(Branch, data.get("branch"), f"GET {path}")
        return _annotated(branch, data.get("annotation"))

    async def create_branch(
        self,
        project_id: str,
        name: str,
        parent_id: str | None = None,
        expires_at: datetime | None = None,
        annotation: Mapping[str, str] = DEFAULT_ANNOTATION,
        *,
        parent_timestamp: datetime | None = None,
        parent_lsn: str | None = None,
    ) -> CreatedBranch:
        """Create ``name`` with a read-write compute; its host is known at once.

        With ``parent_timestamp`` or ``parent_lsn`` it starts from the parent as it was then.
        Wait for the returned operations before the next mutation of this branch.
        """
        spec: dict[str, Any] = {"name": name}
        if parent_id:
            spec["parent_id"] = parent_id
        if expires_at is not None:
            spec["expires_at"] = format_timestamp(expires_at)
        if parent_timestamp is not None:
            spec["parent_timestamp"] = format_timestamp(parent_timestamp)
        if parent_lsn is not None:
            spec["parent_lsn"] = parent_lsn
        body: dict[str, Any] = {
            "branch": spec,
            "endpoints": [{"type": "read_write"}],
            "annotation_value": dict(annotation),
        }
        path = f"/projects/{_seg(project_id)}/branches"
        response = await self._send("POST", path, json=body)
        if response.status_code == 404:
            if parent_id:
                await self._raise_missing(project_id, parent_id)
            raise ProjectNotFound(project_id, _request_id(response))
        if response.status_code == 422:
            raise BranchLimit(self._server_message(response), _request_id(response))
        data = self._ok_json(response, "POST", path)
        context = f"POST {path}"
        branch = self._parse(Branch, data.get("branch"), context)
        if not branch.annotations and annotation:
            branch = msgspec.structs.replace(branch, annotations=dict(annotation))
        return CreatedBranch(
            branch,
            [self._parse(Endpoint, e, context) for e in _list_of(data, "endpoints")],
            [self._parse(Operation, o, context) for o in _list_of(data, "operations")],
        )

    async def restore_branch(
        self,
        project_id: str,
        branch_id: str,
        source_branch_id: str,
        *,
        preserve_under_name: str | None = None,
    ) -> BranchOperations:
        """Reset ``branch_id`` to the head of ``source_branch_id`` (usually its parent).

        Host and passwords stay the same; open connections to it are cut.
        """
        body: dict[str, Any] = {"source_branch_id": source_branch_id}
        if preserve_under_name:
            body["preserve_under_name"] = preserve_under_name
        path = _branch_path(project_id, branch_id) + "/restore"
        response = await self._send("POST", path, json=body)
        if response.status_code == 404:
            await self._raise_missing(project_id, branch_id)
            await self._raise_missing(project_id, source_branch_id)
        data = self._ok_json(response, "POST", path)
        context = f"POST {path}"
        return BranchOperations(
            self._parse(Branch, data.get("branch"), context),
            [self._parse(Operation, o, context) for o in _list_of(data, "operations")],
        )

    async def delete_branch(self, project_id: str, branch_id: str) -> DeletedBranch:
        """Delete a branch; a branch that is already gone is not an error.

        Raises ProtectedBranch, without asking Neon to delete anything, for the project's
        default branch or a protected one.
        """
        try:
            branch = await self.get_branch(project_id, branch_id)
        except BranchNotFound:
            return DeletedBranch(existed=False, operations=[])
        if branch.default:
            raise ProtectedBranch(branch.name, "the project's default branch")
        if branch.protected:
            raise ProtectedBranch(branch.name, "a protected branch")
        path = _branch_path(project_id, branch_id)
        response = await self._send("DELETE", path)
        if response.status_code in (204, 404):
            return DeletedBranch(existed=False, operations=[])
        data = self._ok_json(response, "DELETE", path)
        ops = [self._parse(Operation, o, f"DELETE {path}") for o in _list_of(data, "operations")]
        return DeletedBranch(existed=True, operations=ops)

    # -- what a branch holds ----------------------------------------------------------------

    async def list_endpoints(self, project_id: str, branch_id: str) -> list[Endpoint]:
        path = _branch_path(project_id, branch_id) + "/endpoints"
        data = await self._branch_get(project_id, branch_id, path)
        return [self._parse(Endpoint, e, f"GET {path}") for e in _list_of(data, "endpoints")]

    async def list_roles(self, project_id: str, branch_id: str) -> list[Role]:
        path = _branch_path(project_id, branch_id) + "/roles"
        data = await self._branch_get(project_id, branch_id, path)
        return [self._parse(Role, r, f"GET {path}") for r in _list_of(data, "roles")]

    async def list_databases(self, project_id: str, branch_id: str) -> list[Database]:
        path = _branch_path(project_id, branch_id) + "/databases"
        data = await self._branch_get(project_id, branch_id, path)
        return [self._parse(Database, d, f"GET {path}") for d in _list_of(data, "databases")]

    async def reveal_password(
        self, project_id: str, branch_id: str, role: str, *, branch_name: str | None = None
    ) -> str:
        """The role's password; ``branch_name`` only words the PasswordNotStored message."""
        path = _branch_path(project_id, branch_id) + f"/roles/{_seg(role)}/reveal_password"
        response = await self._send("GET", path)
        if response.status_code == 412:
            raise PasswordNotStored(branch_name or branch_id, _request_id(response))
        if response.status_code == 404:
            await self._raise_missing(project_id, branch_id)
            raise ResolutionError(
                f"no role '{role}' on branch '{branch_name or branch_id}'",
                status=404,
                request_id=_request_id(response),
            )
        password = self._ok_json(response, "GET", path).get("password")
        if not isinstance(password, str):
            raise NeonApiError(f"unexpected response from the Neon API for GET {path}")
        return password

    async def compare_schema(
        self, project_id: str, branch_id: str, base_branch_id: str, database: str
    ) -> str:
        """The unified diff from ``base_branch_id``'s schema of ``database`` to ``branch_id``'s;
        empty when they are the same."""
        path = _branch_path(project_id, branch_id) + "/compare_schema"
        params = {"base_branch_id": base_branch_id, "db_name": database}
        response = await self._send("GET", path, params=params)
        if response.status_code == 404:
            await self._raise_missing(project_id, branch_id)
            await self._raise_missing(project_id, base_branch_id)
        diff = self._ok_json(response, "GET", path).get("diff", "")
        if not isinstance(diff, str):
            raise NeonApiError(f"unexpected response from the Neon API for GET {path}")
        return diff

    # -- operations -------------------------------------------------------------------------

    async def get_operation(self, project_id: str, operation_id: str) -> Operation:
        path = f"/projects/{_seg(project_id)}/operations/{_seg(operation_id)}"
        data = await self._get(path)
        return self._parse(Operation, data.get("operation"), f"GET {path}")

    async def wait_for_operations(
        self,
        project_id: str,
        operations: Iterable[Operation],
        timeout: float = 120.0,
        *,
        poll_interval: float = 0.2,
    ) -> list[Operation]:
        """Poll until every operation is finished or skipped; return their final states.

        Raises OperationFailed as soon as one ends failed, error or cancelled, and
        OperationTimeout when ``timeout`` seconds pass first.
        """
        latest = {op.id: op for op in operations}
        deadline = time.monotonic() + timeout
        interval = poll_interval
        while True:
            for op in latest.values():
                if op.status.failed:
                    raise OperationFailed(op.id, op.action, op.status.value, op.error)
            pending = [op for op in latest.values() if not op.status.succeeded]
            if not pending:
                return list(latest.values())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimeout(
                    [f"{op.action} ({op.status.value})" for op in pending], timeout
                )
            await self._sleep(min(interval, remaining))
            interval = min(interval * 1.5, 2.0)
            for op in pending:
                latest[op.id] = await self.get_operation(project_id, op.id)

    # -- transport, retries and error mapping ------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        """One call with retries; returns the last answer, or raises ApiUnreachable."""
        idempotent = method in _IDEMPOTENT
        started = time.monotonic()
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            failure: httpx.Response | httpx.TransportError
            try:
                response = await self._http.request(method, path, params=params, json=json)
            except httpx.TransportError as exc:
                failure = exc
                # An untrusted certificate stays untrusted: say so now, not after 20 s.
                retryable = (
                    idempotent
                    and isinstance(exc, _RETRYABLE_TRANSPORT)
                    and _untrusted_certificate(exc) is None
                )
                hint = None
            else:
                status = response.status_code
                if status not in _NOTHING_DONE and not (idempotent and status >= 500):
                    return response
                failure = response
                retryable = True
                hint = _retry_after(response)
            if not retryable or attempt >= self.retry.max_attempts:
                break
            delay = hint if hint is not None else self.retry.backoff(attempt)
            # Real sleeps show in the clock; injected ones only in ``waited``.
            spent = max(time.monotonic() - started, waited)
            if spent + delay > self.retry.budget:
                break
            _log.info(
                "neon_api_retry",
                method=method,
                path=path,
                failure=_describe_failure(failure),
                attempt=attempt,
                delay=round(delay, 3),
            )
            await self._sleep(delay)
            waited += delay
        if isinstance(failure, httpx.Response):
            return failure
        raise ApiUnreachable(
            self.base_url,
            self._scrub(_describe_failure(failure)),
            maybe_applied=not idempotent and not _surely_not_sent(failure),
        ) from None

    async def _get(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        on_404: Callable[[str | None], NeonApiError] | None = None,
    ) -> dict[str, Any]:
        response = await self._send("GET", path, params=params)
        if response.status_code == 404 and on_404 is not None:
            raise on_404(_request_id(response))
        return self._ok_json(response, "GET", path)

    async def _branch_get(self, project_id: str, branch_id: str, path: str) -> dict[str, Any]:
        response = await self._send("GET", path)
        if response.status_code == 404:
            await self._raise_missing(project_id, branch_id)
        return self._ok_json(response, "GET", path)

    async def _raise_missing(self, project_id: str, branch_id: str) -> None:
        """After a 404 on a branch route, say which of project or branch is missing."""
        # The 404 alone does not say; one more call does, and only on this error path.
        await self.get_project(project_id)
        response = await self._send("GET", _branch_path(project_id, branch_id))
        if response.status_code == 404:
            raise BranchNotFound(branch_id, (), project_id, _request_id(response))

    async def _pages(
        self,
        path: str,
        params: Mapping[str, Any],
        items_key: str,
        *,
        cursor_field: str,
        on_404: Callable[[str | None], NeonApiError] | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        # Neon hands out a cursor even with the last page, so the end is an empty page.
        seen: set[str] = set()
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page_params = dict(params)
            if cursor is not None:
                page_params["cursor"] = cursor
            page = await self._get(path, params=page_params, on_404=on_404)
            yield page
            pagination = page.get("pagination")
            cursor = pagination.get(cursor_field) if isinstance(pagination, dict) else None
            if (
                not _list_of(page, items_key)
                or not isinstance(cursor, str)
                or not cursor
                or cursor in seen
            ):
                return
            seen.add(cursor)

    def _ok_json(self, response: httpx.Response, method: str, path: str) -> dict[str, Any]:
        if not response.is_success:
            raise self._error(response, method, path)
        if response.status_code == 204 or not response.content:
            return {}
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise NeonApiError(
                f"unexpected non-JSON answer from the Neon API for {method} {path}",
                status=response.status_code,
                request_id=_request_id(response),
            )
        return data

    def _error(self, response: httpx.Response, method: str, path: str) -> NeonApiError:
        status = response.status_code
        request_id = _request_id(response)
        code = _error_field(response, "code")
        detail = self._server_message(response)
        suffix = f": {detail}" if detail else ""
        if status == 401:
            return AuthenticationError(status, request_id)
        if status == 423:
            message = "the Neon project is busy with another operation (423 Locked); try again"
        elif status == 429:
            message = "too many requests to the Neon API (429); try again in a minute"
        elif status >= 500:
            message = f"the Neon API failed ({status}) on {method} {path}{suffix}"
        else:
            message = f"the Neon API refused {method} {path} ({status}){suffix}"
        return NeonApiError(message, status=status, code=code, request_id=request_id)

    def _server_message(self, response: httpx.Response) -> str:
        return self._scrub(_error_field(response, "message") or "")

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[redacted]")

    def _parse(self, model: type[_M], data: Any, context: str) -> _M:
        try:
            return decode(model, data)
        except msgspec.ValidationError as exc:
            # msgspec names the field and the expected type, never the input, which can hold
            # passwords: "Expected `str`, got `int` - at `$.id`".
            raise NeonApiError(
                f"unexpected response from the Neon API for {context}: {model.__name__}: {exc}"
            ) from None


def _seg(value: str) -> str:
    return quote(value, safe="")


def _branch_path(project_id: str, branch_id: str) -> str:
    return f"/projects/{_seg(project_id)}/branches/{_seg(branch_id)}"


def _list_of(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    return value if isinstance(value, list) else []


def _annotated(branch: Branch, annotation: Any) -> Branch:
    value = annotation.get("value") if isinstance(annotation, dict) else None
    if not isinstance(value, dict) or not value:
        return branch
    notes = {str(k): str(v) for k, v in value.items()}
    return msgspec.structs.replace(branch, annotations=notes)


def _request_id(response: httpx.Response) -> str | None:
    return _error_field(response, "request_id") or response.headers.get("x-neon-ret-request-id")


def _error_field(response: httpx.Response, field: str) -> str | None:
    try:
        data = response.json()
    except ValueError:
        return None
    value = data.get(field) if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asked us to wait, from delta-seconds or an HTTP date."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _surely_not_sent(exc: httpx.TransportError) -> bool:
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol)


def _untrusted_certificate(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a transport error, if that is what it is."""
    seen: BaseException | None = exc
    for _ in range(10):  # httpx wraps httpcore's error, which wraps the ssl module's
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe_failure(failure: httpx.Response | httpx.TransportError) -> str:
    if isinstance(failure, httpx.Response):
        return f"HTTP {failure.status_code}"
    untrusted = _untrusted_certificate(failure)
    if untrusted is not None:
        return (
            "its TLS certificate is not trusted by this system's CA store "
            f"({untrusted.verify_message})"
        )
    if isinstance(failure, httpx.ConnectTimeout):
        return "timed out connecting"
    if isinstance(failure, httpx.ReadTimeout):
        return "timed out waiting for an answer"
    if isinstance(failure, httpx.TimeoutException):
        return "timed out"
    text = " ".join(str(failure).split())
    return text or type(failure).__name__
