"""The config schema: one TOML file, overridden by ``NEONLOCAL_*`` environment variables.

``load_settings(path, env)`` is the only way in. It checks the file and the environment
against the schema below (pydantic-settings) and returns the plain frozen values of
``neonlocal.config.values``, or raises ConfigError, which names the exact place of the
problem: ``file:line`` for the file, the variable's name for the environment. Values that
are secrets (branch URLs, the local password) never appear in an error message.

The daemon does not import this module: ``neonlocal.config.loader`` runs it in a
short-lived child process (README, "The daemon's memory").

Whether ``branch`` names a configured branch is checked separately, by
``check_selected_branch``: a later feature may resolve names through the Neon API.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
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

from neonlocal.config.errors import ConfigError, ConfigProblem, UnknownBranch, toml_syntax_error
from neonlocal.config.file import key_lines
from neonlocal.config.values import (
    ENV_PREFIX,
    AdminSettings,
    BranchSettings,
    ControlSettings,
    GitSettings,
    ListenSettings,
    LocalSettings,
    LogLevel,
    NeonSettings,
    NetworkSettings,
    Provenance,
    SessionsOnSwitch,
    Settings,
    TlsMode,
    UpstreamSettings,
    branch_name_problem,
    check_selected_branch,
    from_schema,
    is_loopback,
    split_host_port,
)
from neonlocal.conninfo import ConnInfoError, parse_conninfo, validate_upstream
from neonlocal.defaults import SHUTDOWN_DEADLINE_S

# The plain values are re-exported: callers that load settings get them from here too.
__all__ = [
    "ENV_PREFIX",
    "AdminSchema",
    "AdminSettings",
    "BranchSchema",
    "BranchSettings",
    "ConfigError",
    "ConfigProblem",
    "ControlSchema",
    "ControlSettings",
    "GitSchema",
    "GitSettings",
    "ListenSchema",
    "ListenSettings",
    "LocalSchema",
    "LocalSettings",
    "NeonSchema",
    "NeonSettings",
    "NetworkSchema",
    "NetworkSettings",
    "Settings",
    "SettingsSchema",
    "UpstreamSchema",
    "UpstreamSettings",
    "check_selected_branch",
    "load_settings",
    "toml_syntax_error",
]

_ENV_DELIMITER: Final = "__"
# Field names whose input must never be quoted back, even by accident.
_SECRET_FIELDS: Final = frozenset({"url", "password"})
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


# --- the schema -------------------------------------------------------------------------


def _check_name(name: str) -> str:
    problem = branch_name_problem(name)
    if problem is not None:
        raise PydanticCustomError("branch_name", problem)
    return name


def _check_port_key(key: str) -> str:
    if not key.isdigit() or not 1 <= int(key) <= 65535:
        raise PydanticCustomError("port", "a [ports] key is a port number from 1 to 65535")
    return str(int(key))


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
PortKey = Annotated[str, AfterValidator(_check_port_key)]
NonEmptyStr = Annotated[str, AfterValidator(_check_not_empty)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenSchema(_Section):
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


class LocalSchema(_Section):
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


class UpstreamSchema(_Section):
    """``[upstream]``: how neonlocal reaches branches."""

    # Bounds TCP, TLS and the authentication exchange with a branch.
    connect_timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    # Bounds the wait after the last authentication message, while Neon's edge wakes a
    # suspended compute (it says nothing meanwhile): as long as a real wake can take.
    wake_timeout: float = Field(default=120.0, gt=0, allow_inf_nan=False)
    keepalive: bool = True
    # Opt-in: keep a closed client's upstream session (reset with DISCARD ALL) for the next
    # client of the same branch, role and database, for at most reuse_idle_timeout seconds.
    reuse_sessions: bool = False
    reuse_idle_timeout: float = Field(default=60.0, gt=0, le=240, allow_inf_nan=False)
    # Send the SCRAM first message right behind the startup packet when the server offered
    # SCRAM last time: one round trip less per login; a server that changed its mind costs
    # one retry on a new connection.
    pipeline_auth: bool = True


class ControlSchema(_Section):
    """``[control]``: the socket the CLI talks to the daemon through."""

    socket: Annotated[Path, BeforeValidator(_path_text)] | None = None


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


class AdminSchema(_Section):
    """``[admin]``: the optional HTTP listener for health checks and metrics."""

    # Off unless set: "127.0.0.1:9187". Port 0 asks the OS for any free port (tests).
    listen: Annotated[str, AfterValidator(_check_admin_listen)] | None = None


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


class NeonSchema(_Section):
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


class NetworkSchema(_Section):
    """``[network]``: where host names really are, like curl's ``--resolve``."""

    # host name -> IP address to connect to; the name still drives SNI and certificates.
    resolve: dict[NonEmptyStr, IpAddress] = Field(default_factory=dict)


