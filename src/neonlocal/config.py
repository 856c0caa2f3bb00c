"""Settings: one TOML file, overridden by ``NEONLOCAL_*`` environment variables.

``load_settings(path, env)`` is the only way in. It returns a frozen Settings or raises
ConfigError, which names the exact place of the problem: ``file:line`` for the file, the
variable's name for the environment. Values that are secrets (branch URLs, the local
password) are SecretStr and never appear in an error message.

Whether ``branch`` names a configured branch is checked separately, by
``check_selected_branch``: a later feature may resolve names through the Neon API.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

from neonlocal.conninfo import ConnInfoError, parse_conninfo
from neonlocal.defaults import SHUTDOWN_DEADLINE_S
from neonlocal.targets import TlsMode, UnknownBranch, validate_upstream

__all__ = [
    "ENV_PREFIX",
    "AdminSettings",
    "BranchSettings",
    "ConfigError",
    "ConfigProblem",
    "ControlSettings",
    "GitSettings",
    "ListenSettings",
    "LocalSettings",
    "NeonSettings",
    "NetworkSettings",
    "Settings",
    "UpstreamSettings",
    "check_selected_branch",
    "load_settings",
    "toml_syntax_error",
]

ENV_PREFIX: Final = "NEONLOCAL_"
_ENV_DELIMITER: Final = "__"
# Field names whose input must never be quoted back, even by accident.
_SECRET_FIELDS: Final = frozenset({"url", "password"})
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION: Final = re.compile(
    r"^(?P<msg>.*?) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$", re.S
)


# --- errors -----------------------------------------------------------------------------


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


class ConfigError(Exception):
    """The configuration cannot be used. ``str()`` gives ``file:line: message`` lines.

    ``line`` and ``message`` describe the first problem; ``problems`` holds them all.
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
        self.path = path
        self.line = line
        self.message = message
        self.env_var = env_var
        self.problems: tuple[ConfigProblem, ...] = (ConfigProblem(line, message, env_var), *more)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(problem.render(self.path) for problem in self.problems)


# --- the schema -------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not name:
        raise PydanticCustomError("branch_name", "a branch name cannot be empty")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise PydanticCustomError("branch_name", "a branch name cannot contain control characters")
    return name


def _check_not_empty(value: str) -> str:
    if not value:
        raise PydanticCustomError("empty", "cannot be empty")
    return value


def _split_hosts(value: Any) -> Any:
    # From the environment a list arrives as text: "127.0.0.1,::1" or JSON '["::1"]'.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return value
        return [part.strip() for part in text.split(",")]
    if not isinstance(value, list | tuple):
        raise PydanticCustomError("hosts", "expected an address or a list of addresses")
    return value


def _path_text(value: Any) -> Any:
    if not isinstance(value, str | Path):
        raise PydanticCustomError("path", "expected a file path (a string)")
    return value


def _check_hosts(hosts: tuple[str, ...]) -> tuple[str, ...]:
    if not hosts:
        raise PydanticCustomError("no_hosts", "give at least one address to listen on")
    if any(not host for host in hosts):
        raise PydanticCustomError("empty_host", "an address cannot be empty")
    return hosts


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


