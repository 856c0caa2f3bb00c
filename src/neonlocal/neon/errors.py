"""Everything that can go wrong talking to the Neon API, as one exception tree.

    NeonApiError                 any failure; carries status, code and request_id
    ├── AuthenticationError      401: the API key was rejected
    ├── ProjectNotFound          404 on a project route
    ├── BranchNotFound           no branch with that name or id (lists close matches)
    ├── PasswordNotStored        412 on reveal_password: the project keeps no passwords
    ├── BranchLimit              422 on create: the project has no room for another branch
    ├── ProtectedBranch          our own refusal to delete a default or protected branch
    ├── ResolutionError          the branch exists but lacks a compute, role or database to use
    ├── OperationFailed          a Neon operation ended failed, error or cancelled
    ├── OperationTimeout         operations still running when we stopped waiting
    └── ApiUnreachable           network, DNS or timeout: no answer from the API

Every ``str()`` is one line a CLI user can act on. No message, repr or attribute holds the
API key: the client never passes it to these constructors, and server text is scrubbed of
it before it gets here.
"""

from __future__ import annotations

from collections.abc import Sequence


def _one_line(text: str) -> str:
    return " ".join(text.split())


class NeonApiError(Exception):
    """A failed call to the Neon API, or a result we cannot use."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.message = _one_line(message)
        self.status = status
        self.code = code or None
        self.request_id = request_id or None
        super().__init__(self.message)

    def __str__(self) -> str:
        if self.request_id:
            return f"{self.message} (request id {self.request_id})"
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status={self.status!r}, "
            f"code={self.code!r}, request_id={self.request_id!r})"
        )


class AuthenticationError(NeonApiError):
    """The API answered 401: the key is wrong, revoked or expired."""

    def __init__(self, status: int = 401, request_id: str | None = None) -> None:
        super().__init__(
            f"the Neon API key was rejected ({status})", status=status, request_id=request_id
        )


class ProjectNotFound(NeonApiError):
    """The project id names no project this key can see."""

    def __init__(self, project_id: str, request_id: str | None = None) -> None:
        self.project_id = project_id
        super().__init__(
            f"no Neon project with id '{project_id}' is visible to this API key",
            status=404,
            request_id=request_id,
        )


class BranchNotFound(NeonApiError):
    """No branch in the project has that exact name (or id)."""

    def __init__(
        self,
        name: str,
        close_matches: Sequence[str] = (),
        project_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.name = name
        self.close_matches = tuple(close_matches)
        self.project_id = project_id
        where = f" in project {project_id}" if project_id else ""
        what = "with id" if name.startswith("br-") else "named"
        message = f"no branch {what} '{name}'{where}"
        if self.close_matches:
            message += "; did you mean " + ", ".join(f"'{m}'" for m in self.close_matches) + "?"
        super().__init__(message, status=404, request_id=request_id)


class PasswordNotStored(NeonApiError):
    """reveal_password answered 412: the project was created with store_passwords off."""

    def __init__(self, branch_name: str, request_id: str | None = None) -> None:
        self.branch_name = branch_name
        super().__init__(
            "project does not store passwords; "
            f"put a connection string in [branches.{branch_name}] url",
            status=412,
            request_id=request_id,
        )


class BranchLimit(NeonApiError):
    """Creating a branch answered 422: the project's plan allows no more branches."""

    def __init__(self, detail: str = "", request_id: str | None = None) -> None:
        message = "the Neon project has reached its branch limit (422)"
        if detail:
            message += f": {detail}"
        super().__init__(message, status=422, request_id=request_id)


class ProtectedBranch(NeonApiError):
    """We refuse to delete the default branch or a protected one."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        super().__init__(f"refusing to delete branch '{name}': it is {reason}")


class ResolutionError(NeonApiError):
    """The branch exists but has no usable compute endpoint, role or database."""


class OperationFailed(NeonApiError):
    """A Neon operation (create, restore, delete ...) ended without success."""

    def __init__(
        self, operation_id: str, action: str, status: str, detail: str | None = None
    ) -> None:
        self.operation_id = operation_id
        message = f"Neon operation {action} ({operation_id}) ended {status}"
        if detail:
            message += f": {detail}"
        super().__init__(message)


class OperationTimeout(NeonApiError):
    """Neon operations were still running when our wait ran out."""

    def __init__(self, pending: Sequence[str], timeout: float) -> None:
        self.pending = tuple(pending)
        super().__init__(
            f"Neon operations still running after {timeout:g} s: " + ", ".join(self.pending)
        )


class ApiUnreachable(NeonApiError):
    """No HTTP answer: refused connection, DNS failure, TLS failure or timeout."""

    def __init__(self, base_url: str, cause: str, *, maybe_applied: bool = False) -> None:
        self.base_url = base_url
        message = f"cannot reach the Neon API at {base_url}: {cause}"
        if maybe_applied:
            message += " (the request may still have been carried out)"
        super().__init__(message)
