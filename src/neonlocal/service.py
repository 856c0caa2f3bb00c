"""Running the daemon as the user's login service: the work behind `neonlocal service`.

On Linux it writes a systemd user unit (optionally with a socket unit) and drives
`systemctl --user`; on macOS it writes a LaunchAgent and drives `launchctl`. The unit files
shipped in the package are templates: `install` fills in the real executable and config
paths, so nothing machine-specific is hard-coded, and re-running it converges on the same
files without errors.

Every failure is a ServiceError: one line for the user (``neonlocal.cli.service`` prints it).
"""

from __future__ import annotations

import enum
import math
import os
import plistlib
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from neonlocal.defaults import (
    LAUNCHD_LABEL,
    SERVICE_NAME,
    SERVICE_STOP_GRACE_S,
    SHUTDOWN_DEADLINE_S,
)
from neonlocal.errors import UserError
from neonlocal.paths import home_dir

SERVICE_UNIT = f"{SERVICE_NAME}.service"
SOCKET_UNIT = f"{SERVICE_NAME}.socket"

_PLACEHOLDER = "@NEONLOCAL_"
_EXEC = "@NEONLOCAL_EXEC@"
_CONFIG = "@NEONLOCAL_CONFIG@"
_CONFIG_DIR = "@NEONLOCAL_CONFIG_DIR@"
_LOG_DIR = "@NEONLOCAL_LOG_DIR@"

MISSING_TOOL = {
    "systemctl": "systemctl not found: is this a systemd system?",
    "journalctl": "journalctl not found: is this a systemd system?",
    "launchctl": "launchctl not found: is this macOS?",
    "tail": "tail not found: cannot show the log file",
}


class ServiceError(UserError):
    """A service operation failed; the message is the one line the user sees."""


class Platform(enum.Enum):
    """Which service manager `service` drives."""

    LINUX = "linux"
    DARWIN = "darwin"

    @classmethod
    def current(cls) -> Platform:
        """The platform this process runs on; ServiceError where neither is supported."""
        if sys.platform.startswith("linux"):
            return cls.LINUX
        if sys.platform == "darwin":
            return cls.DARWIN
        raise ServiceError(
            f"neonlocal service supports Linux (systemd) and macOS (launchd), not {sys.platform}"
        )


class RunState(enum.Enum):
    """Whether the service is there and serving."""

    NOT_INSTALLED = "not installed"
    STOPPED = "stopped"
    RUNNING = "running"


@dataclass(frozen=True)
class UserDirs:
    """The per-user locations the service files go to, read once from the environment."""

    home: Path
    config_home: Path
    uid: int
    # Where the user's service manager listens, for systemd (XDG_RUNTIME_DIR).
    runtime_dir: Path | None = None
    session_bus: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> UserDirs:
        """HOME and XDG_CONFIG_HOME from `env` (a relative XDG value is ignored, per spec)."""
        home = home_dir(env)
        xdg = env.get("XDG_CONFIG_HOME", "")
        config_home = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".config"
        runtime = env.get("XDG_RUNTIME_DIR", "")
        return cls(
            home=home,
            config_home=config_home,
            uid=os.getuid(),
            runtime_dir=Path(runtime) if runtime and Path(runtime).is_absolute() else None,
            session_bus=bool(env.get("DBUS_SESSION_BUS_ADDRESS")),
        )


@dataclass(frozen=True)
class ServiceStatus:
    """What `service status` reports."""

    state: RunState
    detail: str
    """The manager's own words for the state, e.g. "active (running)"."""
    unit_path: Path
    since: str | None = None
    pid: int | None = None
    socket_activation: bool = False


@dataclass(frozen=True)
class InstallPlan:
    """The real values that replace the templates' placeholders."""

    executable: tuple[str, ...]
    config: Path
    # The config's shutdown_deadline: the service manager must wait that long, and a little
    # more, before it kills a stopping daemon.
    shutdown_deadline: float = SHUTDOWN_DEADLINE_S
    # The config's [listen] addresses, for a socket unit: systemd listens there for us.
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 5432), ("::1", 5432))

    @property
    def stop_timeout_s(self) -> int:
        return math.ceil(self.shutdown_deadline + SERVICE_STOP_GRACE_S)

    def __post_init__(self) -> None:
        for value in (*self.executable, str(self.config)):
            # Quotes, backslashes and control characters would need escaping rules that
            # differ between unit-file keys; no real install path needs them.
            if any(ch in value for ch in '"\\') or not value.isprintable():
                raise ServiceError(f"cannot put path {value!r} into a service file")


