"""The shipped systemd units and LaunchAgent: what they promise, and that the tools accept them."""

from __future__ import annotations

import ctypes.util
import json
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neonlocal.defaults import LAUNCHD_LABEL, SERVICE_STOP_GRACE_S, SHUTDOWN_DEADLINE_S
from neonlocal.service import InstallPlan, render_launchd, render_systemd, template_text

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "systemd" / "neonlocal.service"
SOCKET = REPO / "systemd" / "neonlocal.socket"
PLIST = REPO / "launchd" / f"{LAUNCHD_LABEL}.plist"


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, value = line.split("=", 1)
        current.append((key, value))
    return sections


def _values(path: Path, section: str, key: str) -> list[str]:
    return [value for k, value in _unit(path)[section] if k == key]


def _one(path: Path, section: str, key: str) -> str:
    values = _values(path, section, key)
    assert len(values) == 1, (key, values)
    return values[0]


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))


# --- systemd service -------------------------------------------------------------------


def test_service_reports_readiness_and_reloads_on_sighup() -> None:
    """systemd waits for READY=1, and `systemctl reload` sends the daemon SIGHUP."""
    assert _one(SERVICE, "Service", "Type") == "notify"
    assert _one(SERVICE, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_service_runs_up_with_the_installed_executable_and_config() -> None:
    """ExecStart is `neonlocal --config PATH up`, with both paths filled in at install."""
    assert (
        _one(SERVICE, "Service", "ExecStart") == "@NEONLOCAL_EXEC@ --config @NEONLOCAL_CONFIG@ up"
    )


def test_service_restarts_after_a_crash_but_gives_up_on_a_start_loop() -> None:
    """Restart=on-failure, with a start limit so a taken port ends up as "failed"."""
    assert _one(SERVICE, "Service", "Restart") == "on-failure"
    restart_sec = _seconds(_one(SERVICE, "Service", "RestartSec"))
    burst = int(_one(SERVICE, "Unit", "StartLimitBurst"))
    interval = _seconds(_one(SERVICE, "Unit", "StartLimitIntervalSec"))
    # The limit only bites if `burst` restarts fit into the interval.
    assert burst * restart_sec < interval


def test_systemd_waits_for_the_shutdown_deadline_plus_grace_before_killing() -> None:
    """TimeoutStopSec leaves the daemon its whole drain deadline, and 5 s more."""
    assert SERVICE_STOP_GRACE_S == 5.0
    assert _seconds(_one(SERVICE, "Service", "TimeoutStopSec")) == (
        SHUTDOWN_DEADLINE_S + SERVICE_STOP_GRACE_S
    )


def test_service_is_sandboxed_but_may_write_its_config_and_runtime_dirs() -> None:
    """Hardening for a user unit; writes allowed only in the config and runtime dirs."""
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "ReadWritePaths": "@NEONLOCAL_CONFIG_DIR@ %t",
    }
    assert {key: _one(SERVICE, "Service", key) for key in expected} == expected


def test_service_logs_unbuffered_and_starts_at_login() -> None:
    """Log lines reach the journal as written; the unit is pulled in by default.target."""
    assert "PYTHONUNBUFFERED=1" in _values(SERVICE, "Service", "Environment")
    assert _one(SERVICE, "Install", "WantedBy") == "default.target"


# --- systemd socket --------------------------------------------------------------------


def test_socket_listens_on_loopback_postgres_port_for_both_ip_versions() -> None:
    """127.0.0.1:5432 and [::1]:5432, the IPv6 one strictly IPv6, for neonlocal.service."""
    assert _values(SOCKET, "Socket", "ListenStream") == ["127.0.0.1:5432", "[::1]:5432"]
    assert _one(SOCKET, "Socket", "BindIPv6Only") == "ipv6-only"
    assert _one(SOCKET, "Socket", "Service") == "neonlocal.service"
    assert _one(SOCKET, "Install", "WantedBy") == "sockets.target"


# --- the tools' own verdict ------------------------------------------------------------


