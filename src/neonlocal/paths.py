"""Where neonlocal keeps its files: the config file, the control socket, generated state.

Every function takes the environment as a mapping so callers (and tests) decide what
it is; nothing here reads ``os.environ``.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

__all__ = [
    "control_socket_path",
    "default_config_path",
    "ensure_private_dir",
    "expand_user",
    "home_dir",
    "socket_answers",
    "state_dir",
]

CONFIG_ENV: Final = "NEONLOCAL_CONFIG"
# sun_path holds 108 bytes on Linux and 104 on macOS; stay clear of both.
_MAX_SOCKET_PATH: Final = 100


def default_config_path(env: Mapping[str, str]) -> Path:
    """``$NEONLOCAL_CONFIG``, else ``$XDG_CONFIG_HOME/neonlocal/config.toml`` (~/.config)."""
    explicit = env.get(CONFIG_ENV)
    if explicit:
        return expand_user(Path(explicit), env)
    return _xdg_dir(env, "XDG_CONFIG_HOME", ".config") / "neonlocal" / "config.toml"


def control_socket_path(
    config_path: Path, env: Mapping[str, str], configured: Path | None = None
) -> Path:
    """The daemon's control socket for this config file.

    ``configured`` is ``[control] socket`` from the file (relative paths are taken from
    the config file's directory). Otherwise the name is derived from the config path, so
    daemons started with different files (as tests do) never share a socket.
    """
    if configured is not None:
        configured = expand_user(configured, env)
        return configured if configured.is_absolute() else state_dir(config_path) / configured
    resolved = Path(os.path.abspath(config_path)).resolve()
    name = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:12] + ".sock"
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute():
        candidate = Path(runtime) / "neonlocal" / name
        if len(os.fsencode(candidate)) <= _MAX_SOCKET_PATH:
            return candidate
    # /tmp rather than $TMPDIR: macOS's per-user TMPDIR alone nearly fills sun_path.
    return Path(f"/tmp/neonlocal-{os.getuid()}") / name  # noqa: S108 - private dir, see ensure_private_dir


def state_dir(config_path: Path) -> Path:
    """The directory the daemon keeps generated state in: the config file's own."""
    return Path(os.path.abspath(config_path)).parent


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` as a 0700 directory, or tighten an existing one we own.

    Refuses (PermissionError) a symlink or a directory owned by another user: in a
    shared /tmp someone else could have created it first to watch or hijack the socket.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a directory (a symlink or file is in the way)")
    if info.st_uid != os.geteuid():
        raise PermissionError(
            f"{path} belongs to another user (uid {info.st_uid}); refusing to use it"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def expand_user(path: Path, env: Mapping[str, str]) -> Path:
    """``~`` and ``~/x`` expanded with ``$HOME`` from ``env`` (``~user`` is left alone)."""
    parts = path.parts
    if not parts or parts[0] != "~":
        return path
    return home_dir(env).joinpath(*parts[1:])


def home_dir(env: Mapping[str, str]) -> Path:
    """``$HOME`` from ``env``, else the password database's entry for this user."""
    home = env.get("HOME")
    if home:
        return Path(home)
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def _xdg_dir(env: Mapping[str, str], name: str, fallback: str) -> Path:
    value = env.get(name)
    # The XDG spec says relative values are invalid and must be ignored.
    if value and Path(value).is_absolute():
        return Path(value)
    return home_dir(env) / fallback


def socket_answers(path: Path, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the Unix socket at ``path``: a socket file
    that does not answer was left behind by a process that died, and may be replaced."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True
