"""`neonlocal service` against a temporary HOME, with the service managers replaced.

`systemctl`, `launchctl`, `journalctl`, `tail` and `ps` are stand-in scripts on PATH that
record their argv; per-subcommand files make them answer or fail like the real tools.
"""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from neonlocal import service as service_module
from neonlocal.cli import service as service_cli
from neonlocal.cli.service import service
from neonlocal.service import find_executable

_STANDIN = textwrap.dedent(
    """\
    #!/bin/sh
    PATH=/usr/bin:/bin
    name=${0##*/}
    { printf '%s' "$name"; for a in "$@"; do printf ' %s' "$a"; done; printf '\\n'; } \\
        >> "$STANDIN_DIR/calls.log"
    sub=
    for a in "$@"; do case $a in -*) ;; *) sub=$a; break;; esac; done
    answer="$STANDIN_DIR/$name-$sub"
    [ -f "$answer.out" ] && cat "$answer.out"
    [ -f "$answer.err" ] && cat "$answer.err" >&2
    [ -f "$answer.rc" ] && exit "$(cat "$answer.rc")"
    exit 0
    """
)
_TOOLS = ("systemctl", "launchctl", "journalctl", "tail", "ps")


@dataclass(frozen=True)
class Machine:
    """A temporary user account whose service-manager tools are recording stand-ins."""

    home: Path
    bin_dir: Path
    standin_dir: Path
    config: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.home),
            "PATH": str(self.bin_dir),
            "STANDIN_DIR": str(self.standin_dir),
            "XDG_CONFIG_HOME": "",
            # A running systemd user manager listens here (see the fixture).
            "XDG_RUNTIME_DIR": str(self.home / "run"),
            "DBUS_SESSION_BUS_ADDRESS": "",
            "NEONLOCAL_CONFIG": "",
            "NEONLOCAL_SERVICE_PLATFORM": "",
        }

    def answer(
        self, tool_and_subcommand: str, *, out: str = "", err: str = "", rc: int = 0
    ) -> None:
        """Make e.g. `launchctl print` print `out`/`err` and exit with `rc`."""
        base = self.standin_dir / tool_and_subcommand
        Path(f"{base}.out").write_text(out)
        Path(f"{base}.err").write_text(err)
        Path(f"{base}.rc").write_text(str(rc))

    def calls(self) -> list[str]:
        """Each recorded tool run as one line, and forget them."""
        log = self.standin_dir / "calls.log"
        if not log.exists():
            return []
        lines = log.read_text().splitlines()
        log.unlink()
        return lines

    def run(self, *args: str, env: Mapping[str, str] | None = None) -> Result:
        return CliRunner().invoke(service, list(args), env={**self.env, **(env or {})})


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    home = tmp_path / "home user"
    bin_dir = tmp_path / "bin"
    standin_dir = tmp_path / "standin"
    for directory in (home, bin_dir, standin_dir):
        directory.mkdir()
    for tool in _TOOLS:
        script = bin_dir / tool
        script.write_text(_STANDIN)
        script.chmod(0o755)
    config = home / ".config" / "neonlocal" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('branch = "main"\n')
    # What a logged-in user has: the user manager's socket in the runtime directory.
    (home / "run" / "systemd").mkdir(parents=True)
    (home / "run" / "systemd" / "private").touch()
    return Machine(home=home, bin_dir=bin_dir, standin_dir=standin_dir, config=config)


def _unit(machine: Machine, name: str = "neonlocal.service") -> Path:
    return machine.home / ".config" / "systemd" / "user" / name


def _plist(machine: Machine) -> Path:
    return machine.home / "Library" / "LaunchAgents" / "dev.neonlocal.neonlocal.plist"


