"""The config file as text: where each key is written, and the selected branch rewritten.

tomllib gives values but no positions, so ``key_lines`` scans the text for the line of each
key: error messages name the line of the offending key. ``switch_branch`` touches only the
top-level ``branch`` key and leaves every other byte as the user wrote it; it does not judge
the name (the CLI checks it first). The file is replaced atomically, so the daemon never
reads half a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

from neonlocal.config.errors import ConfigError, toml_syntax_error

__all__ = ["atomic_write", "key_lines", "read_selected", "switch_branch"]

_KEY = "branch"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


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


# --- where each key is ------------------------------------------------------------------


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line on which each key path (and each table) is first defined.

    A scanner, not a parser: it runs only on text tomllib has accepted, so it can skip
    values wholesale and only needs to tell keys and headers apart from string contents.
    """
    lines: dict[tuple[str, ...], int] = {}
    try:
        for path, line in _scan_keys(text):
            for size in range(1, len(path) + 1):
                lines.setdefault(path[:size], line)
    except (IndexError, ValueError):
        pass  # a best effort: lines found so far are still right
    return lines


def _scan_keys(text: str) -> Iterator[tuple[tuple[str, ...], int]]:
    table: tuple[str, ...] = ()
    pos, line, end = 0, 1, len(text)
    while pos < end:
        pos = _skip_blanks(text, pos)
        if pos >= end:
            return
        ch = text[pos]
        if ch == "\n":
            line += 1
            pos += 1
        elif ch in "#\r":
            pos = _to_line_end(text, pos)
        elif ch == "[":
            start = pos + 2 if text.startswith("[[", pos) else pos + 1
            found = _read_key(text, start)
            if found is not None:
                table = found[0]
                yield table, line
            pos = _to_line_end(text, pos)
        else:
            found = _read_key(text, pos)
            if found is None:
                pos = _to_line_end(text, pos)
                continue
            keys, pos = found
            yield table + keys, line
            pos, line = _skip_value(text, pos, line)


def _skip_blanks(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    return pos


def _to_line_end(text: str, pos: int) -> int:
    newline = text.find("\n", pos)
    return len(text) if newline < 0 else newline


def _read_key(text: str, pos: int) -> tuple[tuple[str, ...], int] | None:
    """A (dotted) key at ``pos``: its parts and the position after it."""
    parts: list[str] = []
    while True:
        pos = _skip_blanks(text, pos)
        if pos >= len(text):
            return None
        if text[pos] == '"':
            close = _string_end(text, pos)
            parts.append(tomllib.loads(f"k = {text[pos:close]}")["k"])
            pos = close
        elif text[pos] == "'":
            close = text.index("'", pos + 1)
            parts.append(text[pos + 1 : close])
            pos = close + 1
        else:
            match = _BARE_KEY.match(text, pos)
            if match is None:
                return None
            parts.append(match.group())
            pos = match.end()
        pos = _skip_blanks(text, pos)
        if pos < len(text) and text[pos] == ".":
            pos += 1
            continue
        return tuple(parts), pos


def _string_end(text: str, pos: int) -> int:
    """Position after the single-line basic string starting at ``pos``."""
    index = pos + 1
    while text[index] != '"':
        index += 2 if text[index] == "\\" else 1
    return index + 1


def _skip_value(text: str, pos: int, line: int) -> tuple[int, int]:
    """Skip ``= value`` up to the newline that ends it; multi-line strings and arrays count."""
    depth = 0
    end = len(text)
    while pos < end:
        if text.startswith(('"""', "'''"), pos):
            quote = text[pos : pos + 3]
            index = pos + 3
            while not text.startswith(quote, index):
                if index >= end:
                    raise ValueError("unterminated multi-line string")
                index += 2 if quote == '"""' and text[index] == "\\" else 1
            # Up to two more quote characters may close the string (`""""` is `"` + `"""`).
            extra = 0
            while extra < 2 and text.startswith(quote[0], index + 3):
                index += 1
                extra += 1
            index += 3
            line += text.count("\n", pos, index)
            pos = index
            continue
        ch = text[pos]
        if ch == '"':
            pos = _string_end(text, pos)
            continue
        if ch == "'":
            pos = text.index("'", pos + 1) + 1
            continue
        if ch == "#":
            pos = _to_line_end(text, pos)
            continue
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "\n":
            if depth <= 0:
                return pos, line
            line += 1
        pos += 1
    return pos, line