class ServiceManager(Protocol):
    """One platform's way of installing, inspecting and removing the service."""

    def install(self, plan: InstallPlan, *, socket: bool) -> list[str]: ...

    def uninstall(self) -> list[str]: ...

    def status(self) -> ServiceStatus: ...

    def logs_command(self, *, follow: bool, lines: int) -> list[str]: ...


def find_executable() -> tuple[str, ...]:
    """The command that starts this installation of neonlocal, as absolute argv words.

    The console script next to the running interpreter comes first: it belongs to this
    installation even when another `neonlocal` is earlier on PATH.
    """
    beside_interpreter = Path(sys.executable).absolute().parent / "neonlocal"
    candidates = [beside_interpreter]
    if Path(sys.argv[0]).name == "neonlocal":
        candidates.append(Path(sys.argv[0]).resolve())
    on_path = shutil.which("neonlocal")
    if on_path:
        candidates.append(Path(on_path).absolute())
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return (str(candidate),)
    return (str(Path(sys.executable).absolute()), "-m", "neonlocal")


def template_text(relative: str) -> str:
    """A unit template, from the installed package or, in a source checkout, the repo root."""
    packaged = resources.files("neonlocal").joinpath("units", relative)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    in_checkout = Path(__file__).resolve().parents[2] / relative
    if in_checkout.is_file():
        return in_checkout.read_text(encoding="utf-8")
    raise ServiceError(f"the {relative} template is missing from this neonlocal installation")


def render_systemd(template: str, plan: InstallPlan) -> str:
    """Fill a systemd unit template with quoted, specifier-escaped real values."""
    if "$" in plan.executable[0]:
        # systemd expands $$ in arguments but not in the command path, and versions differ
        # on whether they expand anything there; no escaping is right for all of them.
        raise ServiceError(f"cannot put path {plan.executable[0]!r} into a systemd unit")
    text = (
        template.replace(_EXEC, " ".join(_systemd_word(w, exec_line=True) for w in plan.executable))
        .replace(_CONFIG_DIR, _systemd_word(str(plan.config.parent), exec_line=False))
        .replace(_CONFIG, _systemd_word(str(plan.config), exec_line=True))
    )
    text = re.sub(r"(?m)^TimeoutStopSec=\d+$", f"TimeoutStopSec={plan.stop_timeout_s}", text)
    text = _with_listen_streams(text, plan.listen)
    _check_filled(text)
    return text


def _with_listen_streams(text: str, listen: tuple[tuple[str, int], ...]) -> str:
    """A socket unit's ListenStream lines: one per [listen] address of the config, where
    the template has its first one."""
    streams = [
        f"ListenStream={f'[{host}]' if ':' in host else host}:{port}" for host, port in listen
    ]
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("ListenStream="):
            out.append(line)
        elif streams:
            out.extend(stream + "\n" for stream in streams)
            streams = []
    return "".join(out)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def render_launchd(template: str, plan: InstallPlan, log_dir: Path) -> bytes:
    """Fill the LaunchAgent template; the executable may expand to several arguments."""
    values = {
        _CONFIG: str(plan.config),
        _CONFIG_DIR: str(plan.config.parent),
        _LOG_DIR: str(log_dir),
    }

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            filled_dict = {key: fill(value) for key, value in node.items()}
            if "ExitTimeOut" in filled_dict:
                filled_dict["ExitTimeOut"] = plan.stop_timeout_s
            return filled_dict
        if isinstance(node, list):
            filled: list[Any] = []
            for item in node:
                filled.extend(plan.executable if item == _EXEC else [fill(item)])
            return filled
        if isinstance(node, str):
            for placeholder, value in values.items():
                node = node.replace(placeholder, value)
        return node

    rendered = plistlib.dumps(fill(plistlib.loads(template.encode())), sort_keys=False)
    _check_filled(rendered.decode())
    return rendered


def _systemd_word(value: str, *, exec_line: bool) -> str:
    # % starts a specifier everywhere; $ expands variables only on Exec lines.
    escaped = value.replace("%", "%%")
    if exec_line:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"' if any(ch.isspace() for ch in escaped) else escaped


def _check_filled(text: str) -> None:
    if _PLACEHOLDER in text:
        start = text.index(_PLACEHOLDER)
        end = text.find("@", start + 1)
        raise ServiceError(f"unit template has an unknown placeholder {text[start : end + 1]}")


def _write_if_changed(path: Path, content: bytes) -> bool:
    """Atomically make `path` hold `content`; False when it already did."""
    try:
        if path.read_bytes() == content:
            return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ServiceError(f"cannot read {path}: {exc.strerror}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", delete=False
        ) as tmp:
            tmp.write(content)
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, path)
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror}") from None
    return True


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ServiceError(f"cannot remove {path}: {exc.strerror}") from None
    return True


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ServiceError(MISSING_TOOL.get(argv[0], f"{argv[0]} not found")) from None
    if check and done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        reason = said[-1] if said else f"exit status {done.returncode}"
        raise ServiceError(f"`{' '.join(argv)}` failed: {reason}")
    return done


