"""The parts of Neon API responses that neonlocal uses, as frozen pydantic models.

Field names follow the public v2 spec (``openapi-v2.yaml``) and the recorded responses.
Unknown fields are ignored, so a richer API response never breaks us; unknown enum values map
to ``UNKNOWN`` rather than failing, because Neon adds states over time.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


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


class User(_Model):
    """The account behind a personal API key (``GET /users/me``)."""

    id: str
    email: str | None = None
    name: str | None = None


class Project(_Model):
    id: str
    name: str
    region_id: str
    org_id: str | None = None
    store_passwords: bool | None = None


class Branch(_Model):
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
    annotations: dict[str, str] = Field(default_factory=dict)


class Endpoint(_Model):
    id: str
    host: str
    type: EndpointType
    current_state: EndpointState = EndpointState.UNKNOWN
    branch_id: str
    pooler_enabled: bool = False


class Role(_Model):
    # Create responses include each role's password; it is deliberately not a field here.
    name: str
    protected: bool = False


class Database(_Model):
    name: str
    owner_name: str


class Operation(_Model):
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