def _directives(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


# --- systemd ---------------------------------------------------------------------------


def test_install_writes_a_user_unit_with_this_installations_real_paths(machine: Machine) -> None:
    """The unit starts this neonlocal with the chosen config; no placeholder survives."""
    result = machine.run("--platform", "linux", "install", "--config", str(machine.config))

    assert result.exit_code == 0, result.output
    text = _unit(machine).read_text()
    assert "@NEONLOCAL_" not in text
    executable = find_executable()
    assert executable == (str(Path(sys.executable).parent / "neonlocal"),)
    # The home directory has a space in it, so the config path must be quoted.
    assert _directives(text, "ExecStart") == [f'{executable[0]} --config "{machine.config}" up']
    assert _directives(text, "ReadWritePaths") == [f'"{machine.config.parent}" %t']
    assert machine.calls() == [
        "systemctl --user daemon-reload",
        "systemctl --user enable neonlocal.service",
        "systemctl --user restart neonlocal.service",
    ]
    assert f"wrote {_unit(machine)}" in result.output


def test_install_twice_rewrites_nothing_and_does_not_restart(machine: Machine) -> None:
    """Re-running install is harmless: same file, no error, a running daemon is left alone."""
    first = machine.run("--platform", "linux", "install")
    written = _unit(machine).read_bytes()
    machine.calls()

    second = machine.run("--platform", "linux", "install")

    assert (first.exit_code, second.exit_code) == (0, 0), second.output
    assert _unit(machine).read_bytes() == written
    assert f"unchanged {_unit(machine)}" in second.output
    assert machine.calls() == [
        "systemctl --user daemon-reload",
        "systemctl --user enable neonlocal.service",
        "systemctl --user start neonlocal.service",
    ]


def test_install_honours_xdg_config_home_for_unit_and_default_config(
    machine: Machine, tmp_path: Path
) -> None:
    """With XDG_CONFIG_HOME set, the unit and the default config are looked up there."""
    xdg = tmp_path / "xdg"
    config = xdg / "neonlocal" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("")

    result = machine.run("--platform", "linux", "install", env={"XDG_CONFIG_HOME": str(xdg)})

    assert result.exit_code == 0, result.output
    text = (xdg / "systemd" / "user" / "neonlocal.service").read_text()
    assert _directives(text, "ExecStart")[0].endswith(f" --config {config} up")
    assert not _unit(machine).exists()


def test_install_uses_neonlocal_config_from_the_environment(
    machine: Machine, tmp_path: Path
) -> None:
    """NEONLOCAL_CONFIG picks the config the service will use, as it does for `up`."""
    config = tmp_path / "elsewhere.toml"
    config.write_text("")

    result = machine.run("--platform", "linux", "install", env={"NEONLOCAL_CONFIG": str(config)})

    assert result.exit_code == 0, result.output
    assert _directives(_unit(machine).read_text(), "ReadWritePaths") == [f"{tmp_path} %t"]


def test_install_with_socket_enables_the_socket_and_starts_the_daemon_on_demand(
    machine: Machine,
) -> None:
    """--socket installs both units; the socket listens and the service is not started at login."""
    result = machine.run("--platform", "linux", "install", "--socket")

    assert result.exit_code == 0, result.output
    assert "ListenStream=127.0.0.1:5432" in _unit(machine, "neonlocal.socket").read_text()
    assert machine.calls() == [
        "systemctl --user daemon-reload",
        "systemctl --user disable neonlocal.service",
        "systemctl --user enable neonlocal.socket",
        "systemctl --user stop neonlocal.service",
        "systemctl --user restart neonlocal.socket",
    ]

    again = machine.run("--platform", "linux", "install", "--socket")

    assert again.exit_code == 0, again.output
    assert machine.calls()[-1] == "systemctl --user start neonlocal.socket"


def test_install_without_socket_turns_earlier_socket_activation_off(machine: Machine) -> None:
    """Installing without --socket stops and removes a socket unit from an earlier install."""
    machine.run("--platform", "linux", "install", "--socket")
    machine.calls()

    result = machine.run("--platform", "linux", "install")

    assert result.exit_code == 0, result.output
    assert not _unit(machine, "neonlocal.socket").exists()
    assert machine.calls() == [
        "systemctl --user disable --now neonlocal.socket",
        "systemctl --user daemon-reload",
        "systemctl --user enable neonlocal.service",
        "systemctl --user restart neonlocal.service",
    ]


def test_install_without_a_config_file_says_so_and_changes_nothing(machine: Machine) -> None:
    """A service that could never start is not installed."""
    missing = machine.home / "nope.toml"

    result = machine.run("--platform", "linux", "install", "--config", str(missing))

    assert result.exit_code == 1
    assert result.output == (
        f"neonlocal: config file {missing} does not exist: create it first or pass --config\n"
    )
    assert not _unit(machine).exists()
    assert machine.calls() == []


def test_the_unit_waits_for_the_configured_shutdown_deadline(machine: Machine) -> None:
    """systemd must not SIGKILL a daemon still letting sessions finish: TimeoutStopSec is
    the config's shutdown_deadline plus the grace, whatever the user set."""
    machine.run("--platform", "linux", "install")
    assert _directives(_unit(machine).read_text(), "TimeoutStopSec") == ["35"]

    machine.config.write_text('branch = "main"\nshutdown_deadline = 120\n')
    result = machine.run("--platform", "linux", "install")

    assert result.exit_code == 0, result.output
    assert _directives(_unit(machine).read_text(), "TimeoutStopSec") == ["125"]


def test_install_with_a_broken_config_says_where_and_changes_nothing(machine: Machine) -> None:
    machine.config.write_text('branch = "main"\nshutdown_deadline = "soon"\n')

    result = machine.run("--platform", "linux", "install")

    assert result.exit_code == 1
    assert result.output.startswith(f"neonlocal: {machine.config}:2: shutdown_deadline")
    assert result.output.endswith("(fix the config, then install again)\n")
    assert len(result.output.splitlines()) == 1
    assert not _unit(machine).exists()
    assert machine.calls() == []


def test_install_where_systemctl_is_missing_says_what_is_wrong(machine: Machine) -> None:
    """No systemctl on PATH: one line asking whether this is a systemd system."""
    (machine.bin_dir / "systemctl").unlink()

    result = machine.run("--platform", "linux", "install")

    assert result.exit_code == 1
    assert result.output == "neonlocal: systemctl not found: is this a systemd system?\n"


def test_a_failing_systemctl_is_reported_in_one_line(machine: Machine) -> None:
    """systemctl's own complaint reaches the user, with the command that failed."""
    machine.answer(
        "systemctl-daemon-reload",
        err="Failed to connect to bus: No medium found\n",
        rc=1,
    )

    result = machine.run("--platform", "linux", "install")

    assert result.exit_code == 1
    assert result.output == (
        "neonlocal: `systemctl --user daemon-reload` failed:"
        " Failed to connect to bus: No medium found (is a systemd user session running?)\n"
    )


def test_uninstall_stops_disables_and_removes_both_units(machine: Machine) -> None:
    """Uninstall leaves no unit behind and tells systemd; a second uninstall is a no-op."""
    machine.run("--platform", "linux", "install", "--socket")
    machine.calls()

    result = machine.run("--platform", "linux", "uninstall")

    assert result.exit_code == 0, result.output
    assert not _unit(machine).exists()
    assert not _unit(machine, "neonlocal.socket").exists()
    assert machine.calls() == [
        "systemctl --user disable --now neonlocal.socket",
        "systemctl --user disable --now neonlocal.service",
        "systemctl --user daemon-reload",
    ]

    again = machine.run("--platform", "linux", "uninstall")

    assert again.exit_code == 0
    assert "not installed" in again.output
    assert machine.calls() == []


def test_status_of_a_running_service_shows_state_since_and_pid(machine: Machine) -> None:
    """status reports what systemd knows: active (running), since when, which PID."""
    machine.run("--platform", "linux", "install")
    machine.answer(
        "systemctl-show",
        out=(
            "ActiveState=active\nSubState=running\n"
            "ActiveEnterTimestamp=Tue 2024-05-14 09:12:01 CEST\nMainPID=4242\n"
        ),
    )
    machine.calls()

    result = machine.run("--platform", "linux", "status")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "service: running [active (running)]",
        f"file: {_unit(machine)}",
        "since: Tue 2024-05-14 09:12:01 CEST",
        "pid: 4242",
        "daemon: not answering on its control socket",
    ]
    assert machine.calls() == [
        "systemctl --user show -p ActiveState,SubState,ActiveEnterTimestamp,MainPID"
        " neonlocal.service"
    ]