@pytest.fixture
def odd_install(tmp_path: Path) -> InstallPlan:
    """An installation whose paths need quoting (space) and escaping (%, and $ in arguments)."""
    tools = tmp_path / "My Tools %h"
    tools.mkdir()
    executable = tools / "neonlocal"
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    config = tmp_path / "conf $HOME %n" / "config.toml"
    config.parent.mkdir()
    config.write_text("")
    return InstallPlan((str(executable),), config)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package: systemd)",
)
def test_systemd_analyze_accepts_the_installed_units(
    tmp_path: Path, odd_install: InstallPlan
) -> None:
    """`systemd-analyze --user verify` finds no problem, even with awkward install paths.

    verify checks that ExecStart names an existing executable, so a path mangled by
    wrong quoting or an unescaped % fails here.
    """
    units = tmp_path / "units"
    units.mkdir()
    for name in ("neonlocal.service", "neonlocal.socket"):
        (units / name).write_text(render_systemd(template_text(f"systemd/{name}"), odd_install))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)

    done = subprocess.run(
        ["systemd-analyze", "--user", "verify", "neonlocal.service", "neonlocal.socket"],
        cwd=units,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Unknown keys and similar mistakes are only warnings, so any output is a failure.
    assert done.stdout + done.stderr == ""
    assert done.returncode == 0


_MDWE_FILTER = r"""
# systemd's MemoryDenyWriteExecute=yes seccomp filter (systemd 252), then exec argv.
import ctypes, os, sys

lib = ctypes.CDLL(sys.argv[1], use_errno=True)

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, EPERM, MASKED_EQ = 0x7FFF0000, 0x00050000 | 1, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
ctx = lib.seccomp_init(ALLOW)
for name, arg, mask in [("mmap", 2, PROT_WRITE | PROT_EXEC), ("mprotect", 2, PROT_EXEC),
                        ("pkey_mprotect", 2, PROT_EXEC), ("shmat", 2, SHM_EXEC)]:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    rule = (Cmp * 1)(Cmp(arg, MASKED_EQ, mask, mask))
    assert lib.seccomp_rule_add_array(ctx, EPERM, nr, 1, rule) == 0, name
assert lib.seccomp_load(ctx) == 0
os.execv(sys.argv[2], sys.argv[2:])
"""

_DAEMON_STACK = r"""
# What the daemon's process does natively: import everything, TLS on a uvloop loop.
import asyncio, importlib, json, mmap, pkgutil, ssl
import neonlocal

result = {"filtered": True, "imports": {}}
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    result["filtered"] = False
except PermissionError:
    pass
for name in ["uvloop", "cryptography.x509", "pydantic", "pydantic_settings", "watchfiles",
             "structlog", "scramp", "tomlkit", "httpx", "click"] + [
        m.name for m in pkgutil.walk_packages(neonlocal.__path__, "neonlocal.")
        if not m.name.endswith("__main__")]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        result["imports"][name] = repr(exc)

import trustme, uvloop
ca = trustme.CA()
server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ca.issue_cert("localhost").configure_cert(server_ctx)
client_ctx = ssl.create_default_context()
ca.configure_trust(client_ctx)

async def echo_over_tls():
    async def handle(reader, writer):
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
    writer.write(b"ping")
    reply = await reader.readexactly(4)
    writer.close()
    server.close()
    await server.wait_closed()
    return reply.decode()

result["tls"] = uvloop.run(echo_over_tls())
print(json.dumps(result))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp is Linux-only")
@pytest.mark.skipif(ctypes.util.find_library("seccomp") is None, reason="libseccomp not found")
def test_daemon_stack_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """uvloop, TLS, cryptography and every neonlocal module work with W^X memory enforced.

    Modules that fail to import anyway (work in progress elsewhere) are compared against
    an unfiltered run, so only a failure the filter causes fails this test.
    """
    library = ctypes.util.find_library("seccomp")
    assert library is not None
    script = tmp_path / "stack.py"
    script.write_text(_DAEMON_STACK)

    def run(argv: list[str]) -> dict[str, object]:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result

    plain = run([sys.executable, str(script)])
    filtered = run([sys.executable, "-c", _MDWE_FILTER, library, sys.executable, str(script)])

    assert plain["filtered"] is False
    assert filtered == {**plain, "filtered": True}
    assert filtered["tls"] == "ping"


# --- launchd ---------------------------------------------------------------------------


def test_launch_agent_file_is_named_after_its_label() -> None:
    """launchd finds an agent by label; the file name and the Label key agree."""
    agent = plistlib.loads(PLIST.read_bytes())
    assert agent["Label"] == LAUNCHD_LABEL == PLIST.stem


def test_launch_agent_starts_at_login_and_restarts_only_after_failures() -> None:
    """RunAtLoad, KeepAlive on unsuccessful exit, and the shutdown deadline plus grace."""
    agent = plistlib.loads(PLIST.read_bytes())
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["ExitTimeOut"] == SHUTDOWN_DEADLINE_S + SERVICE_STOP_GRACE_S
    assert agent["ProcessType"] == "Interactive"


def test_launch_agent_has_the_environment_it_needs() -> None:
    """A usable PATH and unbuffered output, since launchd passes almost nothing."""
    environment = plistlib.loads(PLIST.read_bytes())["EnvironmentVariables"]
    assert "/usr/bin" in environment["PATH"].split(":")
    assert environment["PYTHONUNBUFFERED"] == "1"


def test_installed_launch_agent_logs_under_library_logs(odd_install: InstallPlan) -> None:
    """Filled in, both output streams go to ~/Library/Logs/neonlocal/, as absolute paths."""
    logs = Path("/Users/maria/Library/Logs/neonlocal")
    agent = plistlib.loads(render_launchd(PLIST.read_text(), odd_install, logs))

    assert agent["StandardOutPath"] == agent["StandardErrorPath"] == str(logs / "neonlocal.log")


def test_launch_agent_and_systemd_unit_run_the_same_command(odd_install: InstallPlan) -> None:
    """Both service managers start `neonlocal --config PATH up` with the same arguments."""
    unit = render_systemd(SERVICE.read_text(), odd_install)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    # systemd's quoting is shell-like for these paths; %% and $$ are its own escapes.
    words = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(exec_start[10:])]
    agent = plistlib.loads(
        render_launchd(PLIST.read_text(), odd_install, Path("/Users/m/Library/Logs/neonlocal"))
    )

    assert agent["ProgramArguments"] == words
    assert words == [*odd_install.executable, "--config", str(odd_install.config), "up"]
