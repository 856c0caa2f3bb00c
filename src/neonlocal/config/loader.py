"""The daemon's way to load its config without importing the schema's libraries.

``neonlocal.config.schema`` checks the file with pydantic-settings, which the daemon must
not import (README, "The daemon's memory"), so ``SettingsLoader`` runs that check
in a short-lived child (``python -m neonlocal.config.loader``, about 0.2 s) that sends back
the plain values of ``neonlocal.config.values`` as JSON over a pipe, or the ConfigError's
problems.

``neonlocal use`` edits only the ``branch`` key, and should take effect at once: when the
file differs from the last one checked only in that key (and the new name is a possible
branch name), the loader swaps it into the values it already has, without a child.

A process that has imported pydantic anyway (the CLI, the tests) loads in-process: the same
code, and nothing to keep out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from neonlocal.children import child_argv, child_env
from neonlocal.config.errors import ConfigError, ConfigProblem
from neonlocal.config.file import key_lines
from neonlocal.config.values import (
    ENV_PREFIX,
    Settings,
    branch_name_problem,
    from_json,
    to_json,
)

__all__ = ["SettingsLoader"]

_MODULE = "neonlocal.config.loader"
# Far more than a check ever takes; a child that hangs must not hold reloads forever.
CHECK_TIMEOUT_S = 60.0
_BRANCH = "branch"


class SettingsLoader:
    """Loads one config file with the daemon's environment; raises ConfigError."""

    def __init__(self, path: Path, env: Mapping[str, str], *, isolate: bool | None = None) -> None:
        self.path = path
        # Only NEONLOCAL_* variables are settings; the child gets nothing else from here.
        self._env = {name: value for name, value in env.items() if _is_setting(name)}
        self._isolate = isolate
        # The last file that checked out, as parsed without its `branch`, and its values.
        self._last: tuple[dict[str, Any], Settings] | None = None
        # How many loads needed the full check (tests use it to see the quick path taken).
        self.checks = 0

    @property
    def isolated(self) -> bool:
        """Whether the check runs in a child: unless told, when pydantic is not loaded yet."""
        if self._isolate is not None:
            return self._isolate
        return "pydantic" not in sys.modules and child_argv(_MODULE) is not None

    async def load(self) -> Settings:
        file = _read(self.path)
        quick = self._branch_only(file)
        if quick is not None:
            return quick
        self.checks += 1
        argv = child_argv(_MODULE)
        if not self.isolated or argv is None:
            settings = _load_here(self.path, self._env)
        else:
            settings = await self._check_in_child(argv)
        self._remember(file, settings)
        return settings

    # --- the quick path -----------------------------------------------------------------------

    def _remember(self, file: _File | None, settings: Settings) -> None:
        # Only if the file the check read is surely the one parsed here: it could have been
        # replaced in between.
        try:
            unchanged = file is not None and self.path.read_bytes() == file.data
        except OSError:
            unchanged = False
        self._last = (file.without_branch(), settings) if file and unchanged else None

    def _branch_only(self, file: _File | None) -> Settings | None:
        """The last values with the file's new ``branch``, if nothing else can have changed."""
        if file is None or self._last is None:
            return None
        if _setting_name(_BRANCH) in {name.upper() for name in self._env}:
            return None
        rest, settings = self._last
        if file.without_branch() != rest:
            return None
        name = file.document.get(_BRANCH)
        if name is not None and (not isinstance(name, str) or branch_name_problem(name)):
            return None  # the full check says what is wrong, at its line
        line = key_lines(file.text).get((_BRANCH,)) if name is not None else None
        provenance = dataclasses.replace(settings.provenance, branch_line=line)
        return dataclasses.replace(settings, branch=name, provenance=provenance)

    # --- the child ----------------------------------------------------------------------------

    async def _check_in_child(self, argv: list[str]) -> Settings:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=child_env(),
            )
        except OSError as exc:  # out of processes or file descriptors, say
            raise self._failed(f"cannot start it: {exc.strerror or exc}") from None
        try:
            out, _ = await asyncio.wait_for(process.communicate(self._request()), CHECK_TIMEOUT_S)
        except TimeoutError:
            raise self._failed("it took too long") from None
        finally:
            # Timed out, or the daemon stops mid-check: no check outlives its question.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.shield(process.wait())
        return self._reply(process.returncode, out)

    def _request(self) -> bytes:
        return json.dumps({"path": str(self.path), "env": self._env}).encode()

    def _reply(self, returncode: int | None, out: bytes) -> Settings:
        try:
            reply = json.loads(out)
        except ValueError:
            raise self._failed(f"exit status {returncode}") from None
        if "settings" in reply:
            return from_json(reply["settings"])
        if "problems" in reply:
            first, *more = (ConfigProblem(*problem) for problem in reply["problems"])
            raise ConfigError(
                self.path, first.line, first.message, env_var=first.env_var, more=more
            )
        raise self._failed(str(reply.get("crash", "no answer")))

    def _failed(self, why: str) -> ConfigError:
        return ConfigError(self.path, None, f"cannot check the config: the check failed ({why})")


@dataclasses.dataclass(frozen=True)
class _File:
    """The config file as read once: its bytes, its text and its TOML."""

    data: bytes
    text: str
    document: dict[str, Any]

    def without_branch(self) -> dict[str, Any]:
        return {key: value for key, value in self.document.items() if key != _BRANCH}


def _read(path: Path) -> _File | None:
    """The file, or None when it cannot be read or does not parse (the check says why)."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
        return _File(data, text, tomllib.loads(text))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _setting_name(key: str) -> str:
    return f"{ENV_PREFIX}{key}".upper()


def _is_setting(name: str) -> bool:
    return name.upper().startswith(ENV_PREFIX)


def _load_here(path: Path, env: Mapping[str, str]) -> Settings:
    from neonlocal.config.schema import load_settings

    return load_settings(path, env)


def _main() -> int:
    """The child: a request on stdin, the values or the problems on stdout, as JSON."""
    request = json.loads(sys.stdin.buffer.read())
    try:
        settings = _load_here(Path(request["path"]), request["env"])
    except ConfigError as exc:
        problems = [[p.line, p.message, p.env_var] for p in exc.problems]
        reply: dict[str, Any] = {"problems": problems}
    except Exception as exc:  # a bug; its message could quote a value, so only its kind
        reply = {"crash": type(exc).__name__}
    else:
        reply = {"settings": to_json(settings)}
    sys.stdout.write(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
