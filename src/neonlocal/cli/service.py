"""`neonlocal service install|uninstall|status|logs`: thin over ``neonlocal.service``.

Every failure reaches the user as one line and a non-zero exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from neonlocal.paths import default_config_path, expand_user
from neonlocal.service import (
    MISSING_TOOL,
    SOCKET_UNIT,
    InstallPlan,
    Platform,
    RunState,
    ServiceError,
    ServiceManager,
    UserDirs,
    find_executable,
    manager_for,
)

__all__ = ["daemon_status_lines", "service"]

_T = TypeVar("_T")

EXIT_NOT_RUNNING = 3
"""`service status` exit status when not installed or not running, as in `systemctl status`."""


class _Failure(click.ClickException):
    """Shown like the rest of the CLI's failures: `neonlocal: <what went wrong>`."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"neonlocal: {self.format_message()}", file=file, err=file is None)


@dataclass(frozen=True)
class _Context:
    manager: ServiceManager
    env: Mapping[str, str]


def _context(ctx: click.Context) -> _Context:
    found = ctx.find_object(_Context)
    assert found is not None, "the service group sets its context up"
    return found


@click.group()
@click.option(
    "--platform",
    type=click.Choice([p.value for p in Platform]),
    envvar="NEONLOCAL_SERVICE_PLATFORM",
    hidden=True,
    help="Act as on this platform instead of the current one (for tests).",
)
@click.pass_context
def service(ctx: click.Context, platform: str | None) -> None:
    """Run neonlocal as your login service (systemd --user on Linux, launchd on macOS)."""
    env = dict(os.environ)
    dirs = UserDirs.from_env(env)
    try:
        chosen = Platform(platform) if platform else Platform.current()
    except ServiceError as exc:
        raise _Failure(str(exc)) from None
    ctx.obj = _Context(manager=manager_for(chosen, dirs), env=env)


@service.command()
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file the service uses (default: the one neonlocal would use now).",
)
@click.option(
    "--socket", is_flag=True, help="Also install socket activation on port 5432 (systemd)."
)
@click.pass_context
def install(ctx: click.Context, config: Path | None, socket: bool) -> None:
    """Write the service file with this installation's paths, enable it and start it."""
    context = _context(ctx)
    # A global `neonlocal --config PATH service install` counts as well.
    root_config = ctx.find_root().params.get("config")
    chosen = config or (Path(root_config) if root_config else None)
    chosen = expand_user(chosen or default_config_path(context.env), context.env).absolute()
    _guard(lambda: _install(context.manager, chosen, socket, context.env))


def _install(manager: ServiceManager, config: Path, socket: bool, env: Mapping[str, str]) -> None:
    if not config.is_file():
        raise ServiceError(f"config file {config} does not exist: create it first or pass --config")
    settings = _settings(config, env)
    listen = tuple((host, settings.listen.port) for host in settings.listen.host)
    if socket and not settings.listen.port:
        raise ServiceError(
            "socket activation needs a fixed port: [listen] port = 0 lets the daemon pick one "
            "when it starts, which systemd cannot listen on ahead of it"
        )
    plan = InstallPlan(find_executable(), config, settings.shutdown_deadline, listen)
    for line in manager.install(plan, socket=socket):
        click.echo(line)


def _settings(config: Path, env: Mapping[str, str]) -> Any:
    """The config to install with; a config that does not load is not installed."""
    from neonlocal.config.schema import ConfigError, load_settings

    try:
        return load_settings(config, env)
    except ConfigError as exc:
        raise ServiceError(f"{exc} (fix the config, then install again)") from None


@service.command()
@click.pass_context
def uninstall(ctx: click.Context) -> None:
    """Stop and disable the service and remove its files (logs are kept)."""
    for line in _guard(_context(ctx).manager.uninstall):
        click.echo(line)


@service.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Whether the service is installed and running, and since when."""
    manager = _context(ctx).manager
    current = _guard(manager.status)
    if current.state is RunState.NOT_INSTALLED:
        click.echo(f"neonlocal service is not installed (no {current.unit_path})")
        ctx.exit(EXIT_NOT_RUNNING)
    click.echo(f"service: {current.state.value} [{current.detail}]")
    click.echo(f"file: {current.unit_path}")
    if current.since:
        click.echo(f"since: {current.since}")
    if current.pid:
        click.echo(f"pid: {current.pid}")
    if current.socket_activation:
        click.echo(f"socket activation: on ({SOCKET_UNIT})")
    if current.state is RunState.RUNNING:
        env = _context(ctx).env
        root_config = ctx.find_root().params.get("config")
        config = expand_user(Path(root_config) if root_config else default_config_path(env), env)
        for line in daemon_status_lines(config.absolute(), env):
            click.echo(line)
    if current.state is not RunState.RUNNING:
        ctx.exit(EXIT_NOT_RUNNING)


@service.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they are logged.")
@click.option("-n", "--lines", default=100, show_default=True, type=click.IntRange(min=0))
@click.pass_context
def logs(ctx: click.Context, follow: bool, lines: int) -> None:
    """Show the service's log (journald on Linux, the log file on macOS)."""
    argv = _guard(lambda: _context(ctx).manager.logs_command(follow=follow, lines=lines))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # Replace this process so the pager, Ctrl-C and the exit status are the viewer's own.
        os.execvp(argv[0], argv)  # noqa: S606 - our own fixed argv, no shell involved
    except FileNotFoundError:
        raise _Failure(MISSING_TOOL.get(argv[0], f"{argv[0]} not found")) from None
    except OSError as exc:
        raise _Failure(f"cannot run {argv[0]}: {exc.strerror}") from None


def _guard(action: Callable[[], _T]) -> _T:
    try:
        return action()
    except ServiceError as exc:
        raise _Failure(str(exc)) from None


def daemon_status_lines(config_path: Path, env: Mapping[str, str]) -> list[str]:
    """What the running daemon itself says (branch served, sessions, last error)."""
    from neonlocal.config.schema import ConfigError, load_settings
    from neonlocal.control import DaemonNotRunning, request
    from neonlocal.paths import control_socket_path

    try:
        configured = load_settings(config_path, env, missing_ok=True).control.socket
    except ConfigError:
        configured = None  # the daemon keeps its last good config; ask at the default place
    try:
        reply = request(
            control_socket_path(config_path, env, configured), {"op": "status"}, timeout=3.0
        )
    except (DaemonNotRunning, OSError, ValueError):
        return ["daemon: not answering on its control socket"]
    sessions = reply.get("sessions") or {}
    lines = [
        f"branch: {reply.get('branch') or '(none selected)'} ({reply.get('upstream_host') or '-'})",
        "sessions: "
        + (", ".join(f"{b}: {n}" for b, n in sorted(sessions.items())) if sessions else "none"),
    ]
    if reply.get("last_error"):
        lines.append(f"last error: {reply['last_error']}")
    if reply.get("config_error"):
        lines.append(f"config: rejected, serving the last good one: {reply['config_error']}")
    return lines
