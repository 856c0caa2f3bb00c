"""What every ``neonlocal`` command shares: the config path and environment (``Context``),
and ``fail``, which ends a command with one plain line on stderr and an exit status.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "Context", "fail", "pass_ctx"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(message if message.startswith("neonlocal") else f"neonlocal: {message}", err=True)
    sys.exit(code)


class Context:
    def __init__(self, config: Path | None, env: dict[str, str]) -> None:
        self.env = env
        if config is None:
            from neonlocal.paths import default_config_path

            config = default_config_path(env)
        # Absolute from here on: the daemon and its helper processes do not share our idea
        # of "here" (the certificate helper runs in the tls directory).
        self.config_path = config.expanduser().absolute()

    def settings(self, *, missing_ok: bool = False) -> Any:
        from neonlocal.config.schema import ConfigError, load_settings

        try:
            return load_settings(self.config_path, self.env, missing_ok=missing_ok)
        except ConfigError as exc:
            fail(str(exc), EXIT_USAGE)

    def control_path(self, settings: Any) -> Path:
        from neonlocal.paths import control_socket_path

        return control_socket_path(self.config_path, self.env, settings.control.socket)

    def quick_control_path(self) -> Path | None:
        """The control socket as the file gives it, read without the config schema.

        None when more than the file may decide it (a NEONLOCAL_* setting in the
        environment) or the file does not simply say: the full check then decides.
        """
        import tomllib

        from neonlocal.paths import CONFIG_ENV, control_socket_path

        if any(k.upper().startswith("NEONLOCAL_") and k.upper() != CONFIG_ENV for k in self.env):
            return None
        try:
            with self.config_path.open("rb") as file:
                data = tomllib.load(file)
        except (OSError, ValueError):  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
            return None
        control = data.get("control", {})
        if not isinstance(control, dict):
            return None
        configured = control.get("socket")
        if configured is None:
            return control_socket_path(self.config_path, self.env)
        if not isinstance(configured, str) or not configured:
            return None
        return control_socket_path(self.config_path, self.env, Path(configured))


pass_ctx = click.make_pass_decorator(Context)


def moved_sessions(switch: dict[str, Any] | None, asked: str | None) -> str:
    """What the switch did to sessions on other branches, as the end of `use`'s line."""
    if not switch or not switch.get("moved"):
        return ""
    moved: dict[str, int] = switch["moved"]
    count = sum(moved.values())
    where = ", ".join(sorted(moved))
    sessions = f"{count} session{'s' if count != 1 else ''} on {where}"
    mode = switch.get("sessions") or asked
    if mode == "keep":
        return f"; {sessions} stay{'s' if count == 1 else ''} there (--keep)"
    if mode == "terminate":
        return f"; ended {sessions}"
    return f"; {sessions} will reconnect (once idle)"
