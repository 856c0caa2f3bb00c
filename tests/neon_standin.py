"""A local stand-in for the Neon HTTP API v2: a real HTTP server on 127.0.0.1.

It answers the routes neonlocal uses with the shapes of the real API (the JSON templates below
are the recorded responses in tests/data/neon-api/cassettes with our own ids and hosts), keeps
its state in memory, and lets a test inject faults per route and read back every request.

From pytest::

    def test_something(neon_api):                    # the fixture below
        dev = neon_api.add_branch("dev", host="ep-dev-1.us-east-2.aws.neon.tech",
                                  password="secret", database="app")
        ... NeonApi(neon_api.api_key, neon_api.base_url) ...
        neon_api.inject("create_branch", status=423, times=2)
        assert neon_api.requests_to("create_branch")[0].body["endpoints"] == [...]

From a shell::

    python tests/neon_standin.py --port 8799 --branch dev=ep-dev-1.us-east-2.aws.neon.tech

Route names for ``inject`` and ``requests_to``: see ``ROUTES``; ``"*"`` matches every route.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import difflib
import itertools
import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

DEFAULT_KEY = "neon-standin-test-key-5f2c9a"
DEFAULT_PROJECT_ID = "standin-project-100000"
DEFAULT_PASSWORD = "standin-password"
DEFAULT_ROLE = "neondb_owner"
DEFAULT_DATABASE = "neondb"
API_PREFIX = "/api/v2"

# --- response templates: recorded real responses, ids and hosts replaced -------------------

_PROJECT_TEMPLATE: dict[str, Any] = {
    "data_storage_bytes_hour": 0,
    "data_transfer_bytes": 0,
    "written_data_bytes": 0,
    "compute_time_seconds": 0,
    "active_time_seconds": 0,
    "cpu_used_sec": 0,
    "id": "",
    "platform_id": "aws",
    "region_id": "aws-us-east-2",
    "name": "",
    "provisioner": "k8s-neonvm",
    "default_endpoint_settings": {
        "autoscaling_limit_min_cu": 0.25,
        "autoscaling_limit_max_cu": 0.25,
        "suspend_timeout_seconds": 0,
    },
    "settings": {
        "allowed_ips": {"ips": [], "protected_branches_only": False},
        "enable_logical_replication": False,
        "block_public_connections": False,
        "block_vpc_connections": False,
    },
    "pg_version": 17,
    "proxy_host": "us-east-2.aws.neon.tech",
    "branch_logical_size_limit": 512,
    "branch_logical_size_limit_bytes": 536870912,
    "store_passwords": True,
    "creation_source": "console",
    "history_retention_seconds": 86400,
    "created_at": "",
    "updated_at": "",
    "synthetic_storage_size": 0,
    "consumption_period_start": "2025-01-01T00:00:00Z",
    "consumption_period_end": "2025-02-01T00:00:00Z",
    "owner_id": "00000000-0000-4000-8000-000000000001",
}
# GET /projects lists fewer fields than GET /projects/{id}, and two of its own.
_PROJECT_LIST_ONLY = {"active_time": 0, "quota_reset_at": "2025-02-01T00:00:00Z"}
_PROJECT_DETAIL_ONLY = (
    "data_storage_bytes_hour",
    "data_transfer_bytes",
    "written_data_bytes",
    "compute_time_seconds",
    "active_time_seconds",
    "history_retention_seconds",
    "consumption_period_start",
    "consumption_period_end",
)

_BRANCH_TEMPLATE: dict[str, Any] = {
    "id": "",
    "project_id": "",
    "name": "",
    "current_state": "ready",
    "state_changed_at": "",
    "creation_source": "console",
    "primary": False,
    "default": False,
    "protected": False,
    "cpu_used_sec": 0,
    "compute_time_seconds": 0,
    "active_time_seconds": 0,
    "written_data_bytes": 0,
    "data_transfer_bytes": 0,
    "created_at": "",
    "updated_at": "",
    "created_by": {"name": "neonlocal tests", "image": ""},
}

_ENDPOINT_TEMPLATE: dict[str, Any] = {
    "host": "",
    "id": "",
    "project_id": "",
    "branch_id": "",
    "autoscaling_limit_min_cu": 0.25,
    "autoscaling_limit_max_cu": 0.25,
    "region_id": "aws-us-east-2",
    "type": "read_write",
    "current_state": "idle",
    "settings": {},
    "pooler_enabled": False,
    "pooler_mode": "transaction",
    "disabled": False,
    "passwordless_access": True,
    "last_active": "2000-01-01T00:00:00Z",
    "creation_source": "console",
    "created_at": "",
    "updated_at": "",
    "proxy_host": "us-east-2.aws.neon.tech",
    "suspend_timeout_seconds": 0,
    "provisioner": "k8s-neonvm",
}

_USER: dict[str, Any] = {
    "active_seconds_limit": 0,
    "auth_accounts": [],
    "email": "standin@example.invalid",
    "id": "00000000-0000-4000-8000-000000000001",
    "image": "",
    "login": "standin",
    "name": "Stand",
    "last_name": "In",
    "projects_limit": 10,
    "branches_limit": 10,
    "max_autoscaling_limit": 2,
    "plan": "free_v2",
}

ROUTES: dict[str, tuple[str, str]] = {
    "me": ("GET", r"/users/me"),
    "list_projects": ("GET", r"/projects"),
    "get_project": ("GET", r"/projects/(?P<project>[^/]+)"),
    "list_branches": ("GET", r"/projects/(?P<project>[^/]+)/branches"),
    "create_branch": ("POST", r"/projects/(?P<project>[^/]+)/branches"),
    "get_branch": ("GET", r"/projects/(?P<project>[^/]+)/branches/(?P<branch>[^/]+)"),
    "delete_branch": ("DELETE", r"/projects/(?P<project>[^/]+)/branches/(?P<branch>[^/]+)"),
    "restore_branch": (
        "POST",
        r"/projects/(?P<project>[^/]+)/branches/(?P<branch>[^/]+)/restore",
    ),
    "list_endpoints": (
        "GET",
        r"/projects/(?P<project>[^/]+)/branches/(?P<branch>[^/]+)/endpoints",
    ),
    "list_roles": ("GET", r"/projects/(?P<project>[^/]+)/branches/(?P<branch>[^/]+)/roles"),
    "reveal_password": (
        "GET",
        r"/projects/(?P<project>[^/]+)/branches/(?P<branch>[^/]+)/roles/(?P<role>[^/]+)"
        r"/reveal_password",
    ),
    "list_databases": (
        "GET",
        r"/projects/(?P<project>[^/]+)/branches/(?P<branch>[^/]+)/databases",
    ),
    "list_operations": ("GET", r"/projects/(?P<project>[^/]+)/operations"),
    "get_operation": ("GET", r"/projects/(?P<project>[^/]+)/operations/(?P<operation>[^/]+)"),
    "compare_schema": (
        "GET",
        r"/projects/(?P<project>[^/]+)/branches/(?P<branch>[^/]+)/compare_schema",
    ),
}
_COMPILED = [(name, method, re.compile(pattern)) for name, (method, pattern) in ROUTES.items()]


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:30] or "branch"


# --- state -----------------------------------------------------------------------------------


@dataclass
class FakeEndpoint:
    id: str
    host: str
    type: str = "read_write"
    state: str = "idle"
    created_at: datetime = field(default_factory=_now)
    # Until this monotonic time the compute is still starting ("init").
    starting_until: float = 0.0


@dataclass
class FakeDatabase:
    id: int
    name: str
    owner: str


@dataclass
class FakeBranch:
    id: str
    name: str
    project_id: str
    parent_id: str | None = None
    default: bool = False
    protected: bool = False
    expires_at: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    endpoints: list[FakeEndpoint] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)  # role name -> password
    protected_roles: set[str] = field(default_factory=set)
    databases: list[FakeDatabase] = field(default_factory=list)
    # database name -> its schema as pg_dump --schema-only would print it
    schemas: dict[str, str] = field(default_factory=dict)
    # The point of the parent's history it was created from (point-in-time branches).
    parent_timestamp: str | None = None
    parent_lsn: str | None = None
    created_at: datetime = field(default_factory=_now)
    updated_at: datetime = field(default_factory=_now)
    last_reset_at: datetime | None = None
    # Until this monotonic time the branch is still being created ("init").
    creating_until: float = 0.0

    @property
    def host(self) -> str:
        """The read-write endpoint's host, the one a test maps to a real compute."""
        for endpoint in self.endpoints:
            if endpoint.type == "read_write":
                return endpoint.host
        raise LookupError(f"branch {self.name!r} has no read-write endpoint")

    @property
    def password(self) -> str:
        """The password of the branch's first role."""
        return next(iter(self.roles.values()))