def test_status_of_a_failed_service_exits_non_zero(machine: Machine) -> None:
    """A failed unit is reported as stopped, with exit status 3 like systemctl status."""
    machine.run("--platform", "linux", "install")
    machine.answer(
        "systemctl-show",
        out="ActiveState=failed\nSubState=failed\nActiveEnterTimestamp=\nMainPID=0\n",
    )

    result = machine.run("--platform", "linux", "status")

    assert result.exit_code == 3
    assert result.output.splitlines()[0] == "service: stopped [failed (failed)]"
    assert "pid" not in result.output


def test_status_when_not_installed_says_so(machine: Machine) -> None:
    """Without a unit file status says how to get one and exits 3, asking systemd nothing."""
    result = machine.run("--platform", "linux", "status")

    assert result.exit_code == 3
    assert result.output == f"neonlocal service is not installed (no {_unit(machine)})\n"
    assert machine.calls() == []


def _run_logs(machine: Machine, *args: str) -> subprocess.CompletedProcess[str]:
    # `logs` replaces the process with the viewer, so it runs in a child of its own.
    code = "import sys; from neonlocal.cli.service import service; service(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **machine.env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_logs_follow_hands_over_to_journalctl_for_the_user_unit(machine: Machine) -> None:
    """`service logs -f` becomes `journalctl --user -u neonlocal -f`."""
    done = _run_logs(machine, "--platform", "linux", "logs", "-f")

    assert done.returncode == 0, done.stderr
    assert machine.calls() == ["journalctl --user -u neonlocal -n 100 -f"]


