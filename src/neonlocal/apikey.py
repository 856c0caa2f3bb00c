"""Where the Neon API key and base URL come from, and how strictly a key file is guarded.

The key comes from ``NEON_API_KEY``, else from ``[neon] api_key_file``. Like ssh with a
private key, a key file that other users can read is refused rather than used: the key can
create and delete every branch of the account's projects. The key is only ever held in
memory; nothing here prints or logs it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from neonlocal.errors import UserError

if TYPE_CHECKING:
    from neonlocal.config.values import Settings
    from neonlocal.neon import NeonApi

__all__ = [
    "API_HOST_ENV",
    "API_KEY_ENV",
    "KEYS_PAGE",
    "KEY_FILE_MODE",
    "ApiKeyError",
    "api_url",
    "config_relative",
    "load_api_key",
    "open_api",
    "read_key_file",
]

API_KEY_ENV: Final = "NEON_API_KEY"
# neonctl's name for the API base URL, honoured so both tools reach the same API.
API_HOST_ENV: Final = "NEON_API_HOST"
KEY_FILE_MODE: Final = 0o600
KEYS_PAGE: Final = "https://console.neon.tech/app/settings/api-keys"


class ApiKeyError(UserError):
    """No usable API key; the message is one line that says what to do."""


def config_relative(settings: Settings, path: Path) -> Path:
    """``path`` with ``~`` expanded, taken from the config file's directory when relative."""
    path = path.expanduser()
    base = settings.config_path
    if path.is_absolute() or base is None:
        return path
    return base.parent / path


def read_key_file(path: Path) -> str:
    """The key stored in ``path``; refuses a file that other users could read or replace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ApiKeyError(f"[neon] api_key_file {path} does not exist") from None
    except OSError as exc:
        if os.path.islink(path):
            raise ApiKeyError(
                f"[neon] api_key_file {path} is a symbolic link; point the setting at the "
                "file itself"
            ) from None
        raise ApiKeyError(
            f"cannot read [neon] api_key_file {path}: {exc.strerror or exc}"
        ) from None
    with os.fdopen(fd, "rb") as handle:
        # Checked on the open file, so the file judged is the file read.
        info = os.fstat(handle.fileno())
        _check_key_file(path, info)
        data = handle.read(64 * 1024)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiKeyError(f"[neon] api_key_file {path} is not a text file") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ApiKeyError(f"[neon] api_key_file {path} is empty; put the API key in it")
    if len(lines) > 1:
        raise ApiKeyError(
            f"[neon] api_key_file {path} has more than one line; it must hold only the API key"
        )
    return lines[0]


def _check_key_file(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ApiKeyError(f"[neon] api_key_file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ApiKeyError(
            f"[neon] api_key_file {path} is accessible by other users (mode {mode:04o}); "
            f"a Neon API key controls your whole account, so it must be private: "
            f"run `chmod 600 {path}`"
        )
    if info.st_uid != os.geteuid():
        raise ApiKeyError(
            f"[neon] api_key_file {path} belongs to another user (uid {info.st_uid}); "
            "use a key file you own, mode 0600"
        )


def load_api_key(settings: Settings, env: Mapping[str, str]) -> str:
    """The API key from ``NEON_API_KEY``, else from ``[neon] api_key_file``."""
    key = env.get(API_KEY_ENV, "").strip()
    if key:
        return key
    if settings.neon.api_key_file is not None:
        return read_key_file(config_relative(settings, settings.neon.api_key_file))
    raise ApiKeyError(
        f"no Neon API key: set {API_KEY_ENV}, or [neon] api_key_file to a file (mode 0600) "
        f"holding one; create a key at {KEYS_PAGE} or run `neonlocal init`"
    )


def api_url(settings: Settings, env: Mapping[str, str]) -> str:
    """``[neon] api_url``, else ``NEON_API_HOST``, else the public API."""
    from neonlocal.neon import DEFAULT_API_URL

    return settings.neon.api_url or env.get(API_HOST_ENV, "").strip() or DEFAULT_API_URL


def open_api(settings: Settings, env: Mapping[str, str], **options: Any) -> NeonApi:
    """A NeonApi client for these settings (close it: ``async with``)."""
    from neonlocal.neon import NeonApi

    return NeonApi(load_api_key(settings, env), api_url(settings, env), **options)