@dataclass
class FakeOperation:
    id: str
    project_id: str
    branch_id: str
    action: str
    first_status: str
    final_status: str
    done_at: float
    endpoint_id: str | None = None
    error: str | None = None
    created_at: datetime = field(default_factory=_now)

    def status(self, now: float) -> str:
        return self.final_status if now >= self.done_at else self.first_status


@dataclass
class FakeProject:
    id: str
    name: str
    store_passwords: bool = True
    branch_limit: int | None = None
    branches: dict[str, FakeBranch] = field(default_factory=dict)
    operations: dict[str, FakeOperation] = field(default_factory=dict)
    created_at: datetime = field(default_factory=_now)


@dataclass
class Fault:
    """What to do to the next ``times`` requests to a route (``times=None``: every one)."""

    status: int | None = None
    times: int | None = 1
    retry_after: str | None = None
    delay: float = 0.0
    message: str | None = None
    code: str = ""


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    route: str | None
    query: dict[str, str]
    body: Any
    headers: dict[str, str]  # lower-cased names, without Authorization
    status: int


@dataclass
class _Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class _ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


# --- the server ------------------------------------------------------------------------------


class NeonStandIn:
    """An in-memory Neon project (or several) behind a real HTTP server on 127.0.0.1."""

    def __init__(
        self,
        api_key: str = DEFAULT_KEY,
        *,
        project_id: str = DEFAULT_PROJECT_ID,
        project_name: str = "neonlocal-standin",
        main_host: str | None = None,
        password: str = DEFAULT_PASSWORD,
        operation_delay: float = 0.05,
        max_page_size: int = 10000,
        lock_during_operations: bool = True,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.api_key = api_key
        # Serve HTTPS with this server context instead of plain HTTP.
        self.tls = tls
        self.project_id = project_id
        self.operation_delay = operation_delay
        self.max_page_size = max_page_size
        self.lock_during_operations = lock_during_operations
        # Chooses the endpoint host of branches created through the API, by branch name.
        self.host_factory: Callable[[str], str] | None = None
        # Called (in the server thread, under the state lock) after each mutation.
        self.on_create: Callable[[FakeBranch], None] | None = None
        self.on_restore: Callable[[FakeBranch, FakeBranch], None] | None = None
        self.on_delete: Callable[[FakeBranch], None] | None = None
        self._operation_outcome: tuple[str, str | None] = ("finished", None)
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._counter = itertools.count(100001)
        self._projects: dict[str, FakeProject] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._log: list[LoggedRequest] = []
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.add_project(project_id, project_name, main_host=main_host, password=password)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> NeonStandIn:
        standin = self

        class Handler(_Handler):
            owner = standin

        server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        if self.tls is not None:
            # A client that refuses our certificate fails the handshake inside accept(),
            # which the server shrugs off (an OSError) and goes on serving.
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> NeonStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the stand-in first"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """What to pass as the API base URL (``[neon] api_url``)."""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}{API_PREFIX}"

    # -- seeding and inspecting state ------------------------------------------------------

    def add_project(
        self,
        project_id: str,
        name: str,
        *,
        store_passwords: bool = True,
        main_host: str | None = None,
        password: str = DEFAULT_PASSWORD,
    ) -> FakeProject:
        """A project with a default branch ``main`` (role neondb_owner, database neondb)."""
        with self._lock:
            project = FakeProject(project_id, name, store_passwords=store_passwords)
            self._projects[project_id] = project
            self._new_branch(
                project,
                "main",
                parent=None,
                default=True,
                host=main_host,
                roles={DEFAULT_ROLE: password},
                databases=[(DEFAULT_DATABASE, DEFAULT_ROLE)],
            )
            return project

    def project(self, project_id: str | None = None) -> FakeProject:
        return self._projects[project_id or self.project_id]

    def add_branch(
        self,
        name: str,
        *,
        parent: str | None = "main",
        host: str | None = None,
        password: str | None = None,
        role: str | None = None,
        database: str | None = None,
        default: bool = False,
        protected: bool = False,
        endpoint: bool = True,
        endpoint_state: str = "idle",
        expires_at: str | None = None,
        annotations: dict[str, str] | None = None,
        project_id: str | None = None,
    ) -> FakeBranch:
        """Seed a ready branch. Roles and databases copy the parent's unless given."""
        with self._lock:
            project = self.project(project_id)
            parent_branch = self._find(project, parent) if parent else None
            roles = dict(parent_branch.roles) if parent_branch else {}
            if role is not None or password is not None:
                roles = {role or DEFAULT_ROLE: password or DEFAULT_PASSWORD}
            owner = next(iter(roles), DEFAULT_ROLE)
            if database is not None:
                dbs = [(database, owner)]
            elif parent_branch:
                dbs = [(d.name, d.owner) for d in parent_branch.databases]
            else:
                dbs = [(DEFAULT_DATABASE, owner)]
            branch = self._new_branch(
                project,
                name,
                parent=parent_branch,
                default=default,
                protected=protected,
                host=host,
                roles=roles,
                databases=dbs,
                endpoint=endpoint,
                endpoint_state=endpoint_state,
                expires_at=expires_at,
                annotations=annotations,
            )
            if parent_branch is not None:
                branch.schemas = dict(parent_branch.schemas)
            if default:
                for other in project.branches.values():
                    other.default = other is branch
            return branch

    def branch(self, name_or_id: str, project_id: str | None = None) -> FakeBranch:
        """A branch by name or id (KeyError if there is none)."""
        with self._lock:
            found = self._find(self.project(project_id), name_or_id)
            if found is None:
                raise KeyError(name_or_id)
            return found

    def has_branch(self, name_or_id: str, project_id: str | None = None) -> bool:
        with self._lock:
            return self._find(self.project(project_id), name_or_id) is not None

    def set_password(self, branch: str, role: str, password: str) -> None:
        with self._lock:
            self.branch(branch).roles[role] = password

    def set_schema(self, branch: str, schema: str, database: str = DEFAULT_DATABASE) -> None:
        """What ``compare_schema`` sees as the schema of ``database`` on ``branch``."""
        with self._lock:
            self.branch(branch).schemas[database] = schema

    def set_store_passwords(self, enabled: bool, project_id: str | None = None) -> None:
        with self._lock:
            self.project(project_id).store_passwords = enabled

    def set_branch_limit(self, limit: int | None, project_id: str | None = None) -> None:
        with self._lock:
            self.project(project_id).branch_limit = limit

    def set_operation_outcome(self, status: str = "finished", error: str | None = None) -> None:
        """How operations started from now on end: finished, failed, error, cancelled ..."""
        with self._lock:
            self._operation_outcome = (status, error)

    def operations(self, project_id: str | None = None) -> list[FakeOperation]:
        with self._lock:
            return list(self.project(project_id).operations.values())

    # -- faults and the request log --------------------------------------------------------

    def inject(
        self,
        route: str,
        status: int | None = None,
        *,
        times: int | None = 1,
        retry_after: str | None = None,
        delay: float = 0.0,
        message: str | None = None,
        code: str = "",
    ) -> None:
        """Make the next ``times`` requests to ``route`` fail with ``status`` and/or be slow.

        With a status, the request is answered with that error and nothing happens. Without
        one, the request is carried out and its answer held back ``delay`` seconds - a
        mutation whose answer arrives too late has still been applied.
        """
        if route != "*" and route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {sorted(ROUTES)} or '*'")
        with self._lock:
            self._faults.setdefault(route, []).append(
                Fault(status, times, retry_after, delay, message, code)
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def requests_to(self, route: str) -> list[LoggedRequest]:
        return [r for r in self.requests if r.route == route]

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # -- request handling (server threads) -------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler) -> _Reply:
        split = urlsplit(req.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in req.headers.items() if k.lower() != "authorization"}
        route, params = _match(req.command, split.path)
        body: Any = None
        with self._lock:
            try:
                if raw:
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        raise _ApiError(400, "invalid request: malformed JSON") from None
                reply = self._dispatch(req, route, params, query, body)
            except _ApiError as exc:
                reply = _error(exc.status, exc.message, exc.code)
            self._log.append(
                LoggedRequest(req.command, split.path, route, query, body, headers, reply.status)
            )
        return reply

    def _dispatch(
        self,
        req: BaseHTTPRequestHandler,
        route: str | None,
        params: dict[str, str],
        query: dict[str, str],
        body: Any,
    ) -> _Reply:
        if req.headers.get("Authorization") != f"Bearer {self.api_key}":
            raise _ApiError(401, "authentication required")
        if route is None:
            raise _ApiError(404, "not found")
        if route == "method_not_allowed":
            raise _ApiError(405, "method not allowed")
        fault = self._take_fault(route)
        if fault is not None and fault.status is not None:
            reply = _error(
                fault.status, fault.message or _default_message(fault.status), fault.code
            )
            if fault.retry_after is not None:
                reply.headers["Retry-After"] = fault.retry_after
            reply.delay = fault.delay
            return reply
        reply = getattr(self, f"_r_{route}")(params, query, body)
        if fault is not None:
            reply.delay = fault.delay
        return reply

    def _take_fault(self, route: str) -> Fault | None:
        for key in (route, "*"):
            queue = self._faults.get(key)
            if not queue:
                continue
            fault = queue[0]
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    queue.pop(0)
            return fault
        return None

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    # -- routes -----------------------------------------------------------------------------

    def _r_me(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        return _Reply(200, copy.deepcopy(_USER))

    def _r_list_projects(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        limit = _int_param(query, "limit", default=10, low=1, high=400)
        projects = sorted(self._projects.values(), key=lambda p: p.id)
        if "search" in query:
            needle = query["search"].lower()
            projects = [p for p in projects if needle in p.name.lower() or needle in p.id]
        if "cursor" in query:
            projects = [p for p in projects if p.id > query["cursor"]]
        page = projects[:limit]
        data: dict[str, Any] = {
            "projects": [self._project_json(p, listing=True) for p in page],
            "applications": {},
            "integrations": {},
        }
        if page:
            data["pagination"] = {"cursor": page[-1].id}
        return _Reply(200, data)

    def _r_get_project(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        return _Reply(200, {"project": self._project_json(self._project(params))})

    def _r_list_branches(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        project = self._project(params)
        sort_by = query.get("sort_by", "updated_at")
        if sort_by not in ("name", "created_at", "updated_at"):
            raise _ApiError(400, f"invalid sort_by: {sort_by}")
        order = query.get("sort_order", "desc").lower()
        if order not in ("asc", "desc"):
            raise _ApiError(400, f"invalid sort_order: {order}")
        limit = min(
            _int_param(query, "limit", default=self.max_page_size, low=1, high=10000),
            self.max_page_size,
        )
        branches = list(project.branches.values())
        if "search" in query:
            needle = query["search"].lower()
            branches = [b for b in branches if needle in b.name.lower() or needle in b.id]

        def key(b: FakeBranch) -> tuple[str, str]:
            return (_sort_value(b, sort_by), b.id)

        branches.sort(key=key, reverse=order == "desc")
        if "cursor" in query:
            after = _decode_cursor(query["cursor"])
            mark = (after.get("sort_by_value", ""), after.get("branch_id", ""))
            if order == "desc":
                branches = [b for b in branches if key(b) < mark]
            else:
                branches = [b for b in branches if key(b) > mark]
        page = branches[:limit]
        pagination: dict[str, Any] = {"sort_by": sort_by, "sort_order": order.upper()}
        if page:
            # Like Neon: a cursor comes with every non-empty page, the last one included.
            last = page[-1]
            pagination["next"] = _encode_cursor(
                {
                    "branch_id": last.id,
                    "sort_by": sort_by,
                    "sort_by_value": _sort_value(last, sort_by),
                    "sort_order": order.upper(),
                }
            )
        return _Reply(
            200,
            {
                "branches": [self._branch_json(b) for b in page],
                "annotations": {b.id: _annotation_json(b) for b in page if b.annotations},
                "pagination": pagination,
            },
        )

    def _r_get_branch(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        branch = self._branch(params)
        return _Reply(
            200, {"branch": self._branch_json(branch), "annotation": _annotation_json(branch)}
        )

    def _r_create_branch(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        project = self._project(params)
        body = body or {}
        if not isinstance(body, dict):
            raise _ApiError(400, "invalid request: body must be an object")
        spec = body.get("branch") or {}
        name = spec.get("name")
        if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 256):
            raise _ApiError(400, "invalid request: branch.name must be 1 to 256 characters")
        if name is not None and self._find_by_name(project, name):
            raise _ApiError(409, f"branch with name {name!r} already exists")
        parent_id = spec.get("parent_id")
        if parent_id:
            parent = project.branches.get(parent_id)
            if parent is None:
                raise _ApiError(404, "parent branch not found")
        else:
            parent = next(b for b in project.branches.values() if b.default)
        expires_at = spec.get("expires_at")
        if expires_at is not None:
            _check_expiry(expires_at)
        parent_timestamp = spec.get("parent_timestamp")
        if parent_timestamp is not None:
            _check_in_history(parent_timestamp, _PROJECT_TEMPLATE["history_retention_seconds"])
        endpoints = body.get("endpoints") or []
        if not isinstance(endpoints, list) or any(
            not isinstance(e, dict) or e.get("type") not in ("read_write", "read_only")
            for e in endpoints
        ):
            raise _ApiError(400, "invalid request: endpoints[].type must be read_write/read_only")
        if sum(e["type"] == "read_write" for e in endpoints) > 1:
            raise _ApiError(400, "a branch can have only one read_write endpoint")
        annotation = body.get("annotation_value") or {}
        if not isinstance(annotation, dict) or not all(
            isinstance(v, str) for v in annotation.values()
        ):
            raise _ApiError(400, "invalid request: annotation_value must map strings to strings")
        self._check_unlocked(project, parent.id)
        if project.branch_limit is not None and len(project.branches) >= project.branch_limit:
            raise _ApiError(422, "branches limit exceeded")

        name = name or f"br-{next(self._counter)}"
        host = self.host_factory(name) if self.host_factory and endpoints else None
        branch = self._new_branch(
            project,
            name,
            parent=parent,
            host=host,
            roles=dict(parent.roles),
            databases=[(d.name, d.owner) for d in parent.databases],
            endpoint=False,
            expires_at=expires_at,
            annotations=annotation,
        )
        branch.schemas = dict(parent.schemas)
        branch.parent_timestamp = parent_timestamp
        branch.parent_lsn = spec.get("parent_lsn")
        done_at = time.monotonic() + self.operation_delay
        branch.creating_until = done_at
        ops = [self._operation(project, branch, "create_branch", "running")]
        for spec_endpoint in endpoints:
            endpoint = self._new_endpoint(branch, spec_endpoint["type"], host, "init")
            endpoint.starting_until = done_at
            branch.endpoints.append(endpoint)
            ops.append(self._operation(project, branch, "start_compute", "scheduling", endpoint))
        if self.on_create:
            self.on_create(branch)
        return _Reply(
            201,
            {
                "branch": self._branch_json(branch),
                "endpoints": [self._endpoint_json(branch, e) for e in branch.endpoints],
                "operations": [self._operation_json(o) for o in ops],
                "roles": [_role_json(branch, r) for r in branch.roles],
                "databases": [_database_json(branch, d) for d in branch.databases],
            },
        )

    def _r_restore_branch(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        project = self._project(params)
        branch = self._branch(params)
        if not isinstance(body, dict) or not body.get("source_branch_id"):
            raise _ApiError(400, "invalid request: source_branch_id (field required)")
        source = project.branches.get(body["source_branch_id"])
        if source is None:
            raise _ApiError(404, "source branch not found")
        if source is branch and not (body.get("source_lsn") or body.get("source_timestamp")):
            raise _ApiError(400, "restoring a branch to its own head needs source_lsn/timestamp")
        children = [b for b in project.branches.values() if b.parent_id == branch.id]
        if children and not body.get("preserve_under_name"):
            raise _ApiError(400, "branch has children; preserve_under_name is required")
        self._check_unlocked(project, branch.id)
        if body.get("preserve_under_name"):
            backup = self._new_branch(
                project,
                body["preserve_under_name"],
                parent=None,
                roles=dict(branch.roles),
                databases=[(d.name, d.owner) for d in branch.databases],
                endpoint=False,
            )
            for child in children:
                child.parent_id = backup.id
        now = _now()
        branch.updated_at = now
        branch.last_reset_at = now
        ops = []
        for endpoint in branch.endpoints:
            ops.append(self._operation(project, branch, "suspend_compute", "running", endpoint))
        if not ops:
            ops.append(self._operation(project, branch, "create_timeline", "running"))
        if self.on_restore:
            self.on_restore(branch, source)
        return _Reply(
            200,
            {
                "branch": self._branch_json(branch),
                "operations": [self._operation_json(o) for o in ops],
            },
        )

    def _r_delete_branch(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        project = self._project(params)
        branch = project.branches.get(params["branch"])
        if branch is None:
            return _Reply(204)
        if branch.default:
            raise _ApiError(400, "cannot delete the project's default branch")
        if branch.protected:
            raise _ApiError(400, "cannot delete a protected branch")
        if any(b.parent_id == branch.id for b in project.branches.values()):
            raise _ApiError(400, "cannot delete a branch that has child branches")
        self._check_unlocked(project, branch.id)
        ops = [
            self._operation(project, branch, "suspend_compute", "running", e)
            for e in branch.endpoints
        ]
        ops.append(self._operation(project, branch, "delete_timeline", "scheduling"))
        data = {
            "branch": self._branch_json(branch),
            "operations": [self._operation_json(o) for o in ops],
        }
        del project.branches[branch.id]
        if self.on_delete:
            self.on_delete(branch)
        return _Reply(200, data)

    def _r_list_endpoints(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        branch = self._branch(params)
        return _Reply(
            200, {"endpoints": [self._endpoint_json(branch, e) for e in branch.endpoints]}
        )

    def _r_list_roles(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        branch = self._branch(params)
        return _Reply(200, {"roles": [_role_json(branch, r) for r in branch.roles]})

    def _r_list_databases(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        branch = self._branch(params)
        return _Reply(200, {"databases": [_database_json(branch, d) for d in branch.databases]})

    def _r_reveal_password(
        self, params: dict[str, str], query: dict[str, str], body: Any
    ) -> _Reply:
        project = self._project(params)
        branch = self._branch(params)
        if params["role"] not in branch.roles:
            raise _ApiError(404, "role not found")
        if not project.store_passwords:
            raise _ApiError(412, "storing passwords is disabled for this project")
        return _Reply(200, {"password": branch.roles[params["role"]]})

    def _r_list_operations(
        self, params: dict[str, str], query: dict[str, str], body: Any
    ) -> _Reply:
        project = self._project(params)
        ops = sorted(project.operations.values(), key=lambda o: o.created_at, reverse=True)
        data: dict[str, Any] = {"operations": [self._operation_json(o) for o in ops]}
        if ops:
            data["pagination"] = {"cursor": ops[-1].created_at.isoformat()}
        return _Reply(200, data)

    def _r_get_operation(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        project = self._project(params)
        op = project.operations.get(params["operation"])
        if op is None:
            raise _ApiError(404, "operation not found")
        return _Reply(200, {"operation": self._operation_json(op)})

    def _r_compare_schema(self, params: dict[str, str], query: dict[str, str], body: Any) -> _Reply:
        project = self._project(params)
        branch = self._branch(params)
        database = query.get("db_name")
        if not database:
            raise _ApiError(400, "invalid request: db_name (query parameter required)")
        base_id = query.get("base_branch_id") or branch.parent_id
        base = project.branches.get(base_id) if base_id else None
        if base is None:
            raise _ApiError(404 if base_id else 400, "base branch not found")
        for side in (base, branch):
            if all(d.name != database for d in side.databases):
                raise _ApiError(404, f"database {database!r} not found on branch {side.id}")
        diff = difflib.unified_diff(
            base.schemas.get(database, "").splitlines(keepends=True),
            branch.schemas.get(database, "").splitlines(keepends=True),
            fromfile=f"a/{database}",
            tofile=f"b/{database}",
        )
        return _Reply(200, {"diff": "".join(diff)})

    # -- helpers ---------------------------------------------------------------------------

    def _project(self, params: dict[str, str]) -> FakeProject:
        project = self._projects.get(params["project"])
        if project is None:
            raise _ApiError(404, "project not found")
        return project

    def _branch(self, params: dict[str, str]) -> FakeBranch:
        branch = self._project(params).branches.get(params["branch"])
        if branch is None:
            raise _ApiError(404, "branch not found")
        return branch

    @staticmethod
    def _find_by_name(project: FakeProject, name: str) -> FakeBranch | None:
        return next((b for b in project.branches.values() if b.name == name), None)

    def _find(self, project: FakeProject, name_or_id: str) -> FakeBranch | None:
        return project.branches.get(name_or_id) or self._find_by_name(project, name_or_id)

    def _check_unlocked(self, project: FakeProject, branch_id: str) -> None:
        if not self.lock_during_operations:
            return
        now = time.monotonic()
        for op in project.operations.values():
            if op.branch_id == branch_id and op.status(now) in ("scheduling", "running"):
                raise _ApiError(423, f"branch {branch_id} is locked by operation {op.id}")

    def _new_branch(
        self,
        project: FakeProject,
        name: str,
        *,
        parent: FakeBranch | None,
        roles: dict[str, str],
        databases: list[tuple[str, str]],
        default: bool = False,
        protected: bool = False,
        host: str | None = None,
        endpoint: bool = True,
        endpoint_state: str = "idle",
        expires_at: str | None = None,
        annotations: dict[str, str] | None = None,
    ) -> FakeBranch:
        n = next(self._counter)
        branch = FakeBranch(
            id=f"br-{_slug(name)}-{n}",
            name=name,
            project_id=project.id,
            parent_id=parent.id if parent else None,
            default=default,
            protected=protected,
            expires_at=expires_at,
            annotations=dict(annotations or {}),
            roles=roles,
            databases=[
                FakeDatabase(n * 10 + i, db, owner) for i, (db, owner) in enumerate(databases)
            ],
        )
        if endpoint:
            branch.endpoints.append(self._new_endpoint(branch, "read_write", host, endpoint_state))
        project.branches[branch.id] = branch
        return branch

    def _new_endpoint(
        self, branch: FakeBranch, kind: str, host: str | None, state: str
    ) -> FakeEndpoint:
        endpoint_id = (
            host.split(".", 1)[0] if host else f"ep-{_slug(branch.name)}-{next(self._counter)}"
        )
        return FakeEndpoint(
            id=endpoint_id,
            host=host or f"{endpoint_id}.us-east-2.aws.neon.tech",
            type=kind,
            state=state,
        )

    def _operation(
        self,
        project: FakeProject,
        branch: FakeBranch,
        action: str,
        first_status: str,
        endpoint: FakeEndpoint | None = None,
    ) -> FakeOperation:
        final, error = self._operation_outcome
        op = FakeOperation(
            id=str(uuid.uuid4()),
            project_id=project.id,
            branch_id=branch.id,
            action=action,
            first_status=first_status,
            final_status=final,
            done_at=time.monotonic() + self.operation_delay,
            endpoint_id=endpoint.id if endpoint else None,
            error=error,
        )
        project.operations[op.id] = op
        return op

    def _project_json(self, project: FakeProject, *, listing: bool = False) -> dict[str, Any]:
        data = copy.deepcopy(_PROJECT_TEMPLATE)
        data.update(
            id=project.id,
            name=project.name,
            store_passwords=project.store_passwords,
            created_at=_ts(project.created_at),
            updated_at=_ts(project.created_at),
        )
        if listing:
            for key in _PROJECT_DETAIL_ONLY:
                data.pop(key, None)
            data.update(_PROJECT_LIST_ONLY)
        return data

    def _branch_json(self, branch: FakeBranch) -> dict[str, Any]:
        data = copy.deepcopy(_BRANCH_TEMPLATE)
        creating = time.monotonic() < branch.creating_until
        data.update(
            id=branch.id,
            project_id=branch.project_id,
            name=branch.name,
            current_state="init" if creating else "ready",
            state_changed_at=_ts(branch.updated_at),
            primary=branch.default,
            default=branch.default,
            protected=branch.protected,
            created_at=_ts(branch.created_at),
            updated_at=_ts(branch.updated_at),
        )
        if creating:
            data["pending_state"] = "ready"
        if branch.parent_id:
            data["parent_id"] = branch.parent_id
            data["parent_lsn"] = branch.parent_lsn or "0/1DE2850"
        if branch.parent_timestamp:
            data["parent_timestamp"] = branch.parent_timestamp
        if branch.expires_at:
            data["expires_at"] = branch.expires_at
        if branch.last_reset_at:
            data["last_reset_at"] = _ts(branch.last_reset_at)
        return data

    def _endpoint_json(self, branch: FakeBranch, endpoint: FakeEndpoint) -> dict[str, Any]:
        data = copy.deepcopy(_ENDPOINT_TEMPLATE)
        starting = time.monotonic() < endpoint.starting_until
        if not starting and endpoint.state == "init":
            endpoint.state = "active"
        data.update(
            host=endpoint.host,
            id=endpoint.id,
            project_id=branch.project_id,
            branch_id=branch.id,
            type=endpoint.type,
            current_state=endpoint.state,
            created_at=_ts(endpoint.created_at),
            updated_at=_ts(endpoint.created_at),
        )
        if starting:
            data["pending_state"] = "active"
        return data

    def _operation_json(self, op: FakeOperation) -> dict[str, Any]:
        status = op.status(time.monotonic())
        data: dict[str, Any] = {
            "id": op.id,
            "project_id": op.project_id,
            "branch_id": op.branch_id,
            "action": op.action,
            "status": status,
            "failures_count": 0,
            "created_at": _ts(op.created_at),
            "updated_at": _ts(op.created_at),
            "total_duration_ms": 0,
        }
        if op.endpoint_id:
            data["endpoint_id"] = op.endpoint_id
        if op.error and status == op.final_status:
            data["error"] = op.error
        return data


class _Handler(BaseHTTPRequestHandler):
    owner: NeonStandIn
    protocol_version = "HTTP/1.1"
    server_version = "neon-standin"
    # Headers and body go out in separate writes; without this, Nagle + delayed ACK add
    # ~40 ms to every request.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the stand-in keeps its own request log; stderr noise helps nobody

    def _serve(self) -> None:
        reply = self.owner._handle(self)
        self.owner._sleep(reply.delay)
        try:
            self.send_response(reply.status)
            request_id = str(uuid.uuid4())
            self.send_header("X-Neon-Ret-Request-Id", request_id)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if reply.status == 204:
                self.end_headers()
                return
            if isinstance(reply.body, dict) and "message" in reply.body:
                reply.body.setdefault("request_id", request_id)
            payload = json.dumps(reply.body if reply.body is not None else {}).encode()
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting; nothing to tell it

    do_GET = _serve
    do_POST = _serve
    do_DELETE = _serve
    do_PATCH = _serve
    do_PUT = _serve


# --- small pure helpers ----------------------------------------------------------------------


def _match(method: str, path: str) -> tuple[str | None, dict[str, str]]:
    if not path.startswith(API_PREFIX + "/"):
        return None, {}
    rest = path[len(API_PREFIX) :]
    wrong_method = False
    for name, route_method, pattern in _COMPILED:
        found = pattern.fullmatch(rest)
        if found is None:
            continue
        if route_method != method:
            wrong_method = True
            continue
        return name, {k: unquote(v) for k, v in found.groupdict().items()}
    return ("method_not_allowed" if wrong_method else None), {}


def _error(status: int, message: str, code: str = "") -> _Reply:
    return _Reply(status, {"code": code, "message": message})


def _default_message(status: int) -> str:
    return {
        401: "authentication required",
        404: "not found",
        412: "storing passwords is disabled for this project",
        422: "branches limit exceeded",
        423: "project already has running operations, scheduling of new ones is prohibited",
        429: "too many requests",
        500: "internal server error",
        503: "service unavailable",
    }.get(status, "injected failure")


def _int_param(query: dict[str, str], name: str, *, default: int, low: int, high: int) -> int:
    if name not in query:
        return default
    try:
        value = int(query[name])
    except ValueError:
        raise _ApiError(400, f"invalid {name}: not an integer") from None
    if not low <= value <= high:
        raise _ApiError(400, f"invalid {name}: must be between {low} and {high}")
    return value


def _sort_value(branch: FakeBranch, sort_by: str) -> str:
    if sort_by == "name":
        return branch.name
    moment = branch.created_at if sort_by == "created_at" else branch.updated_at
    return moment.isoformat()


def _encode_cursor(data: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def _decode_cursor(cursor: str) -> dict[str, Any]:
    try:
        data = json.loads(base64.b64decode(cursor, validate=True))
    except ValueError:
        raise _ApiError(400, "invalid cursor") from None
    if not isinstance(data, dict):
        raise _ApiError(400, "invalid cursor")
    return data


def _check_expiry(value: Any) -> None:
    if not isinstance(value, str) or not re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value
    ):
        raise _ApiError(400, "invalid request: expires_at must be an RFC 3339 timestamp")
    if datetime.fromisoformat(value.replace("Z", "+00:00")) <= _now():
        raise _ApiError(400, "invalid request: expires_at must be in the future")


def _check_in_history(value: Any, retention_s: int) -> None:
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise _ApiError(400, "invalid request: parent_timestamp must be RFC 3339") from None
    if (_now() - when).total_seconds() > retention_s:
        raise _ApiError(
            400, "parent_timestamp is outside of the history retention window of the project"
        )


def _annotation_json(branch: FakeBranch) -> dict[str, Any]:
    return {
        "object": {"type": "console/branch", "id": branch.id},
        "value": dict(branch.annotations),
        "created_at": _ts(branch.created_at),
        "updated_at": _ts(branch.updated_at),
    }


def _role_json(branch: FakeBranch, role: str) -> dict[str, Any]:
    return {
        "branch_id": branch.id,
        "name": role,
        "protected": role in branch.protected_roles,
        "created_at": _ts(branch.created_at),
        "updated_at": _ts(branch.created_at),
    }


def _database_json(branch: FakeBranch, db: FakeDatabase) -> dict[str, Any]:
    return {
        "id": db.id,
        "branch_id": branch.id,
        "name": db.name,
        "owner_name": db.owner,
        "created_at": _ts(branch.created_at),
        "updated_at": _ts(branch.created_at),
    }


# --- pytest and command line ------------------------------------------------------------------


@pytest.fixture
def neon_api() -> Iterator[NeonStandIn]:
    """A started stand-in with project ``standin-project-100000`` and its ``main`` branch."""
    with NeonStandIn() as standin:
        yield standin


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a stand-in Neon API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default=DEFAULT_KEY, help="the API key clients must send")
    parser.add_argument("--project-id", default=DEFAULT_PROJECT_ID)
    parser.add_argument("--password", default=DEFAULT_PASSWORD, help="password of every role")
    parser.add_argument("--main-host", help="endpoint host of the default branch main")
    parser.add_argument(
        "--branch",
        action="append",
        default=[],
        metavar="NAME[=HOST]",
        help="add a branch (child of main), optionally with its endpoint host",
    )
    args = parser.parse_args(argv)
    standin = NeonStandIn(
        args.key,
        project_id=args.project_id,
        password=args.password,
        main_host=args.main_host,
        port=args.port,
    )
    for spec in args.branch:
        name, _, host = spec.partition("=")
        standin.add_branch(name, host=host or None, password=args.password)
    with standin:
        print(f"Neon API stand-in at {standin.base_url} (project {standin.project_id})")
        for branch in list(standin.project().branches.values()):
            print(f"  {branch.name:20} {branch.id:30} {branch.host}")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