def test_logs_exit_status_is_the_viewers(machine: Machine) -> None:
    """When journalctl fails, `service logs` fails with its status."""
    machine.answer("journalctl-neonlocal", err="No journal files were found.\n", rc=1)

    done = _run_logs(machine, "--platform", "linux", "logs")

    assert done.returncode == 1
    assert done.stderr == "No journal files were found.\n"


# --- launchd ---------------------------------------------------------------------------


def test_install_on_macos_writes_a_launch_agent_and_bootstraps_it(machine: Machine) -> None:
    """The plist runs this neonlocal with real paths and logs under ~/Library/Logs."""
    machine.answer("launchctl-print", err="Could not find service\n", rc=113)

    result = machine.run("--platform", "darwin", "install")

    assert result.exit_code == 0, result.output
    content = _plist(machine).read_bytes()
    assert b"@NEONLOCAL_" not in content
    agent = plistlib.loads(content)
    assert agent["ProgramArguments"] == [*find_executable(), "--config", str(machine.config), "up"]
    log = machine.home / "Library" / "Logs" / "neonlocal" / "neonlocal.log"
    assert agent["StandardOutPath"] == agent["StandardErrorPath"] == str(log)
    assert log.parent.is_dir()
    target = f"gui/{os.getuid()}/dev.neonlocal.neonlocal"
    assert machine.calls() == [
        f"launchctl print {target}",
        f"launchctl enable {target}",
        f"launchctl bootstrap gui/{os.getuid()} {_plist(machine)}",
    ]


def test_the_launch_agent_waits_for_the_configured_shutdown_deadline(machine: Machine) -> None:
    machine.answer("launchctl-print", err="Could not find service\n", rc=113)
    machine.config.write_text('branch = "main"\nshutdown_deadline = 60.5\n')

    result = machine.run("--platform", "darwin", "install")

    assert result.exit_code == 0, result.output
    assert plistlib.loads(_plist(machine).read_bytes())["ExitTimeOut"] == 66


def test_install_on_macos_twice_keeps_the_loaded_agent(machine: Machine) -> None:
    """Re-installing an unchanged, loaded agent only makes sure it runs."""
    machine.run("--platform", "darwin", "install")
    written = _plist(machine).read_bytes()
    machine.answer("launchctl-print", out="state = running\n")
    machine.calls()

    result = machine.run("--platform", "darwin", "install")

    assert result.exit_code == 0, result.output
    assert _plist(machine).read_bytes() == written
    target = f"gui/{os.getuid()}/dev.neonlocal.neonlocal"
    assert machine.calls() == [f"launchctl print {target}", f"launchctl kickstart {target}"]


