"""The commands that talk to the Neon API: ``init``, ``branches``, ``branch reset|delete``,
and the API half of ``use`` (finding, and with ``--create`` making, a branch by name).

Every failure ends in one line on stderr and exit status 1 (2 for a usage mistake); the
API key never appears in any output.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from neonlocal.cli.context import EXIT_FAILURE, EXIT_USAGE, Context, fail, pass_ctx

if TYPE_CHECKING:
    from neonlocal.config.values import Settings
    from neonlocal.moments import Moment
    from neonlocal.neon import Branch, Project
    from neonlocal.resolver import TargetResolver, UseTarget
    from neonlocal.targets import Target

__all__ = ["branch", "branches", "init", "target_for_use"]

_T = TypeVar("_T")
KEY_FILE_NAME = "neon-api-key"
# Listing compute states asks once per branch; a few at a time keeps under Neon's burst limit.
_PARALLEL_REQUESTS = 8


def with_api(
    obj: Context,
    settings: Settings,
    work: Callable[[TargetResolver], Awaitable[_T]],
    *,
    error_code: int = EXIT_FAILURE,
) -> _T:
    """Run ``work`` with a resolver (and its API client); any API failure is one line
    and exit status ``error_code``."""
    from neonlocal import logging as nl_logging
    from neonlocal.apikey import ApiKeyError
    from neonlocal.config.errors import UnknownBranch
    from neonlocal.neon import NeonApiError
    from neonlocal.resolver import API_RETRY, TargetResolver
    from neonlocal.targets import TargetError

    # Library log lines would garble the one-line answers; failures arrive as exceptions.
    nl_logging.configure("critical", json=False, stream=sys.stderr)

    async def run() -> _T:
        resolver = TargetResolver(settings, obj.env, retry=API_RETRY)
        try:
            return await work(resolver)
        finally:
            await resolver.aclose()

    try:
        return asyncio.run(run())
    except TargetError as exc:
        fail(str(exc), EXIT_USAGE)
    except UnknownBranch as exc:
        missing = "" if obj.config_path.exists() else f" ({obj.config_path} does not exist)"
        fail(f"{exc}{missing}", error_code)
    except (NeonApiError, ApiKeyError) as exc:
        fail(str(exc), error_code)


def _duration(text: str | None) -> timedelta | None:
    from neonlocal.neon import InvalidDuration, parse_duration

    if text is None:
        return None
    try:
        return parse_duration(text)
    except InvalidDuration as exc:
        fail(f"--expires-in: {exc}", EXIT_USAGE)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment is not None else "-"


# --- use ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UseResult:
    """Where `use` switches to, and what to tell the user about it (one line each)."""

    target: Target
    notes: tuple[str, ...]


def target_for_use(
    obj: Context,
    settings: Settings,
    name: str,
    *,
    create: bool = False,
    parent: str | None = None,
    expires_in: str | None = None,
) -> UseResult:
    """The Target ``use NAME`` switches to: its config url, else found (or made) via the API."""
    if not create and (parent is not None or expires_in is not None):
        fail("--parent and --expires-in only go with --create", EXIT_USAGE)
    lifetime = _duration(expires_in)
    table = settings.branches.get(name)
    if table is not None and table.url is not None:
        if create:
            fail(
                f'branch "{name}" is a connection string in [branches.{name}]; --create '
                "makes branches found through the Neon API",
                EXIT_USAGE,
            )
        # A connection string in the config: no API client (and no httpx import) needed,
        # which keeps `use` quick.
        from neonlocal.protect import guarded, protection_of
        from neonlocal.targets import TargetError, build_target

        try:
            target = build_target(name, table)
            level = protection_of(name, settings)
            return UseResult(guarded(target, level, writes_allowed=False), ())
        except TargetError as exc:
            fail(str(exc), EXIT_USAGE)
    moment = _moment_of(name)
    if moment is not None:
        if create:
            fail(f"--create does not go with a moment ({name})", EXIT_USAGE)
        # Made by the daemon that serves it, which also deletes it: not by this process,
        # which could not.
        of = moment.parent
        resolved = with_api(obj, settings, lambda resolver: resolver.resolve(of))
        note = f"{name}: a branch of {of} as it was then, made when the daemon serves it"
        return UseResult(resolved.target, (note,))
    from neonlocal.resolver import branch_for_use

    found = with_api(
        obj,
        settings,
        lambda resolver: branch_for_use(
            resolver, name, create=create, parent=parent, expires_in=lifetime
        ),
    )
    return UseResult(found.resolution.target, _use_notes(found, parent))


def _moment_of(name: str) -> Moment | None:
    from datetime import UTC

    from neonlocal.moments import InvalidMoment, parse_moment

    try:
        return parse_moment(name, datetime.now(UTC))
    except InvalidMoment as exc:
        fail(str(exc), EXIT_USAGE)


def _use_notes(found: UseTarget, parent: str | None) -> tuple[str, ...]:
    """What `use` says about the branch besides switching to it."""
    name = found.resolution.name
    notes: list[str] = []
    if found.created is not None:
        expires = found.created.expires_at
        notes.append(
            f"created branch {name} from {parent or 'the default branch'}"
            + (f", expires {_when(expires)}" if expires else "")
        )
    if found.existed:
        notes.append(f"branch {name} already exists; using it as it is")
    if found.resolution.compute_suspended:
        notes.append("its compute is suspended; the first connection wakes it")
    return tuple(notes)


# --- init ---------------------------------------------------------------------------------


@click.command()
@click.option("--project", "project_id", help="Project id to use (default: ask, or the only one).")
@pass_ctx
def init(obj: Context, project_id: str | None) -> None:
    """Check the Neon API key, pick a project, and write [neon] to the config.

    The key comes from NEON_API_KEY or [neon] api_key_file; without either you are asked
    for it, and it is stored in a file only you can read (mode 0600) beside the config.
    """
    from neonlocal.apikey import API_KEY_ENV, KEYS_PAGE
    from neonlocal.neon import AuthenticationError

    settings = obj.settings(missing_ok=True)
    updates: dict[str, str] = {}
    new_key: str | None = None
    if not obj.env.get(API_KEY_ENV, "").strip() and settings.neon.api_key_file is None:
        with warnings.catch_warnings():
            # Piped in, there is no echo to turn off; the key is still never echoed back.
            warnings.simplefilter("ignore", getpass.GetPassWarning)
            new_key = click.prompt("Neon API key", hide_input=True).strip()
        if not new_key:
            fail("no API key given", EXIT_USAGE)
        key_path = obj.config_path.parent / KEY_FILE_NAME
        updates["api_key_file"] = str(key_path)

    async def work(resolver: TargetResolver) -> list[Project]:
        api = await resolver.api()
        try:
            await api.validate_key()
        except AuthenticationError:
            fail(f"the Neon API key was rejected; create a new one at {KEYS_PAGE}")
        return await api.list_projects()

    if new_key is not None:
        # Checked before anything is written: a mistyped key leaves no file behind.
        obj.env = {**obj.env, API_KEY_ENV: new_key}
    projects = with_api(obj, settings, work)
    chosen = _choose_project(projects, project_id)
    updates["project_id"] = chosen.id
    if new_key is not None:
        _write_private(Path(updates["api_key_file"]), new_key + "\n")
        click.echo(f"stored the API key in {updates['api_key_file']} (mode 0600)")
    _set_neon_keys(obj.config_path, updates)
    click.echo(f"{obj.config_path}: [neon] project_id = {chosen.id} ({chosen.name})")
    click.echo("next: `neonlocal branches`, then `neonlocal use BRANCH`")


def _choose_project(projects: list[Project], wanted: str | None) -> Project:
    if wanted is not None:
        for project in projects:
            if project.id == wanted:
                return project
        known = ", ".join(p.id for p in projects) or "none"
        fail(f"no project with id {wanted} is visible to this API key (it sees: {known})")
    if not projects:
        fail("this API key sees no projects; create one at https://console.neon.tech")
    if len(projects) == 1:
        return projects[0]
    for number, project in enumerate(projects, 1):
        click.echo(f"  {number}. {project.name}  ({project.id}, {project.region_id})")
    choice: int = click.prompt(
        "Which project", type=click.IntRange(1, len(projects)), default=1, show_default=True
    )
    return projects[choice - 1]


def _write_private(path: Path, text: str) -> None:
    from neonlocal.apikey import KEY_FILE_MODE

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, KEY_FILE_MODE)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), KEY_FILE_MODE)  # an existing file keeps its mode otherwise
        handle.write(text)


def _set_neon_keys(path: Path, values: dict[str, str]) -> None:
    """Set keys of the ``[neon]`` table, keeping the rest of the file as written."""
    import tomlkit
    import tomlkit.exceptions

    from neonlocal.config.file import atomic_write

    target = path.resolve() if path.is_symlink() else path
    try:
        text = target.read_text(encoding="utf-8")
        previous: os.stat_result | None = target.stat()
    except FileNotFoundError:
        text, previous = "", None
    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        fail(f"{path}:{exc.line}: invalid TOML: {exc}", EXIT_USAGE)
    table = document.get("neon")
    if table is None:
        table = tomlkit.table()
        document.add("neon", table)
    for key, value in values.items():
        table[key] = value
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(target, document.as_string().encode("utf-8"), previous)


# --- branches -----------------------------------------------------------------------------


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def branches(obj: Context, as_json: bool) -> None:
    """List the project's branches; * marks the one selected."""
    settings = obj.settings(missing_ok=True)

    async def work(resolver: TargetResolver) -> list[dict[str, Any]]:
        project = resolver.require_project()
        api = await resolver.api()
        found = await api.list_branches(project)
        limit = asyncio.Semaphore(_PARALLEL_REQUESTS)

        async def compute_of(item: Branch) -> str:
            async with limit:
                endpoints = await api.list_endpoints(project, item.id)
            states = [e.current_state.value for e in endpoints if e.type.value == "read_write"]
            return states[0] if states else "none"

        computes = await asyncio.gather(*(compute_of(b) for b in found))
        names = {b.id: b.name for b in found}
        return [
            {
                "name": b.name,
                "id": b.id,
                "state": b.current_state.value,
                "compute": compute,
                "parent": names.get(b.parent_id, b.parent_id) if b.parent_id else None,
                "expires_at": b.expires_at.isoformat() if b.expires_at else None,
                "default": b.default,
                "protected": b.protected,
                "_expires": _when(b.expires_at),
            }
            for b, compute in zip(found, computes, strict=True)
        ]

    rows = with_api(obj, settings, work)
    selected = _selected_branch(obj, settings)
    for row in rows:
        row["selected"] = row["name"] == selected
    if as_json:
        click.echo(
            json.dumps([{k: v for k, v in r.items() if k[0] != "_"} for r in rows], indent=2)
        )
        return
    header = ("", "NAME", "ID", "STATE", "COMPUTE", "PARENT", "EXPIRES")
    table = [header] + [
        (
            "*" if r["selected"] else "",
            r["name"]
            + (" (default)" if r["default"] else "")
            + (" (protected)" if r["protected"] else ""),
            r["id"],
            r["state"],
            r["compute"],
            r["parent"] or "-",
            r["_expires"],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _selected_branch(obj: Context, settings: Settings) -> str | None:
    """What the running daemon serves, else what the config selects."""
    from neonlocal.control import DaemonNotRunning, request

    try:
        reply = request(obj.control_path(settings), {"op": "status"}, timeout=2.0)
    except (DaemonNotRunning, OSError, ValueError):
        return settings.branch
    served = reply.get("branch")
    return served if isinstance(served, str) else settings.branch


# --- branch reset | delete ----------------------------------------------------------------


@click.group()
def branch() -> None:
    """Reset or delete a branch of the project."""


@branch.command()
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def reset(obj: Context, name: str, yes: bool) -> None:
    """Reset branch NAME to the latest state of its parent (its changes are lost)."""
    from neonlocal.neon import find_branch

    settings = obj.settings(missing_ok=True)

    async def work(resolver: TargetResolver) -> str:
        project = resolver.require_project()
        api = await resolver.api()
        found = await find_branch(api, project, name)
        if found.parent_id is None:
            fail(f"branch {found.name} has no parent to reset from")
        parent = await api.get_branch(project, found.parent_id)
        if not yes and not await asyncio.to_thread(
            click.confirm,
            f"Reset {found.name} to the latest state of {parent.name}? Its changes are lost and "
            "its open connections are cut.",
        ):
            fail("nothing was reset")
        done = await api.restore_branch(project, found.id, parent.id)
        await api.wait_for_operations(project, done.operations)
        return parent.name

    parent_name = with_api(obj, settings, work)
    click.echo(f"reset {name} to {parent_name}; new connections see its data")


@branch.command()
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def delete(obj: Context, name: str, yes: bool) -> None:
    """Delete branch NAME (never the default branch or a protected one)."""
    from neonlocal.neon import ProtectedBranch, find_branch

    settings = obj.settings(missing_ok=True)

    async def work(resolver: TargetResolver) -> None:
        project = resolver.require_project()
        api = await resolver.api()
        found = await find_branch(api, project, name)
        # Refused before asking: there is nothing to confirm.
        if found.default:
            raise ProtectedBranch(found.name, "the project's default branch")
        if found.protected:
            raise ProtectedBranch(found.name, "a protected branch")
        if not yes and not await asyncio.to_thread(
            click.confirm, f"Delete branch {found.name} ({found.id}) and all its data?"
        ):
            fail("nothing was deleted")
        gone = await api.delete_branch(project, found.id)
        await api.wait_for_operations(project, gone.operations)

    with_api(obj, settings, work)
    click.echo(f"deleted branch {name}")
    if settings.branch == name:
        click.echo(
            f"neonlocal: warning: the config still selects {name}; run `neonlocal use OTHER`",
            err=True,
        )