BranchName = Annotated[str, AfterValidator(_check_name)]
NonEmptyStr = Annotated[str, AfterValidator(_check_not_empty)]
LogLevel = Literal["debug", "info", "warning", "error"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals; a host name is assumed exposed."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenSettings(_Section):
    """``[listen]``: where clients connect."""

    host: Annotated[
        tuple[str, ...], NoDecode, BeforeValidator(_split_hosts), AfterValidator(_check_hosts)
    ] = ("127.0.0.1", "::1")
    # 0 asks the OS for any free port (tests use it).
    port: int = Field(default=5432, ge=0, le=65535)
    max_sessions: int = Field(default=1000, ge=1)
    allow_non_loopback: bool = False
    # Directory for a Unix-domain socket `.s.PGSQL.<port>` (so `psql -d neondb` works with no
    # host): "auto" picks where libpq looks by default, "" turns it off.
    unix_socket_dir: str = "auto"


class LocalSettings(_Section):
    """``[local]``: how local clients authenticate."""

    password: SecretStr | None = None
    # Answer SSLRequest with TLS (a certificate generated beside the config, or tls_cert/tls_key).
    tls: bool = True
    # Refuse plaintext clients.
    require_tls: bool = False
    tls_cert: Annotated[Path, BeforeValidator(_path_text)] | None = None
    tls_key: Annotated[Path, BeforeValidator(_path_text)] | None = None
    # How TLS clients authenticate when no local password is set: "trust" (like plaintext),
    # or "password": SCRAM with the branch role's real password, with channel binding to the
    # local certificate, so URLs with `channel_binding=require` work.
    tls_auth: Literal["trust", "password"] = "trust"

    @field_validator("password")
    @classmethod
    def _not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise PydanticCustomError("empty", "cannot be empty; remove the key for no password")
        return value


class UpstreamSettings(_Section):
    """``[upstream]``: how neonlocal reaches branches."""

    # Long enough for a suspended Neon compute to start.
    connect_timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    keepalive: bool = True
    # Opt-in: keep a closed client's upstream session (reset with DISCARD ALL) for the next
    # client of the same branch, role and database, for at most reuse_idle_timeout seconds.
    reuse_sessions: bool = False
    reuse_idle_timeout: float = Field(default=60.0, gt=0, le=240, allow_inf_nan=False)
    # Send the SCRAM first message right behind the startup packet when the server offered
    # SCRAM last time: one round trip less per login; a server that changed its mind costs
    # one retry on a new connection.
    pipeline_auth: bool = True


class ControlSettings(_Section):
    """``[control]``: the socket the CLI talks to the daemon through."""

    socket: Annotated[Path, BeforeValidator(_path_text)] | None = None


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); ValueError names what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("expected host:port, such as 127.0.0.1:9187 or [::1]:9187")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, such as [::1]:9187")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def _check_admin_listen(text: str) -> str:
    try:
        host, _port = split_host_port(text)
    except ValueError as exc:
        raise PydanticCustomError("address", "{reason}", {"reason": str(exc)}) from None
    if not is_loopback(host):
        # The endpoints have no authentication; metrics name branches and hosts.
        raise PydanticCustomError(
            "admin_exposed",
            "{reason}",
            {
                "reason": f"the admin listener serves loopback only, not {host}: use "
                "127.0.0.1, [::1] or localhost"
            },
        )
    return text


class AdminSettings(_Section):
    """``[admin]``: the optional HTTP listener for health checks and metrics."""

    # Off unless set: "127.0.0.1:9187". Port 0 asks the OS for any free port (tests).
    listen: Annotated[str, AfterValidator(_check_admin_listen)] | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when the listener is off."""
        return None if self.listen is None else split_host_port(self.listen)


def _check_ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise PydanticCustomError(
            "ip_address", "expected an IP address such as 203.0.113.7, not a host name"
        ) from None
    return value


IpAddress = Annotated[str, AfterValidator(_check_ip_address)]
OptionalPath = Annotated[Path, BeforeValidator(_path_text)] | None


class NeonSettings(_Section):
    """``[neon]``: finding branches by name through the Neon API."""

    # Without it, only [branches.NAME] tables with a url can be selected.
    project_id: NonEmptyStr | None = None
    # A file holding the API key, mode 0600. NEON_API_KEY in the environment wins over it.
    api_key_file: OptionalPath = None
    # None: NEON_API_HOST (as neonctl reads it), else https://console.neon.tech/api/v2.
    api_url: NonEmptyStr | None = None
    # Who to log in as, and where: None picks the database owner and the only database.
    role: NonEmptyStr | None = None
    database: NonEmptyStr | None = None
    # Connect to the endpoint's PgBouncer host (`-pooler`), for every API-resolved branch.
    pooled: bool = False
    # CA file API-resolved endpoints are verified against; None: the system trust store.
    sslrootcert: OptionalPath = None


class NetworkSettings(_Section):
    """``[network]``: where host names really are, like curl's ``--resolve``."""

    # host name -> IP address to connect to; the name still drives SNI and certificates.
    resolve: dict[NonEmptyStr, IpAddress] = Field(default_factory=dict)


