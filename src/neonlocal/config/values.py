"""The configuration as the daemon holds it: frozen plain values, no validation library.

``neonlocal.config.schema`` checks a file and the environment against its rules (pydantic)
and hands back these values. The daemon never imports the schema (README, "The daemon's
memory"): ``neonlocal.config.loader`` has it checked in a short-lived child process and
receives these values as JSON (``to_json``/``from_json``).

Every field here has its twin, with its rules, in ``neonlocal.config.schema``; a unit test
keeps names and defaults equal.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final, Literal

from neonlocal.config.errors import ConfigError, UnknownBranch
from neonlocal.defaults import SHUTDOWN_DEADLINE_S

__all__ = [
    "ENV_PREFIX",
    "AdminSettings",
    "BranchSettings",
    "ControlSettings",
    "GitSettings",
    "ListenSettings",
    "LocalSettings",
    "NeonSettings",
    "NetworkSettings",
    "Provenance",
    "Secret",
    "SessionsOnSwitch",
    "Settings",
    "SwitchSettings",
    "TlsMode",
    "UpstreamSettings",
    "branch_name_problem",
    "check_selected_branch",
    "from_json",
    "from_schema",
    "is_loopback",
    "split_host_port",
    "to_json",
]

ENV_PREFIX: Final = "NEONLOCAL_"

LogLevel = Literal["debug", "info", "warning", "error"]


# --- small rules both sides need ----------------------------------------------------------


def branch_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a branch name, or None when it can."""
    if not name:
        return "a branch name cannot be empty"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return "a branch name cannot contain control characters"
    return None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals; a host name is assumed exposed."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


class Secret:
    """A string that never shows itself in a repr, a log line or an error message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# --- the values -------------------------------------------------------------------------
# The comments on what each key means are in neonlocal.config.schema, beside its rules.


class TlsMode(Enum):
    """How the upstream connection is protected; anything but VERIFY_FULL is an opt-out."""

    VERIFY_FULL = "verify-full"
    VERIFY_CA = "verify-ca"
    NO_VERIFY = "no-verify"
    DISABLE = "disable"


@dataclass(frozen=True)
class ListenSettings:
    """``[listen]``: where clients connect."""

    host: tuple[str, ...] = ("127.0.0.1", "::1")
    port: int = 5432
    max_sessions: int = 1000
    allow_non_loopback: bool = False
    unix_socket_dir: str = "auto"


@dataclass(frozen=True)
class LocalSettings:
    """``[local]``: how local clients authenticate."""

    password: Secret | None = None
    tls: bool = True
    require_tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_auth: Literal["trust", "password"] = "trust"


@dataclass(frozen=True)
class UpstreamSettings:
    """``[upstream]``: how neonlocal reaches branches."""

    connect_timeout: float = 30.0
    wake_timeout: float = 120.0
    keepalive: bool = True
    reuse_sessions: bool = False
    reuse_idle_timeout: float = 60.0
    pipeline_auth: bool = True


@dataclass(frozen=True)
class ControlSettings:
    """``[control]``: the socket the CLI talks to the daemon through."""

    socket: Path | None = None


@dataclass(frozen=True)
class AdminSettings:
    """``[admin]``: the optional HTTP listener for health checks and metrics."""

    listen: str | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when the listener is off."""
        return None if self.listen is None else split_host_port(self.listen)


@dataclass(frozen=True)
class NeonSettings:
    """``[neon]``: finding branches by name through the Neon API."""

    project_id: str | None = None
    api_key_file: Path | None = None
    api_url: str | None = None
    role: str | None = None
    database: str | None = None
    pooled: bool = False
    sslrootcert: Path | None = None


@dataclass(frozen=True)
class NetworkSettings:
    """``[network]``: where host names really are, like curl's ``--resolve``."""

    resolve: dict[str, str] = field(default_factory=dict)


# What a switch does to sessions open on the branch switched away from (``[switch]``).
SessionsOnSwitch = Literal["drain", "keep", "terminate"]


@dataclass(frozen=True)
class SwitchSettings:
    """``[switch]``: what happens to open sessions when the selected branch changes."""

    sessions: SessionsOnSwitch = "drain"


@dataclass(frozen=True)
class GitSettings:
    """``[git]``: switch Neon branches as the git branch of a repository changes."""

    follow: bool = False
    repo: Path | None = None
    create: bool = False
    parent: str | None = None
    map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BranchSettings:
    """``[branches.NAME]``: a static target (``url``), or options for an API-found branch."""

    url: Secret | None = None
    tls: TlsMode = TlsMode.VERIFY_FULL
    user: str | None = None
    database: str | None = None
    pooled: bool | None = None
    protect: Literal[True, False, "confirm"] | None = None


