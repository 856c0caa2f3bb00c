"""The `neonlocal` command where no daemon or database is involved: help, files, messages."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from fixtures.daemon import neonlocal_cmd
from neonlocal.cli import main

SECRET = "npg_Offline-Secret42"
COMMANDS = ("up", "use", "status", "url", "demo")


def branch_url(endpoint: str, user: str = "neondb_owner", database: str = "neondb") -> str:
    return (
        f"postgresql://{user}:{SECRET}@{endpoint}.us-east-2.aws.neon.tech/{database}"
        "?sslmode=require&channel_binding=require"
    )


def config_text(*, port: int = 5432, branch: str = "main") -> str:
    return (
        "# offline test config\n"
        f'branch = "{branch}"  # the selection\n'
        "\n"
        "[listen]\n"
        'host = ["127.0.0.1"]\n'
        f"port = {port}\n"
        "\n"
        "[branches.main]\n"
        f'url = "{branch_url("ep-main-100001")}"\n'
        "\n"
        "[branches.dev]\n"
        f'url = "{branch_url("ep-dev-200002", user="alice", database="appdb")}"\n'
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A private directory standing in for the user's home, runtime and config dirs."""
    return tmp_path


@pytest.fixture
def base_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of a user with no neonlocal variables and no running daemon."""
    for name in list(os.environ):
        if name.startswith("NEONLOCAL_"):
            monkeypatch.delenv(name)
    env = {
        "HOME": str(home / "home"),
        "XDG_CONFIG_HOME": str(home / "xdg"),
        "XDG_RUNTIME_DIR": str(home / "run"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def config(home: Path) -> Path:
    path = home / "config.toml"
    path.write_text(config_text())
    path.chmod(0o600)
    return path


def invoke(*args: str, env: Mapping[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=dict(env or {}), catch_exceptions=False)


def run_up(config: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`neonlocal --config PATH up` as its own process, for start-up failures."""
    return subprocess.run(
        neonlocal_cmd("--config", str(config), "up"),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


# --- help -----------------------------------------------------------------------------------


def test_help_lists_every_command(base_env: dict[str, str]) -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    listed = result.stdout.split("Commands:")[1]
    for command in COMMANDS:
        assert f"\n  {command} " in listed


def test_demo_has_its_own_help(base_env: dict[str, str]) -> None:
    result = invoke("demo", "--help")
    assert result.exit_code == 0
    assert "Offline demo" in result.stdout
    assert "--seconds" in result.stdout


@pytest.mark.parametrize("command", main.list_commands(click.Context(main)))
def test_every_command_accepts_config(command: str, config: Path) -> None:
    result = invoke("--config", str(config), command, "--help")
    assert result.exit_code == 0, result.output


def test_the_help_runs_as_a_module_too() -> None:
    done = subprocess.run(
        neonlocal_cmd("--help"), capture_output=True, text=True, timeout=20, check=False
    )
    assert done.returncode == 0
    assert "use" in done.stdout


# --- use without a daemon -------------------------------------------------------------------


def test_use_without_a_daemon_still_switches_the_file(
    base_env: dict[str, str], config: Path
) -> None:
    before = config.read_text()

    result = invoke("--config", str(config), "use", "dev")

    assert result.exit_code == 0, result.output
    assert "daemon is not running" in result.stdout
    assert config.read_text() == before.replace(
        'branch = "main"  # the selection', 'branch = "dev"  # the selection'
    )
    assert config.stat().st_mode & 0o777 == 0o600


def test_use_of_an_unknown_branch_changes_nothing_and_lists_the_known_ones(
    base_env: dict[str, str], config: Path
) -> None:
    before = config.read_bytes()

    result = invoke("--config", str(config), "use", "mian")

    assert result.exit_code != 0
    assert 'unknown branch "mian"' in result.stderr
    assert "known: dev, main" in result.stderr
    assert 'did you mean "main"' in result.stderr
    assert config.read_bytes() == before


def test_use_with_no_config_file_creates_nothing(base_env: dict[str, str], home: Path) -> None:
    missing = home / "nowhere" / "config.toml"
    result = invoke("--config", str(missing), "use", "dev")
    assert result.exit_code != 0
    assert "no branches are configured" in result.stderr
    assert not missing.exists()


def test_use_names_a_config_error_with_its_line(base_env: dict[str, str], config: Path) -> None:
    config.write_text(config_text().replace("port = 5432", 'port = "x"'))
    result = invoke("--config", str(config), "use", "dev")
    assert result.exit_code != 0
    assert f"{config}:6: listen.port" in result.stderr
    assert "Traceback" not in result.output


# --- status without a daemon ----------------------------------------------------------------


def test_status_without_a_daemon_says_not_running(base_env: dict[str, str], config: Path) -> None:
    result = invoke("--config", str(config), "status")
    assert result.exit_code != 0
    assert "not running" in result.stdout
    assert "main" in result.stdout


def test_status_json_without_a_daemon_is_still_json(base_env: dict[str, str], config: Path) -> None:
    result = invoke("--config", str(config), "status", "--json")
    assert result.exit_code != 0
    assert json.loads(result.stdout) == {"running": False, "branch": "main"}


# --- url ------------------------------------------------------------------------------------


def test_url_prints_the_local_address_without_a_password(
    base_env: dict[str, str], config: Path
) -> None:
    result = invoke("--config", str(config), "url")
    assert result.exit_code == 0
    assert result.stdout == "postgresql://neondb_owner@localhost:5432/neondb\n"
    assert SECRET not in result.output


def test_url_uses_the_selected_branchs_role_and_database(
    base_env: dict[str, str], config: Path
) -> None:
    config.write_text(config_text(branch="dev", port=6543))
    result = invoke("--config", str(config), "url")
    assert result.stdout == "postgresql://alice@localhost:6543/appdb\n"


def test_port_from_the_environment_overrides_the_file(
    base_env: dict[str, str], config: Path
) -> None:
    result = invoke("--config", str(config), "url", env={"NEONLOCAL_LISTEN__PORT": "6999"})
    assert result.stdout == "postgresql://neondb_owner@localhost:6999/neondb\n"


def test_a_bad_port_in_the_environment_names_the_variable(
    base_env: dict[str, str], config: Path
) -> None:
    result = invoke("--config", str(config), "url", env={"NEONLOCAL_LISTEN__PORT": "x"})
    assert result.exit_code != 0
    assert "NEONLOCAL_LISTEN__PORT" in result.stderr


# --- which file -----------------------------------------------------------------------------


def test_default_config_is_under_xdg_config_home(base_env: dict[str, str]) -> None:
    default = Path(base_env["XDG_CONFIG_HOME"]) / "neonlocal" / "config.toml"
    default.parent.mkdir(parents=True)
    default.write_text(config_text(port=7001))
    assert invoke("url").stdout == "postgresql://neondb_owner@localhost:7001/neondb\n"


def test_neonlocal_config_overrides_the_default_path(
    base_env: dict[str, str], config: Path
) -> None:
    default = Path(base_env["XDG_CONFIG_HOME"]) / "neonlocal" / "config.toml"
    default.parent.mkdir(parents=True)
    default.write_text(config_text(port=7001))
    config.write_text(config_text(port=7002))

    env = {"NEONLOCAL_CONFIG": str(config)}
    assert invoke("url", env=env).stdout == "postgresql://neondb_owner@localhost:7002/neondb\n"
    assert invoke("use", "dev", env=env).exit_code == 0
    assert 'branch = "dev"' in config.read_text()
    assert 'branch = "main"' in default.read_text()


def test_config_option_beats_neonlocal_config(base_env: dict[str, str], config: Path) -> None:
    other = config.with_name("other.toml")
    other.write_text(config_text(port=7003))
    result = invoke("--config", str(other), "url", env={"NEONLOCAL_CONFIG": str(config)})
    assert result.stdout == "postgresql://neondb_owner@localhost:7003/neondb\n"


# --- up: start-up failures are one line -----------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program is already listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_up_on_a_busy_port_says_which_address_and_how_to_fix_it(
    base_env: dict[str, str], config: Path, busy_port: int
) -> None:
    config.write_text(config_text(port=busy_port))
    line = assert_one_line_error(run_up(config, base_env))
    assert f"127.0.0.1:{busy_port}" in line
    assert "[listen] port" in line