class SystemdUser:
    """A systemd user unit in `$XDG_CONFIG_HOME/systemd/user`, driven by `systemctl --user`."""

    def __init__(self, dirs: UserDirs) -> None:
        self._unit_dir = dirs.config_home / "systemd" / "user"
        self._dirs = dirs

    def _require_user_manager(self) -> None:
        """Fail before anything is written when no systemd user manager runs for this user
        (over ssh without lingering, su or sudo, a container): every step would fail."""
        dirs = self._dirs
        runtime = dirs.runtime_dir or Path(f"/run/user/{dirs.uid}")
        if dirs.session_bus or (runtime / "systemd" / "private").exists():
            return
        raise ServiceError(
            "no systemd user session runs for this user (systemctl --user cannot reach one), "
            "so nothing was changed: log in through a real session (not su or sudo), or have "
            f"root run `loginctl enable-linger {_user_name(dirs.uid)}`, then try again"
        )

    @property
    def service_path(self) -> Path:
        return self._unit_dir / SERVICE_UNIT

    @property
    def socket_path(self) -> Path:
        return self._unit_dir / SOCKET_UNIT

    def install(self, plan: InstallPlan, *, socket: bool) -> list[str]:
        self._require_user_manager()
        said: list[str] = []
        service_text = render_systemd(template_text(f"systemd/{SERVICE_UNIT}"), plan)
        changed = self._write(self.service_path, service_text, said)
        if socket:
            socket_text = render_systemd(template_text(f"systemd/{SOCKET_UNIT}"), plan)
            changed = self._write(self.socket_path, socket_text, said) or changed
        elif self.socket_path.exists():
            self._systemctl("disable", "--now", SOCKET_UNIT)
            _remove(self.socket_path)
            said.append(f"removed {self.socket_path} (socket activation off)")
            changed = True
        self._systemctl("daemon-reload")
        if socket:
            # Started on the first connection rather than at login; a daemon still holding
            # the port from a plain install must let go before the socket can bind.
            self._systemctl("disable", SERVICE_UNIT)
            self._systemctl("enable", SOCKET_UNIT)
            if changed:
                self._systemctl("stop", SERVICE_UNIT)
                self._systemctl("restart", SOCKET_UNIT)
            else:
                self._systemctl("start", SOCKET_UNIT)
            said.append(f"{SOCKET_UNIT} enabled and listening; {SERVICE_UNIT} starts on demand")
        else:
            self._systemctl("enable", SERVICE_UNIT)
            # A running daemon only picks up a rewritten unit when restarted.
            self._systemctl("restart" if changed else "start", SERVICE_UNIT)
            said.append(f"{SERVICE_UNIT} enabled and running")
        return said

    def uninstall(self) -> list[str]:
        said: list[str] = []
        installed = [
            (unit, path)
            for unit, path in ((SOCKET_UNIT, self.socket_path), (SERVICE_UNIT, self.service_path))
            if path.exists()
        ]
        if not installed:
            return [f"neonlocal service is not installed (no {self.service_path})"]
        self._require_user_manager()
        for unit, _ in installed:
            self._systemctl("disable", "--now", unit)
        for _, path in installed:
            _remove(path)
            said.append(f"removed {path}")
        self._systemctl("daemon-reload")
        return said

    def status(self) -> ServiceStatus:
        if not self.service_path.exists():
            return ServiceStatus(RunState.NOT_INSTALLED, "not installed", self.service_path)
        self._require_user_manager()
        shown = self._show(
            SERVICE_UNIT, "ActiveState", "SubState", "ActiveEnterTimestamp", "MainPID"
        )
        active = shown.get("ActiveState", "unknown")
        detail = f"{active} ({shown.get('SubState', 'unknown')})"
        pid = int(shown.get("MainPID", "0") or "0")
        running = active in {"active", "reloading"}
        return ServiceStatus(
            state=RunState.RUNNING if running else RunState.STOPPED,
            detail=detail,
            unit_path=self.service_path,
            since=(shown.get("ActiveEnterTimestamp") or None) if running else None,
            pid=pid or None,
            socket_activation=self.socket_path.exists(),
        )

    def logs_command(self, *, follow: bool, lines: int) -> list[str]:
        self._require_user_manager()
        return [
            "journalctl",
            "--user",
            "-u",
            SERVICE_NAME,
            "-n",
            str(lines),
            *(["-f"] if follow else []),
        ]

    def _write(self, path: Path, text: str, said: list[str]) -> bool:
        changed = _write_if_changed(path, text.encode())
        said.append(f"{'wrote' if changed else 'unchanged'} {path}")
        return changed

    def _systemctl(self, *args: str) -> None:
        try:
            _run(["systemctl", "--user", *args])
        except ServiceError as exc:
            if "Failed to connect to bus" not in str(exc):
                raise
            # Typical over ssh or in a container: no user manager runs for this user.
            raise ServiceError(f"{exc} (is a systemd user session running?)") from None

    def _show(self, unit: str, *properties: str) -> dict[str, str]:
        done = _run(["systemctl", "--user", "show", "-p", ",".join(properties), unit])
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