class GitSettings(_Section):
    """``[git]``: switch Neon branches as the git branch of a repository changes."""

    follow: bool = False
    # The repository whose HEAD is followed; None: the directory `neonlocal up` starts in.
    repo: OptionalPath = None
    # Create a missing Neon branch (from `parent`, else the project's default branch).
    create: bool = False
    parent: NonEmptyStr | None = None
    # git branch -> Neon branch, where the names differ. Mapping a git branch to the
    # default or a protected Neon branch is the only way to follow into one.
    map: dict[NonEmptyStr, BranchName] = Field(default_factory=dict)


class BranchSettings(_Section):
    """``[branches.NAME]``: a static target (``url``), or options for an API-found branch."""

    # Without a url the branch is found by name through the Neon API ([neon] project_id).
    url: SecretStr | None = None
    tls: TlsMode = TlsMode.VERIFY_FULL
    user: NonEmptyStr | None = None
    database: NonEmptyStr | None = None
    # Through the API only: use the endpoint's `-pooler` host (None: as [neon] pooled says).
    pooled: bool | None = None

    @model_validator(mode="after")
    def _pooled_needs_the_api(self) -> BranchSettings:
        if self.url is not None and self.pooled is not None:
            raise PydanticCustomError(
                "pooled_with_url",
                "{reason}",
                {
                    "reason": "pooled applies to branches found through the Neon API; with a "
                    "url, write the -pooler host into the url instead"
                },
            )
        return self

    @field_validator("url")
    @classmethod
    def _usable_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        try:
            validate_upstream(parse_conninfo(value.get_secret_value()))
        except ConnInfoError as exc:
            # ConnInfoError messages never contain the input, so this is safe to show.
            raise PydanticCustomError("conninfo", "{reason}", {"reason": exc.message}) from None
        return value


class _Provenance:
    """Where a Settings came from, for error messages about it after loading.

    Equal to every other provenance: two Settings with the same values are the same
    configuration, whatever comments or layout the file had.
    """

    __slots__ = ("branch_env", "branch_line", "path")

    def __init__(
        self,
        path: Path | None = None,
        branch_line: int | None = None,
        branch_env: str | None = None,
    ) -> None:
        self.path = path
        self.branch_line = branch_line
        self.branch_env = branch_env

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Provenance)

    def __hash__(self) -> int:
        return 0


@dataclass
class _LoadRequest:
    env_source: PydanticBaseSettingsSource
    toml_source: PydanticBaseSettingsSource | None


# Sources are chosen per load (the path and the environment are arguments), but
# pydantic-settings asks the class for them; this hands them over for one construction.
_LOAD_REQUEST: ContextVar[_LoadRequest | None] = ContextVar("neonlocal_load", default=None)