@pytest.mark.parametrize(
    ("broken", "line_no", "problem"),
    [
        ('branch = "main  # the selection', 2, "invalid TOML"),
        ('branch = "nope"  # the selection', 2, 'unknown branch "nope"'),
        ("port = 5432", 6, "listen.port"),
    ],
    ids=["bad-toml", "unknown-branch", "wrong-type"],
)
def test_up_with_a_broken_config_names_file_and_line(
    base_env: dict[str, str], config: Path, broken: str, line_no: int, problem: str
) -> None:
    text = config_text()
    if broken.startswith("port"):
        text = text.replace(broken, 'port = "x"')
    else:
        text = text.replace('branch = "main"  # the selection', broken)
    config.write_text(text)
    line = assert_one_line_error(run_up(config, base_env))
    assert line.startswith(f"neonlocal: {config}:{line_no}: ")
    assert problem in line
    assert SECRET not in line


def test_up_without_a_config_file_says_where_it_looked(
    base_env: dict[str, str], home: Path
) -> None:
    missing = home / "missing.toml"
    line = assert_one_line_error(run_up(missing, base_env))
    assert str(missing) in line
    assert "no such file" in line


def test_url_serverless_prints_the_driver_setup_for_this_port(
    base_env: dict[str, str], config: Path
) -> None:
    config.write_text(config_text(branch="dev", port=6543))
    result = invoke("--config", str(config), "url", "--serverless")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert "neonConfig.fetchEndpoint = 'http://localhost:6543/sql';" in lines
    assert "neonConfig.wsProxy = () => 'localhost:6543/v2';" in lines
    assert "neonConfig.useSecureWebSocket = false;" in lines
    assert any("DATABASE_URL=postgresql://alice:x@localhost:6543/appdb" in line for line in lines)
    assert SECRET not in result.output


def test_url_serverless_asks_for_the_roles_own_password_when_the_branch_url_has_none(
    base_env: dict[str, str], config: Path
) -> None:
    text = config_text(branch="dev", port=6543)
    with_password = branch_url("ep-dev-200002", user="alice", database="appdb")
    without = with_password.replace(f":{SECRET}@", "@")
    assert without != with_password
    config.write_text(text.replace(with_password, without))
    result = invoke("--config", str(config), "url", "--serverless")
    assert result.exit_code == 0
    (line,) = [line for line in result.stdout.splitlines() if "DATABASE_URL=" in line]
    assert "postgresql://alice:PASSWORD@localhost:6543/appdb" in line
    assert "the role's own password" in line
