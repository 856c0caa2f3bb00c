"""Follow a repository's git branch: when HEAD moves, select the Neon branch of that name.

The rules that keep following safe:
- a detached HEAD (a rebase, a bisect, a checked-out tag) changes nothing;
- the project's default branch and protected branches are followed into only when
  ``[git] map`` names them explicitly, so checking out ``main`` never points an app at
  production by accident; for the same reason a static ``[branches.NAME]`` table (whose
  nature the API cannot vouch for) is followed only when mapped;
- a missing Neon branch is created (from ``[git] parent``) only with ``[git] create = true``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import structlog

from neonlocal.errors import UserError
from neonlocal.filewatch import watch_file
from neonlocal.neon import BranchNotFound
from neonlocal.resolver import TargetResolver, create_branch

__all__ = [
    "FollowSkipped",
    "GitFollowError",
    "GitFollower",
    "current_branch",
    "find_git_dir",
    "neon_branch_for",
]

log = structlog.get_logger("neonlocal.git")

_HEADS: Final = "ref: refs/heads/"
_ANNOTATION: Final = {"created-by": "neonlocal", "purpose": "git-follow"}


class GitFollowError(UserError):
    """The repository cannot be followed; one line for the user."""


class FollowSkipped(Exception):
    """This git branch leads to no Neon branch we may switch to; says why."""


def find_git_dir(repo: Path) -> Path:
    """The git directory of the work tree containing ``repo`` (worktrees included)."""
    start = repo.expanduser().resolve()
    for directory in (start, *start.parents):
        dot_git = directory / ".git"
        if dot_git.is_dir():
            return dot_git
        if dot_git.is_file():
            # Linked worktrees and submodules: ".git" is a file saying "gitdir: <path>".
            text = dot_git.read_text(errors="replace").strip()
            if text.startswith("gitdir:"):
                return (directory / text.removeprefix("gitdir:").strip()).resolve()
    raise GitFollowError(f"{start} is not inside a git repository; set [git] repo")


def current_branch(git_dir: Path) -> str | None:
    """The checked-out branch's name; None for a detached HEAD."""
    head = (git_dir / "HEAD").read_text(errors="replace").strip()
    if head.startswith(_HEADS):
        return head.removeprefix(_HEADS)
    return None


async def neon_branch_for(resolver: TargetResolver, git_branch: str) -> str:
    """The Neon branch to select for ``git_branch``, created when configured to.

    Raises FollowSkipped when there is none we may follow into, and NeonApiError or
    ApiKeyError when the API cannot tell.
    """
    settings = resolver.settings
    git = settings.git
    explicit = git_branch in git.map
    name = git.map.get(git_branch, git_branch)
    if resolver.static_table(name) is not None:
        if explicit:
            return name
        raise FollowSkipped(
            f'[branches.{name}] is a fixed connection string; add "{git_branch}" = "{name}" '
            "to [git.map] to follow into it"
        )
    project = resolver.project_id
    if project is None:
        raise FollowSkipped(f"no [branches.{name}] table and no [neon] project_id to look it up")
    from neonlocal.neon import find_branch

    api = await resolver.api()
    try:
        branch = await find_branch(api, project, name)
    except BranchNotFound:
        if not git.create:
            raise FollowSkipped(
                f'no Neon branch named "{name}"; set [git] create = true to create one'
            ) from None
        await create_branch(api, project, name, parent=git.parent, annotation=_ANNOTATION)
        return name
    if not explicit and (branch.default or branch.protected):
        kind = "the default branch of the project" if branch.default else "a protected branch"
        raise FollowSkipped(
            f'Neon branch "{name}" is {kind}; add "{git_branch}" = "{name}" to [git.map] '
            "to follow into it"
        )
    return name


class GitFollower:
    """Watches HEAD and reports each branch checked out (the current one first)."""

    def __init__(self, repo: Path, on_checkout: Callable[[str], Awaitable[None]]) -> None:
        self.repo = repo
        self.git_dir = find_git_dir(repo)
        self._on_checkout = on_checkout

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; a failing callback is logged and the watch goes on."""
        last: str | None = None
        async for _ in watch_file(self.git_dir / "HEAD", stop):
            try:
                branch = current_branch(self.git_dir)
            except OSError as exc:
                log.warning("git_head_unreadable", repo=str(self.repo), error=str(exc))
                continue
            if branch is None:
                log.info("git_head_detached", repo=str(self.repo), action="nothing changes")
                continue
            if branch == last:
                continue
            last = branch
            try:
                await self._on_checkout(branch)
            except Exception as exc:  # one bad checkout must not end following
                log.error("git_follow_failed", git_branch=branch, error=str(exc))
