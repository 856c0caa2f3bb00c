"""The parts of Neon API responses that neonlocal uses, as frozen msgspec structs.

Field names follow the public v2 spec (``openapi-v2.yaml``) and the recorded responses.
Unknown fields are ignored, so a richer API response never breaks us; unknown enum values map
to ``UNKNOWN`` rather than failing, because Neon adds states over time.

msgspec rather than pydantic: a daemon that resolves branches through the API keeps these
loaded for as long as it runs, and msgspec holds about 0.7 MiB where pydantic holds 7.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import msgspec


class _Model(msgspec.Struct, frozen=True, kw_only=True):
    """A response object: built from parsed JSON by ``decode``; unknown fields are ignored."""


class _OpenEnum(enum.StrEnum):
    @classmethod
    def _missing_(cls, value: object) -> _OpenEnum:
        return cls("unknown")


class BranchState(_OpenEnum):
    INIT = "init"
    RESETTING = "resetting"
    READY = "ready"
    ARCHIVED = "archived"
    UNKNOWN = "unknown"


class EndpointState(_OpenEnum):
    INIT = "init"
    ACTIVE = "active"
    IDLE = "idle"
    UNKNOWN = "unknown"


class EndpointType(_OpenEnum):
    READ_WRITE = "read_write"
    READ_ONLY = "read_only"
    UNKNOWN = "unknown"


class OperationStatus(_OpenEnum):
    SCHEDULING = "scheduling"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ERROR = "error"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    UNKNOWN = "unknown"

    @property
    def succeeded(self) -> bool:
        return self in (OperationStatus.FINISHED, OperationStatus.SKIPPED)

    @property
    def failed(self) -> bool:
        return self in (OperationStatus.FAILED, OperationStatus.ERROR, OperationStatus.CANCELLED)


class User(_Model, frozen=True, kw_only=True):
    """The account behind a personal API key (``GET /users/me``)."""

    id: str
    email: str | None = None
    name: str | None = None


class Project(_Model, frozen=True, kw_only=True):
    id: str
    name: str
    region_id: str
    org_id: str | None = None
    store_passwords: bool | None = None
    # How far back branches can start from (point-in-time); the detail answer carries it.
    history_retention_seconds: int | None = None


class Branch(_Model, frozen=True, kw_only=True):
    id: str
    name: str
    project_id: str | None = None
    parent_id: str | None = None
    default: bool = False
    protected: bool = False
    current_state: BranchState = BranchState.UNKNOWN
    created_at: datetime | None = None
    expires_at: datetime | None = None
    # The API returns annotations beside the branch, not inside it; the client merges them.
    annotations: dict[str, str] = msgspec.field(default_factory=dict)


class Endpoint(_Model, frozen=True, kw_only=True):
    id: str
    host: str
    type: EndpointType
    current_state: EndpointState = EndpointState.UNKNOWN
    branch_id: str
    pooler_enabled: bool = False


class Role(_Model, frozen=True, kw_only=True):
    # Create responses include each role's password; it is deliberately not a field here.
    name: str
    protected: bool = False


class Database(_Model, frozen=True, kw_only=True):
    name: str
    owner_name: str


class Operation(_Model, frozen=True, kw_only=True):
    id: str
    status: OperationStatus
    action: str
    branch_id: str | None = None
    endpoint_id: str | None = None
    error: str | None = None


class CreatedBranch(NamedTuple):
    """What ``create_branch`` returns: the branch, its new computes, the work still running."""

    branch: Branch
    endpoints: list[Endpoint]
    operations: list[Operation]


class BranchOperations(NamedTuple):
    """A branch as changed by a mutation, and the operations carrying the change out."""

    branch: Branch
    operations: list[Operation]


class DeletedBranch(NamedTuple):
    """``existed`` is False when the branch was already gone (nothing to wait for)."""

    existed: bool
    operations: list[Operation]


_M = TypeVar("_M", bound=msgspec.Struct)


def decode(model: type[_M], data: Any) -> _M:
    """Parsed JSON as ``model``; raises msgspec.ValidationError, which never quotes a value.

    Lax, as JSON from a web API deserves: timestamps arrive as text.
    """
    return msgspec.convert(_open_enums(model, data), model, strict=False)


def _open_enums(model: type[msgspec.Struct], data: Any) -> Any:
    """``data`` with each enum field's unknown value replaced by ``unknown``."""
    if not isinstance(data, dict):
        return data  # convert says what is wrong with it
    fixed = data
    for field in msgspec.structs.fields(model):
        kind, value = field.type, data.get(field.encode_name)
        if isinstance(kind, type) and issubclass(kind, _OpenEnum) and isinstance(value, str):
            fixed = {**fixed, field.encode_name: kind(value).value}  # see _OpenEnum._missing_
    return fixed