class Settings(BaseSettings):
    """The whole configuration. Build it with ``load_settings``.

    Constructed directly (``Settings(branches=...)``) it reads neither a file nor the
    environment, which is what tests of other modules want.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=_ENV_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    branch: BranchName | None = None
    log_level: Annotated[LogLevel, BeforeValidator(_lower)] = "info"
    # Seconds a stopping daemon lets open sessions finish before ending them with 57P01.
    shutdown_deadline: float = Field(default=SHUTDOWN_DEADLINE_S, ge=0, allow_inf_nan=False)
    listen: ListenSettings = ListenSettings()
    local: LocalSettings = LocalSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    control: ControlSettings = ControlSettings()
    admin: AdminSettings = AdminSettings()
    neon: NeonSettings = NeonSettings()
    network: NetworkSettings = NetworkSettings()
    git: GitSettings = GitSettings()
    branches: dict[BranchName, BranchSettings] = Field(default_factory=dict)

    _provenance: _Provenance = PrivateAttr(default_factory=_Provenance)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        request = _LOAD_REQUEST.get()
        if request is None:
            return (init_settings,)
        # Earlier sources win: the environment overrides the file.
        if request.toml_source is None:
            return (init_settings, request.env_source)
        return (init_settings, request.env_source, request.toml_source)

    @model_validator(mode="after")
    def _exposure_needs_password(self) -> Settings:
        exposed = [host for host in self.listen.host if not is_loopback(host)]
        if exposed and not (self.listen.allow_non_loopback and self.local.password is not None):
            raise PydanticCustomError(
                "exposed",
                "{reason}",
                {
                    "reason": f"listening on {', '.join(exposed)} (not loopback) needs "
                    "[listen] allow_non_loopback = true and a [local] password",
                    "at": ("listen", "host"),
                },
            )
        return self

    @model_validator(mode="after")
    def _urlless_branches_need_the_api(self) -> Settings:
        if self.neon.project_id is not None:
            return self
        for name, branch in self.branches.items():
            if branch.url is None:
                raise PydanticCustomError(
                    "missing", "Field required", {"at": ("branches", name, "url")}
                )
        return self

    @property
    def config_path(self) -> Path | None:
        """The file these settings were loaded from (None when built directly)."""
        return self._provenance.path


# --- sources ----------------------------------------------------------------------------


class _MappingEnvSource(EnvSettingsSource):
    """The environment source, reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = {
            (name if self.case_sensitive else name.lower()): value for name, value in env.items()
        }


class _TomlFileSource(TomlConfigSettingsSource):
    """The TOML source for a path chosen at load time; keeps the text for line numbers."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        self.text: str | None = None
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        # One read serves both parsing and error lines, so they cannot disagree when an
        # editor or `neonlocal use` replaces the file mid-load.
        self.text = Path(file_path).read_bytes().decode("utf-8")
        return tomllib.loads(self.text)


# --- loading ----------------------------------------------------------------------------


def load_settings(
    path: Path, env: Mapping[str, str] = os.environ, *, missing_ok: bool = False
) -> Settings:
    """Load ``path`` with ``NEONLOCAL_*`` variables from ``env`` on top; raise ConfigError.

    With ``missing_ok`` a missing file counts as empty (defaults plus environment), for
    commands that can work from the environment alone.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(path, None, "is a directory, not a config file")
    try:
        toml_source = _TomlFileSource(Settings, path)
    except tomllib.TOMLDecodeError as exc:
        raise toml_syntax_error(path, exc) from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "is not valid UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None
    if toml_source.text is None and not missing_ok:
        raise ConfigError(
            path,
            None,
            "no such file; create it (see config.example.toml) "
            f"or point --config / {ENV_PREFIX}CONFIG at one",
        )
    env_source = _MappingEnvSource(Settings, env)
    token = _LOAD_REQUEST.set(_LoadRequest(env_source, toml_source))
    try:
        settings = Settings()
    except ValidationError as exc:
        locator = _Locator(path, toml_source.text, toml_source.toml_data, env_source(), env)
        raise _validation_error(locator, exc) from None
    except SettingsError as exc:
        raise _env_decode_error(path, exc, env) from None
    finally:
        _LOAD_REQUEST.reset(token)
    locator = _Locator(path, toml_source.text, toml_source.toml_data, env_source(), env)
    line, env_var = locator.locate(("branch",))
    settings._provenance = _Provenance(path, line, env_var)
    return settings


def check_selected_branch(settings: Settings) -> None:
    """Raise ConfigError if ``branch`` is set but names no ``[branches]`` table.

    With ``[neon] project_id`` any name may be a branch found through the API, which the
    daemon checks when it resolves it.
    """
    name = settings.branch
    if name is None or name in settings.branches or settings.neon.project_id is not None:
        return
    origin = settings._provenance
    raise ConfigError(
        origin.path or Path("<settings>"),
        origin.branch_line,
        f"branch: {UnknownBranch(name, list(settings.branches))}",
        env_var=origin.branch_env,
    )


