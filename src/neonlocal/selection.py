"""The selected branch in the config file: read it and rewrite it in place.

``switch_branch`` touches only the top-level ``branch`` key and leaves every other byte
as the user wrote it; it does not judge the name (the CLI checks it first). The file is
replaced atomically, so the daemon never reads half a file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import tomllib
from pathlib import Path

from neonlocal.settings import ConfigError, toml_syntax_error

__all__ = ["atomic_write", "read_selected", "switch_branch"]

_KEY = "branch"


def read_selected(path: Path) -> str | None:
    """The file's ``branch`` value; None when the file or the key is absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    text = _decode(path, data)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise toml_syntax_error(path, exc) from None
    value = document.get(_KEY)
    if value is not None and not isinstance(value, str):
        raise ConfigError(path, None, f"{_KEY}: expected a branch name (a string)")
    return value


def switch_branch(path: Path, name: str) -> None:
    """Set the top-level ``branch = name`` in ``path``, keeping everything else as is.

    Creates the file (0600, in a 0700 directory) when it does not exist. A symlinked
    config is updated at its target, so dotfile setups keep their link.
    """
    target = path.resolve() if path.is_symlink() else path
    try:
        original = target.read_bytes()
    except FileNotFoundError:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(target, f"{_KEY} = {_toml_string(name)}\n".encode(), None)
        return
    text = _decode(path, original)
    updated = _with_branch(path, text, name)
    atomic_write(target, updated.encode("utf-8"), target.stat())


def _with_branch(path: Path, text: str, name: str) -> str:
    # Imported here, not by every daemon: it only writes the file when following git.
    import tomlkit
    import tomlkit.exceptions
    from tomlkit.items import AoT, Table

    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError(path, exc.line, f"invalid TOML: {exc}") from None
    if _KEY in document:
        if isinstance(document[_KEY], Table | AoT):
            # Replacing a table would silently delete what the user wrote in it.
            raise ConfigError(path, None, f"{_KEY}: is a table; expected a branch name")
        document[_KEY] = name
        return document.as_string()
    document.add(_KEY, name)
    return _match_newlines(text, document.as_string())


def _toml_string(text: str) -> str:
    import tomlkit

    return tomlkit.string(text).as_string()


def _match_newlines(before: str, after: str) -> str:
    """Give the text tomlkit inserted the file's own line ending (CRLF files stay CRLF)."""
    if "\r\n" not in before:
        return after
    head = 0
    while head < len(before) and before[head] == after[head]:
        head += 1
    tail = 0
    while tail < len(before) - head and before[-1 - tail] == after[-1 - tail]:
        tail += 1
    inserted = after[head : len(after) - tail].replace("\r\n", "\n").replace("\n", "\r\n")
    return after[:head] + inserted + after[len(after) - tail :]


def atomic_write(path: Path, data: bytes, previous: os.stat_result | None) -> None:
    """Write via a temp file in the same directory and rename it over ``path``.

    The new file keeps ``previous``'s permission bits (and owner, as root); a new file is
    0600, as mkstemp makes it.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if previous is not None:
                os.fchmod(handle.fileno(), stat.S_IMODE(previous.st_mode))
                if os.geteuid() == 0:
                    os.fchown(handle.fileno(), previous.st_uid, previous.st_gid)
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems cannot fsync a directory.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, None, "is not valid UTF-8 text") from None