@dataclass(frozen=True)
class Provenance:
    """Where a Settings came from, for error messages about it after loading."""

    path: Path | None = None
    branch_line: int | None = None
    branch_env: str | None = None


@dataclass(frozen=True)
class Settings:
    """The whole configuration. ``neonlocal.config.schema.load_settings`` makes one from a file.

    Constructed directly (``Settings(branches=...)``) nothing is checked, which is what
    tests of other modules want.
    """

    branch: str | None = None
    log_level: LogLevel = "info"
    shutdown_deadline: float = SHUTDOWN_DEADLINE_S
    listen: ListenSettings = ListenSettings()
    local: LocalSettings = LocalSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    control: ControlSettings = ControlSettings()
    admin: AdminSettings = AdminSettings()
    neon: NeonSettings = NeonSettings()
    network: NetworkSettings = NetworkSettings()
    git: GitSettings = GitSettings()
    switch: SwitchSettings = SwitchSettings()
    # Port number (as text, a TOML key) -> the branch it always serves.
    ports: dict[str, str] = field(default_factory=dict)
    branches: dict[str, BranchSettings] = field(default_factory=dict)
    # Two Settings with the same values are the same configuration, wherever they came from
    # and whatever comments or layout the file had.
    provenance: Provenance = field(default=Provenance(), compare=False, repr=False)

    @property
    def config_path(self) -> Path | None:
        """The file these settings were loaded from (None when built directly)."""
        return self.provenance.path


def check_selected_branch(settings: Settings) -> None:
    """Raise ConfigError if ``branch`` is set but names no ``[branches]`` table.

    With ``[neon] project_id`` any name may be a branch found through the API, which the
    daemon checks when it resolves it.
    """
    name = settings.branch
    if name is None or name in settings.branches or settings.neon.project_id is not None:
        return
    origin = settings.provenance
    raise ConfigError(
        origin.path or Path("<settings>"),
        origin.branch_line,
        f"branch: {UnknownBranch(name, list(settings.branches))}",
        env_var=origin.branch_env,
    )


# --- crossing a process boundary ----------------------------------------------------------


def to_json(value: Any) -> Any:
    """Settings (or any part of them) as JSON-ready data, secrets included: for a pipe only."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Secret):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


def from_json(data: Mapping[str, Any]) -> Settings:
    """The inverse of ``to_json``."""
    return _settings(data)


def from_schema(checked: object) -> Settings:
    """The values of the schema's validated object (``neonlocal.config.schema``)."""
    return _settings(checked)


def _settings(source: object) -> Settings:
    settings = _build(Settings, source)
    assert isinstance(settings, Settings)
    return settings


def _build(kind: Any, value: Any) -> Any:
    """``value`` (JSON data, or attributes of the schema's objects) as the type ``kind``."""
    if value is None:
        return None
    origin = typing.get_origin(kind)
    if origin in (typing.Union, _UnionType):
        (kind,) = (arg for arg in typing.get_args(kind) if arg is not type(None))
        return _build(kind, value)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(kind)
        return tuple(_build(item, part) for part in value)
    if origin is dict:
        _key, item = typing.get_args(kind)
        return {key: _build(item, part) for key, part in value.items()}
    if origin is Literal or kind in (str, int, bool):
        return value
    if kind is float:
        return float(value)
    if kind is Secret:
        return Secret(value if isinstance(value, str) else value.get_secret_value())
    if kind is Path:
        return Path(value)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind(value.value if isinstance(value, enum.Enum) else value)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        fields = _fields(kind)
        if isinstance(value, Mapping):
            # What the other side left out keeps its default.
            parts = {name: _build(fields[name], part) for name, part in value.items()}
        else:
            # A schema object: every value field must be there (provenance is not one).
            parts = {
                name: _build(hint, getattr(value, name))
                for name, hint in fields.items()
                if name != "provenance"
            }
        return kind(**parts)
    raise TypeError(f"no conversion to {kind!r}")


_UnionType: Final = type(int | None)
_FIELDS: dict[type, dict[str, Any]] = {}


def _fields(kind: type) -> dict[str, Any]:
    """The fields of a settings dataclass and their types."""
    fields = _FIELDS.get(kind)
    if fields is None:
        hints = typing.get_type_hints(kind)
        fields = {f.name: hints[f.name] for f in dataclasses.fields(kind)}
        _FIELDS[kind] = fields
    return fields