def toml_syntax_error(path: Path, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """A ConfigError at the line and column tomllib reported."""
    match = _TOML_POSITION.match(str(exc))
    if match is None:
        return ConfigError(path, None, f"invalid TOML: {exc}")
    message = f"invalid TOML: {match['msg']}"
    if match["line"] is None:
        return ConfigError(path, None, f"{message} (at end of file)")
    return ConfigError(path, int(match["line"]), f"{message} (column {match['col']})")


def _env_decode_error(path: Path, exc: SettingsError, env: Mapping[str, str]) -> ConfigError:
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match.group(1) if match else None
    var = _find_env_var(env, (field,)) if field else None
    where = f"{field}: " if field else ""
    return ConfigError(path, None, f"{where}not valid JSON", env_var=var or f"{ENV_PREFIX}*")


def _validation_error(locator: _Locator, exc: ValidationError) -> ConfigError:
    problems: list[ConfigProblem] = []
    for error in exc.errors(include_url=False):
        ctx = error.get("ctx") or {}
        loc = tuple(ctx.get("at", error["loc"]))
        line, env_var = locator.locate(loc)
        text = _scrub(error["msg"], loc, error.get("input"))
        where = _dotted(loc)
        problems.append(ConfigProblem(line, f"{where}: {text}" if where else text, env_var))
    first, *more = problems
    return ConfigError(locator.path, first.line, first.message, env_var=first.env_var, more=more)


def _scrub(message: str, loc: tuple[Any, ...], value: Any) -> str:
    message = message.removeprefix("Value error, ")
    secret = any(part in _SECRET_FIELDS for part in loc if isinstance(part, str))
    if (secret or isinstance(value, SecretStr)) and isinstance(value, str) and value:
        message = message.replace(value, "***")
    return message


def _dotted(loc: tuple[Any, ...]) -> str:
    """A loc as a TOML dotted key, quoting names such as ``"feat/x"``."""
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
        out += f".{key}" if out else key
    return out


def _keys(loc: Sequence[Any]) -> tuple[str, ...]:
    """The leading string keys of a loc (list indexes and dict-key markers end it)."""
    keys: list[str] = []
    for part in loc:
        if not isinstance(part, str) or part == "[key]":
            break
        keys.append(part)
    return tuple(keys)


def _depth(data: Any, keys: tuple[str, ...]) -> tuple[int, bool]:
    """How many of ``keys`` exist in nested ``data``, and whether a leaf value covers the rest."""
    for depth, key in enumerate(keys):
        if not isinstance(data, Mapping):
            return depth, True
        if key not in data:
            return depth, False
        data = data[key]
    return len(keys), True


def _find_env_var(env: Mapping[str, str], keys: Sequence[str | None]) -> str | None:
    names = {name.upper(): name for name in env if name.upper().startswith(ENV_PREFIX)}
    parts = [key for key in keys if key is not None]
    for size in range(len(parts), 0, -1):
        wanted = (ENV_PREFIX + _ENV_DELIMITER.join(parts[:size])).upper()
        if wanted in names:
            return names[wanted]
        nested = sorted(name for upper, name in names.items() if upper.startswith(wanted + "__"))
        if nested:
            return nested[0]
    return None


class _Locator:
    """Maps an error's loc to the file line or environment variable it came from."""

    def __init__(
        self,
        path: Path,
        text: str | None,
        file_data: Mapping[str, Any],
        env_data: Mapping[str, Any],
        env: Mapping[str, str],
    ) -> None:
        self.path = path
        self._lines = _key_lines(text) if text is not None else {}
        self._file_data = file_data
        self._env_data = env_data
        self._env = env

    def locate(self, loc: Sequence[Any]) -> tuple[int | None, str | None]:
        keys = _keys(loc)
        env_depth, env_covers = _depth(self._env_data, keys)
        file_depth, _ = _depth(self._file_data, keys)
        if env_depth and (env_covers or env_depth > file_depth):
            return None, _find_env_var(self._env, keys) or f"{ENV_PREFIX}*"
        for size in range(len(keys), 0, -1):
            line = self._lines.get(keys[:size])
            if line is not None:
                return line, None
        return None, None


# --- where keys are in the file ---------------------------------------------------------


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
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