class LaunchAgent:
    """A LaunchAgent in `~/Library/LaunchAgents`, driven by `launchctl` in the GUI domain."""

    def __init__(self, dirs: UserDirs) -> None:
        self._dirs = dirs
        self._domain = f"gui/{dirs.uid}"
        self._target = f"{self._domain}/{LAUNCHD_LABEL}"

    @property
    def plist_path(self) -> Path:
        return self._dirs.home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"

    @property
    def log_dir(self) -> Path:
        return self._dirs.home / "Library" / "Logs" / SERVICE_NAME

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{SERVICE_NAME}.log"

    def install(self, plan: InstallPlan, *, socket: bool) -> list[str]:
        if socket:
            raise ServiceError("socket activation is only available with systemd (Linux)")
        content = render_launchd(
            template_text(f"launchd/{LAUNCHD_LABEL}.plist"), plan, self.log_dir
        )
        try:
            # launchd opens the log file but does not create its directory.
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(f"cannot create {self.log_dir}: {exc.strerror}") from None
        changed = _write_if_changed(self.plist_path, content)
        said = [f"{'wrote' if changed else 'unchanged'} {self.plist_path}"]
        loaded = self._loaded()
        if loaded and changed:
            # launchd keeps the job as first loaded; only a fresh bootstrap reads the new file.
            _run(["launchctl", "bootout", self._target])
            loaded = False
        if loaded:
            _run(["launchctl", "kickstart", self._target])
        else:
            # Clears a `launchctl disable` left from earlier, which would make bootstrap fail.
            _run(["launchctl", "enable", self._target])
            _run(["launchctl", "bootstrap", self._domain, str(self.plist_path)])
        said.append(f"{LAUNCHD_LABEL} loaded and running; logs in {self.log_path}")
        return said

    def uninstall(self) -> list[str]:
        if not self.plist_path.exists():
            return [f"neonlocal service is not installed (no {self.plist_path})"]
        if self._loaded():
            _run(["launchctl", "bootout", self._target])
        _remove(self.plist_path)
        return [f"removed {self.plist_path} (logs kept in {self.log_dir})"]

    def status(self) -> ServiceStatus:
        if not self.plist_path.exists():
            return ServiceStatus(RunState.NOT_INSTALLED, "not installed", self.plist_path)
        done = _run(["launchctl", "print", self._target], check=False)
        if done.returncode != 0:
            return ServiceStatus(RunState.STOPPED, "not loaded", self.plist_path)
        fields = _launchctl_fields(done.stdout)
        state = fields.get("state", "unknown")
        pid = int(fields["pid"]) if fields.get("pid", "").isdigit() else None
        running = state == "running"
        detail = (
            state
            if "last exit code" not in fields
            else f"{state}, last exit code {fields['last exit code']}"
        )
        return ServiceStatus(
            state=RunState.RUNNING if running else RunState.STOPPED,
            detail=detail,
            unit_path=self.plist_path,
            since=_process_start(pid) if running and pid else None,
            pid=pid,
        )

    def logs_command(self, *, follow: bool, lines: int) -> list[str]:
        if not self.log_path.exists():
            raise ServiceError(f"no log file yet at {self.log_path}")
        return ["tail", "-n", str(lines), *(["-F"] if follow else []), str(self.log_path)]

    def _loaded(self) -> bool:
        return _run(["launchctl", "print", self._target], check=False).returncode == 0


def _launchctl_fields(text: str) -> dict[str, str]:
    # `launchctl print` is for humans; its top-level "key = value" lines are stable enough
    # for state and pid, and nested blocks are indented further.
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("\t") and not line.startswith("\t\t") and " = " in line:
            key, value = line.strip().split(" = ", 1)
            fields.setdefault(key, value)
    return fields


def _process_start(pid: int) -> str | None:
    try:
        done = _run(["ps", "-o", "lstart=", "-p", str(pid)], check=False)
    except ServiceError:
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def manager_for(platform: Platform, dirs: UserDirs) -> ServiceManager:
    """The service manager backend for `platform`."""
    if platform is Platform.LINUX:
        return SystemdUser(dirs)
    return LaunchAgent(dirs)
