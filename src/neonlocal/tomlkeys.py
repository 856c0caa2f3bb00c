"""Where each key of a TOML text is: the line a key path (or table) is first defined on.

Error messages about a config file name the line of the offending key; tomllib gives
values but no positions, so the text is scanned for them separately.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator

__all__ = ["key_lines"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


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
