"""The Neon HTTP API: a typed async client, branch resolution by name, and its errors.

    async with NeonApi(api_key) as api:
        target = await resolve_branch(api, project_id, "dev-maria")

Everything public is exported here; the modules behind it are private to this package.
The client (``NeonApi``, ``DEFAULT_TIMEOUT``), the response models and branch resolution
are imported on first use, and with them httpx and msgspec: a daemon that serves static
branch URLs never talks to the API, and should not hold them.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from neonlocal.neon.durations import InvalidDuration, parse_duration
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
from neonlocal.neon.options import (
    DEFAULT_ANNOTATION,
    DEFAULT_API_URL,
    RetryPolicy,
    format_timestamp,
)

# httpx imports its command-line client whenever click and pygments happen to be installed
# (most development environments have both): 1.5 MiB a daemon would hold and never use.
# Set before the client module imports httpx; httpx falls back as if they were missing.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

if TYPE_CHECKING:
    from neonlocal.neon.client import DEFAULT_TIMEOUT, NeonApi
    from neonlocal.neon.models import (
        Branch,
        BranchOperations,
        BranchState,
        CreatedBranch,
        Database,
        DeletedBranch,
        Endpoint,
        EndpointState,
        EndpointType,
        Operation,
        OperationStatus,
        Project,
        Role,
        User,
    )
    from neonlocal.neon.resolve import ResolvedBranch, find_branch, pooler_host, resolve_branch
else:
    # Looked up in this order, so a name imports no more than it needs: a model loads only
    # the models, a resolver function the models too, and only the client brings httpx.
    _LAZY_MODULES = ("models", "resolve", "client")

    def __getattr__(name: str) -> Any:
        if name in __all__:  # anything else (an introspection probe, say) loads nothing
            for module in _LAZY_MODULES:
                found = getattr(importlib.import_module(f"{__name__}.{module}"), name, None)
                if found is not None:
                    return found
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_ANNOTATION",
    "DEFAULT_API_URL",
    "DEFAULT_TIMEOUT",
    "ApiUnreachable",
    "AuthenticationError",
    "Branch",
    "BranchLimit",
    "BranchNotFound",
    "BranchOperations",
    "BranchState",
    "CreatedBranch",
    "Database",
    "DeletedBranch",
    "Endpoint",
    "EndpointState",
    "EndpointType",
    "InvalidDuration",
    "NeonApi",
    "NeonApiError",
    "Operation",
    "OperationFailed",
    "OperationStatus",
    "OperationTimeout",
    "PasswordNotStored",
    "Project",
    "ProjectNotFound",
    "ProtectedBranch",
    "ResolutionError",
    "ResolvedBranch",
    "RetryPolicy",
    "Role",
    "User",
    "find_branch",
    "format_timestamp",
    "parse_duration",
    "pooler_host",
    "resolve_branch",
]
