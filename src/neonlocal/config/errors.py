"""What can be wrong with a configuration, said with where it is: ``file:line: message``.

Both sides raise these: the schema (``neonlocal.config.schema``) when it checks a file, and
the daemon's plain values (``neonlocal.config.values``) when a name is checked after loading.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from neonlocal.errors import UserError

__all__ = ["ConfigError", "ConfigProblem", "UnknownBranch", "toml_syntax_error"]

_TOML_POSITION: Final = re.compile(
    r"^(?P<msg>.*?) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$", re.S
)


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the configuration, and where it is."""

    line: int | None
    message: str
    env_var: str | None = None

    def render(self, path: Path) -> str:
        if self.env_var is not None:
            return f"environment variable {self.env_var}: {self.message}"
        if self.line is not None:
            return f"{path}:{self.line}: {self.message}"
        return f"{path}: {self.message}"


class ConfigError(UserError):
    """The configuration cannot be used. ``str()`` gives ``file:line: message`` lines.

    ``line`` and ``message`` describe the first problem (``message`` without its place);
    ``problems`` holds them all.
    ``env_var`` is set instead of ``line`` when the bad value came from the environment.
    """

    def __init__(
        self,
        path: Path,
        line: int | None,
        message: str,
        *,
        env_var: str | None = None,
        more: Sequence[ConfigProblem] = (),
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.env_var = env_var
        self.problems: tuple[ConfigProblem, ...] = (ConfigProblem(line, message, env_var), *more)

    def __str__(self) -> str:
        return "\n".join(problem.render(self.path) for problem in self.problems)


def toml_syntax_error(path: Path, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """A ConfigError at the line and column tomllib reported."""
    match = _TOML_POSITION.match(str(exc))
    if match is None:
        return ConfigError(path, None, f"invalid TOML: {exc}")
    message = f"invalid TOML: {match['msg']}"
    if match["line"] is None:
        return ConfigError(path, None, f"{message} (at end of file)")
    return ConfigError(path, int(match["line"]), f"{message} (column {match['col']})")


class UnknownBranch(UserError):
    """A branch name that is not configured; suggests the closest one that is."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(self._describe())

    def _describe(self) -> str:
        if not self.known:
            return f'unknown branch "{self.name}"; no branches are configured'
        text = f'unknown branch "{self.name}"; known: {", ".join(self.known)}'
        close = difflib.get_close_matches(self.name, self.known, n=1, cutoff=0.6)
        if close:
            text += f' (did you mean "{close[0]}"?)'
        return text