def test_install_on_macos_with_a_new_config_reloads_the_agent(
    machine: Machine, tmp_path: Path
) -> None:
    """A changed plist is booted out and bootstrapped again so launchd reads it."""
    machine.run("--platform", "darwin", "install")
    machine.answer("launchctl-print", out="state = running\n")
    other = tmp_path / "other.toml"
    other.write_text("")
    machine.calls()

    result = machine.run("--platform", "darwin", "install", "--config", str(other))

    assert result.exit_code == 0, result.output
    assert str(other) in plistlib.loads(_plist(machine).read_bytes())["ProgramArguments"]
    target = f"gui/{os.getuid()}/dev.neonlocal.neonlocal"
    assert machine.calls() == [
        f"launchctl print {target}",
        f"launchctl bootout {target}",
        f"launchctl enable {target}",
        f"launchctl bootstrap gui/{os.getuid()} {_plist(machine)}",
    ]


def test_socket_activation_on_macos_is_refused_clearly(machine: Machine) -> None:
    """--socket is a systemd feature; on macOS it is one clear error."""
    result = machine.run("--platform", "darwin", "install", "--socket")

    assert result.exit_code == 1
    assert result.output == "neonlocal: socket activation is only available with systemd (Linux)\n"
    assert not _plist(machine).exists()


def test_uninstall_on_macos_boots_out_and_removes_the_agent(machine: Machine) -> None:
    """The loaded agent is booted out and its plist removed."""
    machine.run("--platform", "darwin", "install")
    machine.answer("launchctl-print", out="state = running\n")
    machine.calls()

    result = machine.run("--platform", "darwin", "uninstall")

    assert result.exit_code == 0, result.output
    assert not _plist(machine).exists()
    target = f"gui/{os.getuid()}/dev.neonlocal.neonlocal"
    assert machine.calls() == [f"launchctl print {target}", f"launchctl bootout {target}"]


def test_status_on_macos_reads_state_and_pid_from_launchctl(machine: Machine) -> None:
    """status shows launchd's state, the PID and when that process started."""
    machine.run("--platform", "darwin", "install")
    machine.answer(
        "launchctl-print",
        out=(
            "gui/501/dev.neonlocal.neonlocal = {\n"
            "\tactive count = 1\n\tstate = running\n\n\tprogram = /x/neonlocal\n"
            "\targuments = {\n\t\tstate = decoy\n\t}\n\tpid = 777\n"
            "\tlast exit code = (never exited)\n}\n"
        ),
    )
    machine.answer("ps-lstart=", out="Tue May 14 09:12:01 2024\n")

    result = machine.run("--platform", "darwin", "status")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "service: running [running, last exit code (never exited)]",
        f"file: {_plist(machine)}",
        "since: Tue May 14 09:12:01 2024",
        "pid: 777",
        "daemon: not answering on its control socket",
    ]


def test_status_on_macos_of_an_unloaded_agent_exits_non_zero(machine: Machine) -> None:
    """An installed agent launchd does not know is reported as not loaded."""
    machine.run("--platform", "darwin", "install")
    machine.answer("launchctl-print", err="Could not find service\n", rc=113)

    result = machine.run("--platform", "darwin", "status")

    assert result.exit_code == 3
    assert result.output.splitlines()[0] == "service: stopped [not loaded]"


def test_logs_on_macos_follow_the_log_file(machine: Machine) -> None:
    """`service logs -f` tails the agent's log file."""
    log = machine.home / "Library" / "Logs" / "neonlocal" / "neonlocal.log"
    log.parent.mkdir(parents=True)
    log.write_text("")

    done = _run_logs(machine, "--platform", "darwin", "logs", "-f", "-n", "20")

    assert done.returncode == 0, done.stderr
    assert machine.calls() == [f"tail -n 20 -F {log}"]


def test_logs_on_macos_before_the_first_start_says_there_is_no_log(machine: Machine) -> None:
    """No log file yet: one line saying where it will be."""
    result = machine.run("--platform", "darwin", "logs")

    log = machine.home / "Library" / "Logs" / "neonlocal" / "neonlocal.log"
    assert result.exit_code == 1
    assert result.output == f"neonlocal: no log file yet at {log}\n"


# --- choosing the platform and the executable ------------------------------------------


