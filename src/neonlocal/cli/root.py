"""The ``neonlocal`` group and its own commands: thin wrappers that call one function each
and map errors to one plain line and an exit status.

Heavy modules (pydantic, the proxy, the API client) are imported inside the commands, so
``neonlocal --help`` starts quickly.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import click

from neonlocal import __version__
from neonlocal.cli.context import (
    EXIT_FAILURE,
    EXIT_USAGE,
    Context,
    fail,
    moved_sessions,
    pass_ctx,
)


class LazyGroup(click.Group):
    """Subcommand groups from other modules, imported only when used."""

    lazy: ClassVar[dict[str, tuple[str, str, str]]] = {
        "service": ("neonlocal.cli.service", "service", "Run neonlocal as a login service."),
        "init": ("neonlocal.cli.neon", "init", "Check the Neon API key and pick a project."),
        "branches": ("neonlocal.cli.neon", "branches", "List the Neon project's branches."),
        "branch": ("neonlocal.cli.neon", "branch", "Reset or delete a Neon branch."),
        "trust": ("neonlocal.cli.trust", "trust", "Show or install the local CA for verify-full."),
        "diff": ("neonlocal.cli.diff", "diff", "Show a branch's schema changes."),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module_name, attr, _help = self.lazy[cmd_name]
            import importlib

            command = getattr(importlib.import_module(module_name), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy:
                rows.append((name, self.lazy[name][2]))
            else:
                cmd = super().get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(60)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file (default: $NEONLOCAL_CONFIG or ~/.config/neonlocal/config.toml).",
)
@click.version_option(__version__, prog_name="neonlocal")
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """One fixed local Postgres address for your Neon branches, switched live."""
    ctx.obj = Context(config, dict(os.environ))


@main.command()
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--json-logs/--console-logs", default=None, help="Log format (default: by TTY).")
@click.option(
    "--ephemeral", is_flag=True, help="Serve a new Neon branch, deleted when the daemon stops."
)
@click.option("--parent", help="With --ephemeral: the branch to copy (default: the default one).")
@click.option(
    "--expires-in",
    default="1d",
    show_default=True,
    metavar="DURATION",
    help="With --ephemeral: Neon deletes the branch after this even if the daemon cannot.",
)
@pass_ctx
def up(
    obj: Context,
    log_level: str | None,
    json_logs: bool | None,
    ephemeral: bool,
    parent: str | None,
    expires_in: str,
) -> None:
    """Run the daemon in the foreground."""
    from neonlocal.app import run_daemon

    spec = None
    if ephemeral:
        from neonlocal.neon import InvalidDuration, parse_duration
        from neonlocal.resolver import EphemeralSpec

        try:
            spec = EphemeralSpec(parent=parent, expires_in=parse_duration(expires_in))
        except InvalidDuration as exc:
            fail(f"--expires-in: {exc}", EXIT_USAGE)
    elif parent is not None:
        fail("--parent only goes with --ephemeral", EXIT_USAGE)
    running = _running_daemon(obj)
    if running is not None:
        # Asked first: the port would be taken by it, and "address in use" is the wrong lead.
        fail(
            f"neonlocal is already running (pid {running.get('pid')}, serving "
            f"{running.get('branch') or 'no branch'} on "
            f"{', '.join(running.get('listen') or []) or '?'}); "
            "`neonlocal status` shows it, `neonlocal service status` if it is the service"
        )
    sys.exit(
        run_daemon(
            obj.config_path, obj.env, log_level=log_level, json_logs=json_logs, ephemeral=spec
        )
    )


@main.command()
@click.argument("name")
@click.option(
    "--keep",
    "sessions",
    flag_value="keep",
    help="Leave sessions open on other branches where they are.",
)
@click.option(
    "--terminate",
    "sessions",
    flag_value="terminate",
    help="End sessions on other branches now (57P01), not when they are next idle.",
)
@click.option("--create", is_flag=True, help="Create the branch through the Neon API if missing.")
@click.option("--parent", help="With --create: the branch to copy (default: the default one).")
@click.option(
    "--expires-in",
    metavar="DURATION",
    help="With --create: Neon deletes it after this long, e.g. 7d or 12h.",
)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the daemon.")
@click.option("--write", is_flag=True, help="On a protected branch: allow writes.")
@click.option("--yes", "-y", is_flag=True, help="Select a protected branch without asking.")
@pass_ctx
def use(
    obj: Context,
    name: str,
    sessions: str | None,
    create: bool,
    parent: str | None,
    expires_in: str | None,
    timeout: float,
    write: bool,
    yes: bool,
) -> None:
    """Select branch NAME: new connections go there from now on.

    NAME is a [branches.NAME] table of the config, or a branch of the Neon project
    ([neon] project_id) found by name through the API. Sessions open on other branches
    end with 57P01 once idle outside a transaction, so pools reconnect to NAME ([switch]
    sessions = "drain"); --keep leaves them, --terminate ends them now. A protected branch
    asks first (--yes on no terminal), and its sessions are read-only unless --write.
    """
    from neonlocal.config.file import switch_branch
    from neonlocal.control import DaemonNotRunning, request

    if not create and (parent is not None or expires_in is not None):
        # Said here, before any daemon is asked: the answer must not depend on one running.
        fail("--parent and --expires-in only go with --create", EXIT_USAGE)
    checked = None if create else _check_with_daemon(obj, name, timeout)
    if checked is None:
        # No daemon to ask (or it cannot vouch for the file as it is now): check it all here.
        from neonlocal.cli.neon import target_for_use

        settings = obj.settings(missing_ok=True)
        found = target_for_use(
            obj, settings, name, create=create, parent=parent, expires_in=expires_in
        )
        checked = _Checked(
            obj.control_path(settings),
            found.target.describe(),
            found.notes,
            f"localhost:{settings.listen.port}",
            found.target.protection.value,
        )
    from neonlocal.cli.protect import confirm_protected, protection_note

    confirm_protected(name, checked.protection, write=write, yes=yes)
    for note in checked.notes:
        click.echo(f"neonlocal: {note}", err=True)
    if os.environ.get("NEONLOCAL_BRANCH"):
        click.echo(
            "neonlocal: warning: NEONLOCAL_BRANCH is set and overrides the config file", err=True
        )
    if sessions is not None:
        # Said before the file changes: the daemon's file watcher may switch first.
        with contextlib.suppress(DaemonNotRunning, OSError, ValueError):
            request(
                checked.control,
                {"op": "switching", "branch": name, "sessions": sessions},
                timeout=timeout,
            )
    try:
        switch_branch(obj.config_path, name)
    except OSError as exc:
        fail(f"cannot write {obj.config_path}: {exc.strerror or exc}")
    try:
        reply = request(
            checked.control,
            {
                "op": "reload",
                "branch": name,
                "terminate": sessions == "terminate",
                "write": write,
            },
            timeout=timeout,
        )
    except DaemonNotRunning:
        click.echo(f"{obj.config_path}: branch = {name}; the daemon is not running")
        return
    except OSError as exc:
        fail(f"the daemon did not confirm the switch: {exc}")
    if not reply.get("ok"):
        fail(f"the daemon did not switch: {reply.get('error')}")
    listen = reply.get("listen") or [checked.listen]
    line = f"{_local_name(listen[0])} -> {name} ({checked.upstream})"
    line += protection_note(name, checked.protection, write=write)
    click.echo(line + moved_sessions(reply.get("switch"), sessions))


class _Checked(NamedTuple):
    """What `use` has made sure of before it writes the file."""

    control: Path
    upstream: str
    notes: Sequence[str]
    listen: str
    protection: str = "none"


def _check_with_daemon(obj: Context, name: str, timeout: float) -> _Checked | None:
    """The running daemon's check of NAME, or None when this process must check it.

    The daemon has the config checked and the API client at hand: asking it keeps `use`
    free of the config schema's and httpx's imports and of a second round of API calls.
    """
    from neonlocal.control import DaemonNotRunning, request

    control = obj.quick_control_path()
    if control is None:
        return None
    try:
        answer = request(control, {"op": "can_use", "branch": name}, timeout=timeout)
    except DaemonNotRunning:
        return None
    except TimeoutError:
        fail(f"the daemon did not answer within {timeout:g} s")
    except (OSError, ValueError):
        return None  # the full check meets the same trouble and says what it is
    if answer.get("ok"):
        notes = answer.get("notes")
        return _Checked(
            control,
            str(answer.get("upstream")),
            [str(note) for note in notes] if isinstance(notes, list) else [],
            "localhost",
            str(answer.get("protection") or "none"),
        )
    error = answer.get("error")
    # A daemon from before `can_use` calls it unknown: it still takes the full check's word.
    if answer.get("fallback") or not isinstance(error, str) or error.startswith("unknown control"):
        return None
    fail(error, EXIT_USAGE if answer.get("usage") else EXIT_FAILURE)


def _local_name(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"localhost:{port}" if host in ("127.0.0.1", "[::1]", "localhost") else address


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def status(obj: Context, as_json: bool) -> None:
    """Show the branch served, sessions per branch and the last error."""
    from neonlocal.control import DaemonNotRunning, request

    # A running daemon knows the config's state best (it reports a rejected edit itself):
    # ask it first, and load the config schema only to explain a daemon that is not there.
    quick = obj.quick_control_path()
    answer: dict[str, Any] | None = None
    if quick is not None:
        with contextlib.suppress(DaemonNotRunning, OSError, ValueError):
            answer = request(quick, {"op": "status"}, timeout=5.0)
    if answer is not None:
        _show_status(answer, as_json)
        return

    from neonlocal.config.schema import ConfigError, load_settings
    from neonlocal.paths import control_socket_path

    problem: ConfigError | None = None
    try:
        settings = load_settings(obj.config_path, obj.env, missing_ok=True)
    except ConfigError as exc:
        # A running daemon keeps serving its last good config and reports this problem
        # itself, so ask it anyway (at the default socket: the file cannot say otherwise).
        control, selected, problem = control_socket_path(obj.config_path, obj.env), None, exc
    else:
        control, selected = obj.control_path(settings), settings.branch
    try:
        reply = request(control, {"op": "status"}, timeout=5.0)
    except DaemonNotRunning:
        if problem is not None:
            fail(str(problem), EXIT_USAGE)
        if as_json:
            click.echo(json.dumps({"running": False, "branch": selected}))
        else:
            where = (
                f"config selects {selected or 'no branch'}"
                if obj.config_path.exists()
                else f"{obj.config_path} does not exist"
            )
            click.echo(f"not running ({where})")
        sys.exit(3)
    _show_status(reply, as_json)


def _last_error(reply: dict[str, Any]) -> str:
    error = reply.get("last_error")
    if not error:
        return "none"
    when = reply.get("last_error_at")
    return f"{error} (at {when})" if when else str(error)


def _show_status(reply: dict[str, Any], as_json: bool) -> None:
    reply.pop("ok", None)
    reply["running"] = True
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    sessions = reply.get("sessions") or {}
    lines = [
        f"branch:     {reply.get('branch') or '(none selected)'}"
        + (" (read-only: protected)" if reply.get("read_only") else ""),
        f"upstream:   {reply.get('upstream_host') or '-'}",
        f"listening:  {', '.join(reply.get('listen', []))}",
        "sessions:   "
        + (", ".join(f"{b}: {n}" for b, n in sorted(sessions.items())) if sessions else "none"),
        f"last error: {_last_error(reply)}",
    ]
    if reply.get("unix_socket"):
        hint = reply.get("unix_socket_hint")
        lines.insert(3, f"socket:     {reply['unix_socket']}" + (f" ({hint})" if hint else ""))
    if reply.get("sessions_waking"):
        lines.insert(4, f"waking:     {reply['sessions_waking']} waiting for the compute to start")
    if reply.get("config_error"):
        lines.append(
            f"config:     REJECTED, still serving the last good one: {reply['config_error']}"
        )
    from neonlocal.cli.ports import port_lines

    lines[4:4] = port_lines(reply)  # after the main port's sessions
    for warning in reply.get("warnings") or []:
        lines.append(f"warning:    {warning}")
    click.echo("\n".join(lines))


@main.command()
@click.option(
    "--socket", "via_socket", is_flag=True, help="The URL of the daemon's Unix socket instead."
)
@click.option("--port", "pinned", type=int, help="A [ports] port: the URL of its branch.")
@click.option(
    "--serverless",
    is_flag=True,
    help="Print the @neondatabase/serverless (JavaScript) setup for this daemon instead.",
)
@pass_ctx
def url(obj: Context, via_socket: bool, pinned: int | None, serverless: bool) -> None:
    """Print the local DATABASE_URL to paste into .env (no password in it)."""
    from neonlocal.cli.neon import target_for_use
    from neonlocal.cli.ports import branch_of_port

    settings = obj.settings(missing_ok=True)
    user, database = "neondb_owner", "neondb"
    branch = settings.branch if pinned is None else branch_of_port(settings, pinned)
    url_has_password = True
    if branch:
        target = target_for_use(obj, settings, branch).target
        user = target.user or user
        database = target.database or database
        url_has_password = target.password is not None
    from urllib.parse import quote

    port = _port_served(obj, settings) if pinned is None else pinned
    if serverless:
        from neonlocal.serverless.snippet import PasswordSource, driver_setup

        source: PasswordSource = "any"
        if not url_has_password:
            source = "own"
        elif settings.local.password is not None:
            source = "local"
        click.echo(driver_setup(port, user, database, password=source))
        return
    if via_socket:
        click.echo(_socket_url(obj, settings, quote(user, safe=""), quote(database, safe="")))
        return
    query = ""
    if settings.local.tls and settings.local.tls_auth == "password":
        # libpq prefers TLS, which then asks for the branch role's password; plaintext to
        # localhost asks for none, as before.
        click.echo(
            '# [local] tls_auth = "password": over TLS the branch role\'s password is asked '
            "for; this URL connects without TLS, which needs none",
            err=True,
        )
        query = "?sslmode=disable"
    click.echo(
        f"postgresql://{quote(user, safe='')}@localhost:{port}/{quote(database, safe='')}{query}"
    )


def _socket_url(obj: Context, settings: Any, user: str, database: str) -> str:
    """The running daemon's Unix socket as a libpq URL (host= names its directory)."""
    from pathlib import Path
    from urllib.parse import quote

    from neonlocal.control import DaemonNotRunning, request

    try:
        reply = request(obj.control_path(settings), {"op": "status"}, timeout=5.0)
    except (DaemonNotRunning, OSError, ValueError):
        fail("no daemon is running to say where its socket is: start it (neonlocal up)")
    path = reply.get("unix_socket")
    if not path:
        fail("the daemon listens on no Unix socket ([listen] unix_socket_dir)")
    hint = reply.get("unix_socket_hint")
    if hint:
        click.echo(f"# {hint}", err=True)
    socket = Path(path)
    port = socket.name.rpartition(".")[2]
    return f"postgresql://{user}@/{database}?host={quote(str(socket.parent))}&port={port}"


