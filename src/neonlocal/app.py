"""Running the daemon from the command line: logging, event loop, one-line fatal errors."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from neonlocal import logging as nl_logging

if TYPE_CHECKING:
    from neonlocal.resolver import EphemeralSpec


def _loop_factory() -> type[asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the `fast` extra); the standard loop is fully supported."""
    try:
        import uvloop
    except ImportError:
        return None
    loop_class: type[asyncio.AbstractEventLoop] = uvloop.Loop
    return loop_class


def run_daemon(
    config_path: Path,
    env: Mapping[str, str],
    *,
    log_level: str | None = None,
    json_logs: bool | None = None,
    ephemeral: EphemeralSpec | None = None,
) -> int:
    from neonlocal.config.errors import ConfigError
    from neonlocal.config.loader import SettingsLoader
    from neonlocal.daemon import Daemon
    from neonlocal.errors import UserError
    from neonlocal.proxy.server import ListenError
    from neonlocal.sockets import SocketActivationError, inherited_sockets

    env = dict(env)
    try:
        # Before anything else runs: systemd's socket unit bound 127.0.0.1:5432 for us.
        sockets = inherited_sockets(env)
    except SocketActivationError as exc:
        print(f"neonlocal: socket activation: {exc}", file=sys.stderr)
        return 1

    # The daemon's own first load is then answered from what this one checked.
    loader = SettingsLoader(config_path, env)
    level = log_level
    if level is None:
        try:
            level = asyncio.run(loader.load()).log_level
        except ConfigError:
            level = "info"  # the daemon reports the problem itself, in one line
    nl_logging.configure(level, json=json_logs)

    async def main() -> None:
        daemon = Daemon(config_path, env, sockets=sockets, ephemeral=ephemeral, loader=loader)
        await daemon.run()

    loop_class = _loop_factory()
    try:
        if loop_class is not None and env.get("NEONLOCAL_LOOP", "auto") != "asyncio":
            with asyncio.Runner(loop_factory=loop_class) as runner:
                runner.run(main())
        else:
            asyncio.run(main())
    except (UserError, ListenError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