class GitSchema(_Section):
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


class SwitchSchema(_Section):
    """``[switch]``: what happens to open sessions when the selected branch changes."""

    # drain: sessions on the old branch end with 57P01 as soon as they are idle outside a
    # transaction (at once if they are), so pools reconnect to the new branch and no work
    # is cut off; keep: they stay on the old branch until they close; terminate: they end
    # now (a query in flight gets a few seconds, then is cancelled).
    sessions: SessionsOnSwitch = "drain"


class BranchSchema(_Section):
    """``[branches.NAME]``: a static target (``url``), or options for an API-found branch."""

    # Without a url the branch is found by name through the Neon API ([neon] project_id).
    url: SecretStr | None = None
    tls: TlsMode = TlsMode.VERIFY_FULL
    user: NonEmptyStr | None = None
    database: NonEmptyStr | None = None
    # Through the API only: use the endpoint's `-pooler` host (None: as [neon] pooled says).
    pooled: bool | None = None
    # true: sessions are read-only and `use` asks first; "confirm": `use` asks first;
    # false: neither. None: as Neon's own `protected` flag says (protect.py).
    protect: Literal[True, False, "confirm"] | None = None

    @model_validator(mode="after")
    def _pooled_needs_the_api(self) -> BranchSchema:
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


@dataclass
class _LoadRequest:
    env_source: PydanticBaseSettingsSource
    toml_source: PydanticBaseSettingsSource | None


# Sources are chosen per load (the path and the environment are arguments), but
# pydantic-settings asks the class for them; this hands them over for one construction.
_LOAD_REQUEST: ContextVar[_LoadRequest | None] = ContextVar("neonlocal_load", default=None)


class SettingsSchema(BaseSettings):
    """The whole configuration. Build it with ``load_settings``.

    Constructed directly (``SettingsSchema(branches=...)``) it reads neither a file nor the
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
    listen: ListenSchema = ListenSchema()
    local: LocalSchema = LocalSchema()
    upstream: UpstreamSchema = UpstreamSchema()
    control: ControlSchema = ControlSchema()
    admin: AdminSchema = AdminSchema()
    neon: NeonSchema = NeonSchema()
    network: NetworkSchema = NetworkSchema()
    git: GitSchema = GitSchema()
    switch: SwitchSchema = SwitchSchema()
    # Extra local ports, each serving one fixed branch: "5433" = "main" (pinned.py).
    ports: dict[PortKey, BranchName] = Field(default_factory=dict)
    branches: dict[BranchName, BranchSchema] = Field(default_factory=dict)

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
    def _exposure_needs_password(self) -> SettingsSchema:
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
    def _pinned_ports_are_not_the_main_one(self) -> SettingsSchema:
        if str(self.listen.port) in self.ports:
            raise PydanticCustomError(
                "port_taken",
                "{reason}",
                {
                    "reason": f"port {self.listen.port} is [listen] port, which follows "
                    "`neonlocal use`; pin branches to other ports",
                    "at": ("ports", str(self.listen.port)),
                },
            )
        if self.neon.project_id is None:
            for port, name in self.ports.items():
                if name not in self.branches:
                    raise PydanticCustomError(
                        "unknown_branch",
                        "{reason}",
                        {
                            "reason": str(UnknownBranch(name, list(self.branches))),
                            "at": ("ports", port),
                        },
                    )
        return self

    @model_validator(mode="after")
    def _urlless_branches_need_the_api(self) -> SettingsSchema:
        if self.neon.project_id is not None:
            return self
        for name, branch in self.branches.items():
            if branch.url is None:
                raise PydanticCustomError(
                    "missing", "Field required", {"at": ("branches", name, "url")}
                )
        return self


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
        toml_source = _TomlFileSource(SettingsSchema, path)
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
    env_source = _MappingEnvSource(SettingsSchema, env)
    token = _LOAD_REQUEST.set(_LoadRequest(env_source, toml_source))
    try:
        settings = SettingsSchema()
    except ValidationError as exc:
        locator = _Locator(path, toml_source.text, toml_source.toml_data, env_source(), env)
        raise _validation_error(locator, exc) from None
    except SettingsError as exc:
        raise _env_decode_error(path, exc, env) from None
    finally:
        _LOAD_REQUEST.reset(token)
    locator = _Locator(path, toml_source.text, toml_source.toml_data, env_source(), env)
    line, env_var = locator.locate(("branch",))
    return dataclasses.replace(from_schema(settings), provenance=Provenance(path, line, env_var))


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
        self._lines = key_lines(text) if text is not None else {}
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