def _running_daemon(obj: Context) -> dict[str, Any] | None:
    """The status of a daemon already serving this config, or None when none answers."""
    from neonlocal.control import DaemonNotRunning, request

    path = obj.quick_control_path()
    try:
        if path is None:
            path = obj.control_path(obj.settings(missing_ok=True))
        return request(path, {"op": "status"}, timeout=2.0)
    except (DaemonNotRunning, OSError, ValueError):
        return None


def _port_served(obj: Context, settings: Any) -> int:
    """The port the running daemon listens on (a changed [listen] port waits for a
    restart, and with ``port = 0`` the system picked it); the file's with no daemon."""
    from neonlocal.control import DaemonNotRunning, request

    try:
        listen = request(obj.control_path(settings), {"op": "status"}, timeout=5.0)["listen"]
        return next(int(a.rpartition(":")[2]) for a in listen if not a.startswith("/"))
    except (DaemonNotRunning, OSError, ValueError, KeyError, TypeError, StopIteration):
        if settings.listen.port:
            return int(settings.listen.port)
        fail(
            "[listen] port = 0: the port is picked when the daemon starts, and no running "
            "daemon says which; start it (neonlocal up), or set a port"
        )


@main.command()
@click.option("--seconds", default=12.0, show_default=True, help="How long the demo app runs.")
@click.option("--port", default=0, help="Local port for the demo daemon (default: any free one).")
def demo(seconds: float, port: int) -> None:
    """Offline demo: two local TLS+SCRAM PostgreSQL 'branches', a live app, `use` switching."""
    from neonlocal.demo import run_demo

    sys.exit(run_demo(seconds=seconds, port=port))


if __name__ == "__main__":
    main()
