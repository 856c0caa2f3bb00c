"""``neonlocal diff [BASE] [BRANCH]``: the schema difference between two branches, as Neon's
compare-schema endpoint computes it.

Exit status as diff(1) has it, so CI can use it: 0 when the schemas are the same, 1 when they
differ, 2 when they could not be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from neonlocal.cli.context import Context, fail, pass_ctx

if TYPE_CHECKING:
    from neonlocal.config.values import Settings
    from neonlocal.neon import Branch, NeonApi
    from neonlocal.resolver import TargetResolver

__all__ = ["EXIT_DIFFERENT", "EXIT_TROUBLE", "diff"]

EXIT_DIFFERENT = 1
EXIT_TROUBLE = 2
_STYLES = (
    ("+++", {"bold": True}),
    ("---", {"bold": True}),
    ("@@", {"fg": "cyan"}),
    ("+", {"fg": "green"}),
    ("-", {"fg": "red"}),
)


@dataclass(frozen=True)
class Comparison:
    base: str
    branch: str
    database: str
    diff: str


@click.command()
@click.argument("base", required=False)
@click.argument("branch", required=False)
@click.option("--database", "-d", help="Database to compare (default: the branch's own).")
@click.option(
    "--color",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Colour the diff (auto: on a terminal, unless NO_COLOR is set).",
)
@pass_ctx
def diff(
    obj: Context, base: str | None, branch: str | None, database: str | None, color: str
) -> None:
    """Print how BRANCH's schema differs from BASE's, as a unified diff.

    BRANCH defaults to the selected branch, BASE to BRANCH's parent. Exit status 0 when the
    schemas are the same, 1 when they differ, 2 when they could not be compared.
    """
    from neonlocal.cli.neon import _selected_branch, with_api

    settings = obj.settings(missing_ok=True)
    if settings.neon.project_id is None:
        fail(
            "diff compares schemas through the Neon API: set [neon] project_id "
            "(or run `neonlocal init`)",
            EXIT_TROUBLE,
        )
    name = branch or _selected_branch(obj, settings)
    if name is None:
        fail("no branch is selected: name one (neonlocal diff BASE BRANCH)", EXIT_TROUBLE)
    found = with_api(
        obj,
        settings,
        lambda resolver: compare(resolver, settings, base, name, database),
        error_code=EXIT_TROUBLE,
    )
    if not found.diff.strip():
        click.echo(
            f"neonlocal: {found.branch} has the same schema as {found.base} "
            f"(database {found.database})",
            err=True,
        )
        return
    colored = {"auto": None if not obj.env.get("NO_COLOR") else False, "always": True}
    for line in found.diff.splitlines():
        click.echo(styled(line), color=colored.get(color, False))
    raise SystemExit(EXIT_DIFFERENT)


def styled(line: str) -> str:
    """A diff line with ANSI colour; click strips it again where colour is off."""
    for prefix, style in _STYLES:
        if line.startswith(prefix):
            return click.style(line, **style)
    return line


async def compare(
    resolver: TargetResolver,
    settings: Settings,
    base: str | None,
    name: str,
    database: str | None,
) -> Comparison:
    """Ask Neon for the schema diff from ``base`` (None: ``name``'s parent) to ``name``."""
    from neonlocal.neon import find_branch

    project = resolver.require_project()
    api = await resolver.api()
    branch = await find_branch(api, project, name)
    if base is not None:
        base_branch = await find_branch(api, project, base)
    elif branch.parent_id is not None:
        base_branch = await api.get_branch(project, branch.parent_id)
    else:
        fail(
            f"branch {branch.name} has no parent; name one to compare it with "
            f"(neonlocal diff BASE {branch.name})",
            EXIT_TROUBLE,
        )
    chosen = database or await _database_of(api, project, branch, name, settings)
    text = await api.compare_schema(project, branch.id, base_branch.id, chosen)
    return Comparison(base_branch.name, branch.name, chosen, text)


async def _database_of(
    api: NeonApi, project: str, branch: Branch, name: str, settings: Settings
) -> str:
    """The database a session to ``name`` would use: as configured, else the branch's first."""
    table = settings.branches.get(name)
    configured = (table.database if table is not None else None) or settings.neon.database
    if configured:
        return configured
    databases = await api.list_databases(project, branch.id)
    if not databases:
        fail(f"branch {branch.name} has no database to compare", EXIT_TROUBLE)
    return databases[0].name