def test_unsupported_platforms_are_refused_in_one_line(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Windows (or anything else) service management says what is supported."""
    monkeypatch.setattr(sys, "platform", "win32")

    result = machine.run("status")

    assert result.exit_code == 1
    assert result.output == (
        "neonlocal: neonlocal service supports Linux (systemd) and macOS (launchd), not win32\n"
    )


def test_platform_can_be_chosen_through_the_environment(machine: Machine) -> None:
    """NEONLOCAL_SERVICE_PLATFORM=darwin acts as on macOS even on Linux."""
    result = machine.run("status", env={"NEONLOCAL_SERVICE_PLATFORM": "darwin"})

    assert result.output == f"neonlocal service is not installed (no {_plist(machine)})\n"


def test_without_a_console_script_the_service_runs_the_module(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An install without a `neonlocal` script falls back to `python -m neonlocal`."""
    python = tmp_path / "bin" / "python3"
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setattr(sys, "argv", ["pytest"])
    monkeypatch.setenv("PATH", str(tmp_path))

    assert find_executable() == (str(python), "-m", "neonlocal")


def test_paths_systemd_could_misread_are_refused(machine: Machine, tmp_path: Path) -> None:
    """A config path with a quote is refused in one line rather than written half-escaped."""
    odd = tmp_path / 'say "hi"'
    odd.mkdir()
    (odd / "config.toml").write_text("")

    result = machine.run("--platform", "linux", "install", "--config", str(odd / "config.toml"))

    assert result.exit_code == 1
    assert result.output.startswith("neonlocal: cannot put path ")
    assert not _unit(machine).exists()


def test_the_status_hook_for_the_daemon_adds_its_lines(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the daemon reports through the hook is printed after the manager's view."""
    machine.run("--platform", "linux", "install")
    machine.answer("systemctl-show", out="ActiveState=active\nSubState=running\nMainPID=9\n")
    monkeypatch.setattr(service_cli, "daemon_status_lines", lambda _config, _env: ["branch: main"])

    result = machine.run("--platform", "linux", "status")

    assert result.output.splitlines()[-1] == "branch: main"


def test_an_executable_path_with_a_dollar_is_refused_for_systemd(tmp_path: Path) -> None:
    """systemd versions disagree on `$` in a command path, so it is refused, not guessed."""
    plan = service_module.InstallPlan(("/opt/$tool/neonlocal",), tmp_path / "config.toml")

    with pytest.raises(service_module.ServiceError, match="cannot put path"):
        service_module.render_systemd("ExecStart=@NEONLOCAL_EXEC@ up\n", plan)


def test_the_global_config_option_chooses_the_services_config(
    machine: Machine, tmp_path: Path
) -> None:
    """`neonlocal --config PATH service install` installs a service using PATH."""
    from neonlocal.cli import main

    config = tmp_path / "team.toml"
    config.write_text("")

    result = CliRunner().invoke(
        main,
        ["--config", str(config), "service", "--platform", "linux", "install"],
        env=machine.env,
    )

    assert result.exit_code == 0, result.output
    assert _directives(_unit(machine).read_text(), "ExecStart")[0].endswith(
        f" --config {config} up"
    )


def test_install_without_a_systemd_user_session_writes_nothing_and_says_how(
    machine: Machine,
) -> None:
    """Over ssh without lingering, or under su: no unit file is left behind half-installed."""
    (machine.home / "run" / "systemd" / "private").unlink()

    result = machine.run("--platform", "linux", "install")

    assert result.exit_code == 1
    assert "no systemd user session runs for this user" in result.output
    assert "loginctl enable-linger" in result.output
    assert not _unit(machine).exists()
    assert machine.calls() == []


def test_socket_activation_listens_where_the_config_says(machine: Machine) -> None:
    machine.config.write_text('branch = "main"\n[listen]\nhost = ["127.0.0.1"]\nport = 6543\n')

    result = machine.run("--platform", "linux", "install", "--socket")

    assert result.exit_code == 0, result.output
    text = _unit(machine, "neonlocal.socket").read_text()
    assert _directives(text, "ListenStream") == ["127.0.0.1:6543"]


def test_socket_activation_with_a_port_picked_at_start_is_refused(machine: Machine) -> None:
    machine.config.write_text('branch = "main"\n[listen]\nport = 0\n')

    result = machine.run("--platform", "linux", "install", "--socket")

    assert result.exit_code == 1
    assert "socket activation needs a fixed port" in result.output
    assert not _unit(machine, "neonlocal.socket").exists()
