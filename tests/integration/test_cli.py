"""The `neonlocal` command against a real `neonlocal up` process and real branches."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from fixtures.daemon import DaemonProcess, daemon_env, neonlocal_cmd, start_daemon_process
from fixtures.pg import TEST_PASSWORD, MakeCompute

pytestmark = pytest.mark.pg

DEV_HOST = "ep-dev-200002.us-east-2.aws.neon.tech:5432"


def config_text(branch_urls: dict[str, str], *, port: int = 0) -> str:
    """A hand-written config: comments, odd spacing and key order a rewrite must keep."""
    return (
        "# my neonlocal setup\n"
        "\n"
        'branch   =   "main"   # switched by `neonlocal use`\n'
        "log_level='debug'\n"
        "\n"
        "[listen]\n"
        '  host = [ "127.0.0.1" ]   # IPv4 only here\n'
        f"  port={port}\n"
        "\n"
        "# the two branches\n"
        '[branches."main"]\n'
        f"url = {json.dumps(branch_urls['main'])}\n"
        "\n"
        "[branches.dev]   # the dev branch\n"
        f"url = {json.dumps(branch_urls['dev'])}\n"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Cli:
    """Runs `neonlocal --config PATH ...` as a user would, in its own process."""

    config: Path
    env: dict[str, str]

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            neonlocal_cmd("--config", str(self.config), *args),
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def status(self) -> dict[str, object]:
        done = self.run("status", "--json")
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert isinstance(reply, dict)
        return reply


@pytest.fixture
def config(workdir: Path, branch_urls: dict[str, str]) -> Path:
    path = workdir / "config.toml"
    path.write_text(config_text(branch_urls))
    path.chmod(0o640)
    return path


@pytest.fixture
def cli(workdir: Path, config: Path) -> Cli:
    return Cli(config, daemon_env(workdir))


@pytest.fixture
def up(cli: Cli) -> Iterator[DaemonProcess]:
    """`neonlocal --config PATH up` running, serving "main"."""
    proc = start_daemon_process(cli.config, cli.env)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
        print(proc.log())  # shown by pytest when the test fails


@contextlib.contextmanager
def serving_text(workdir: Path, text: str) -> Iterator[tuple[Cli, DaemonProcess, Path]]:
    """`neonlocal up` on a config file holding ``text``, ready; stopped afterwards."""
    config = workdir / "config.toml"
    config.write_text(text)
    cli = Cli(config, daemon_env(workdir))
    proc = start_daemon_process(config, cli.env)
    try:
        proc.wait_ready()
        yield cli, proc, config
    finally:
        proc.stop()


def port_of(proc: DaemonProcess) -> int:
    listen = proc.status()["listen"]
    assert isinstance(listen, list)
    return int(listen[0].rpartition(":")[2])


def local_url(port: int) -> str:
    return f"postgresql://neondb_owner@127.0.0.1:{port}/neondb"


def branch_of(conn: psycopg.Connection[tuple[str]]) -> str:
    row = conn.execute("SELECT name FROM branch_info").fetchone()
    assert row is not None
    return row[0]


def test_use_switches_new_sessions_and_rewrites_only_the_branch_line(
    up: DaemonProcess, cli: Cli
) -> None:
    port = port_of(up)
    before = cli.config.read_text()
    with psycopg.connect(local_url(port)) as old:
        assert branch_of(old) == "main"

        done = cli.run("use", "dev", "--keep")

        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            f"localhost:{port} -> dev ({DEV_HOST}); 1 session on main stays there (--keep)"
        ]
        after = cli.config.read_text()
        changed = [
            (a, b)
            for a, b in zip(before.splitlines(True), after.splitlines(True), strict=True)
            if a != b
        ]
        assert changed == [
            (
                'branch   =   "main"   # switched by `neonlocal use`\n',
                'branch   =   "dev"   # switched by `neonlocal use`\n',
            )
        ]
        assert cli.config.stat().st_mode & 0o777 == 0o640
        with psycopg.connect(local_url(port)) as new:
            assert branch_of(new) == "dev"
            assert new.info.parameter_status("neonlocal.branch") == "dev"
        assert branch_of(old) == "main"


def test_use_of_an_unknown_branch_changes_nothing_and_lists_the_known_ones(
    up: DaemonProcess, cli: Cli
) -> None:
    before = cli.config.read_bytes()

    done = cli.run("use", "nope")

    assert done.returncode != 0
    assert "nope" in done.stderr
    assert "known: dev, main" in done.stderr
    assert done.stdout == ""
    assert cli.config.read_bytes() == before
    assert cli.status()["branch"] == "main"
    with psycopg.connect(local_url(port_of(up))) as conn:
        assert branch_of(conn) == "main"


def test_use_after_a_broken_edit_names_the_problem_and_switches_nothing(
    up: DaemonProcess, cli: Cli
) -> None:
    """The daemon still serves the last good file; `use` judges the file as it is now."""
    text = cli.config.read_text().replace("log_level='debug'", "log_level='loud'")
    cli.config.write_text(text)

    done = cli.run("use", "dev")

    assert done.returncode == 2
    assert re.search(r"config\.toml:4: log_level: Input should be 'debug'", done.stderr)
    assert cli.config.read_text() == text
    with psycopg.connect(local_url(port_of(up))) as conn:
        assert branch_of(conn) == "main"


def test_use_and_status_find_a_control_socket_the_file_names(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    config = workdir / "config.toml"
    config.write_text(config_text(branch_urls) + '\n[control]\nsocket = "ctl.sock"\n')
    cli = Cli(config, daemon_env(workdir))
    proc = start_daemon_process(config, cli.env)
    try:
        deadline = time.monotonic() + 20
        while cli.run("status").returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (workdir / "ctl.sock").is_socket()

        switched = cli.run("use", "dev")

        assert switched.returncode == 0, switched.stderr
        assert f"-> dev ({DEV_HOST})" in switched.stdout
        assert cli.run("status").stdout.startswith("branch:     dev\n")
    finally:
        proc.stop()


def test_status_counts_open_sessions_per_branch_in_json_and_in_words(
    up: DaemonProcess, cli: Cli
) -> None:
    port = port_of(up)
    with psycopg.connect(local_url(port)) as on_main:
        assert cli.run("use", "dev", "--keep").returncode == 0
        with psycopg.connect(local_url(port)) as on_dev:
            assert (branch_of(on_main), branch_of(on_dev)) == ("main", "dev")

            status = cli.status()
            human = cli.run("status")

    assert status["branch"] == "dev"
    assert status["listen"][0] == f"127.0.0.1:{port}"
    assert status["upstream_host"] == DEV_HOST
    assert status["sessions"] == {"main": 1, "dev": 1}
    assert "last_error" in status
    assert status["last_error"] is None
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert re.fullmatch(r"branch:\s+dev", lines[0])
    assert any(re.fullmatch(rf"upstream:\s+{re.escape(DEV_HOST)}", line) for line in lines)
    assert any(re.fullmatch(r"sessions:\s+dev: 1, main: 1", line) for line in lines)
    assert "{" not in human.stdout


def test_status_reports_the_last_error_naming_the_branch(up: DaemonProcess, cli: Cli) -> None:
    """A branch nobody answers for leaves its reason in `status --json` and `status`."""
    nobody = free_port()
    with cli.config.open("a") as handle:
        handle.write(
            "\n[branches.down]\n"
            f'url = "postgresql://neondb_owner:pw@ep-down-400004.us-east-2.aws.neon.tech:{nobody}'
            '/neondb?hostaddr=127.0.0.1"\n'
        )
    assert cli.run("use", "down").returncode == 0
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(local_url(port_of(up)), connect_timeout=10)

    status = cli.status()

    assert isinstance(status["last_error"], str)
    assert '"down"' in status["last_error"]
    assert "ep-down-400004" in status["last_error"]
    assert "pw@" not in status["last_error"]
    human = cli.run("status").stdout
    assert any(line.startswith("last error:") and '"down"' in line for line in human.splitlines())


def test_url_prints_a_working_local_url_without_the_password(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    port = free_port()
    with serving_text(workdir, config_text(branch_urls, port=port)) as (cli, _proc, _config):
        done = cli.run("url")

        assert done.returncode == 0, done.stderr
        url = done.stdout.strip()
        assert url == f"postgresql://neondb_owner@localhost:{port}/neondb"
        assert TEST_PASSWORD not in done.stdout + done.stderr
        with psycopg.connect(url) as conn:
            assert branch_of(conn) == "main"


def test_url_with_a_port_picked_at_start_asks_the_daemon_which_it_got(
    up: DaemonProcess, cli: Cli
) -> None:
    done = cli.run("url")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"postgresql://neondb_owner@localhost:{port_of(up)}/neondb"
    with psycopg.connect(done.stdout.strip()) as conn:
        assert branch_of(conn) == "main"


def test_url_with_a_port_picked_at_start_and_no_daemon_says_so(cli: Cli) -> None:
    done = cli.run("url")

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("neonlocal: [listen] port = 0: the port is picked when")


def test_port_from_the_environment_overrides_the_file(
    workdir: Path, config: Path, cli: Cli
) -> None:
    """NEONLOCAL_LISTEN__PORT moves the daemon, and `use` and `url` report that port."""
    port = free_port()
    env = {**cli.env, "NEONLOCAL_LISTEN__PORT": str(port)}
    proc = start_daemon_process(config, env)
    try:
        assert proc.wait_ready()["listen"][0] == f"127.0.0.1:{port}"
        switched = cli.run("use", "dev", env=env)
        assert switched.stdout.splitlines() == [f"localhost:{port} -> dev ({DEV_HOST})"]
        assert cli.run("url", env=env).stdout.strip().endswith(f"@localhost:{port}/neondb")
        with psycopg.connect(local_url(port)) as conn:
            assert branch_of(conn) == "dev"
    finally:
        proc.stop()


def test_a_switch_made_while_the_daemon_is_down_is_served_at_the_next_start(cli: Cli) -> None:
    stopped = cli.run("status")
    assert stopped.returncode != 0
    assert "not running" in stopped.stdout

    done = cli.run("use", "dev")

    assert done.returncode == 0, done.stderr
    assert "not running" in done.stdout
    assert 'branch   =   "dev"' in cli.config.read_text()
    proc = start_daemon_process(cli.config, cli.env)
    try:
        assert proc.wait_ready()["branch"] == "dev"
        with psycopg.connect(local_url(port_of(proc))) as conn:
            assert branch_of(conn) == "dev"
    finally:
        proc.stop()


def test_config_from_the_environment_variable_is_used_by_up_and_by_use(
    workdir: Path, config: Path, cli: Cli
) -> None:
    """NEONLOCAL_CONFIG replaces the default path for every command."""
    env = {**cli.env, "NEONLOCAL_CONFIG": str(config), "XDG_CONFIG_HOME": str(workdir / "none")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            neonlocal_cmd(*args), env=env, capture_output=True, text=True, timeout=30, check=False
        )

    proc = subprocess.Popen(
        neonlocal_cmd("up"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    running = DaemonProcess(proc, config, env, workdir / "no.log")
    try:
        running.wait_ready()
        done = run("use", "dev")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"localhost:{port_of(running)} -> dev")
        assert json.loads(run("status", "--json").stdout)["branch"] == "dev"
    finally:
        running.stop()


def test_up_while_a_daemon_serves_the_config_says_so(up: DaemonProcess, cli: Cli) -> None:
    """Not "address already in use (a local PostgreSQL?)": the daemon itself answers."""
    done = cli.run("up")

    assert done.returncode == 1
    assert done.stderr.startswith(f"neonlocal is already running (pid {up.proc.pid}")
    assert f"serving main on 127.0.0.1:{port_of(up)}" in done.stderr
    assert up.proc.poll() is None


def test_a_listen_change_waits_for_a_restart_and_says_so(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """status warns "restart needed", and url prints the port actually served."""
    port, other = free_port(), free_port()
    with serving_text(workdir, config_text(branch_urls, port=port)) as (cli, _proc, config):
        config.write_text(config_text(branch_urls, port=other))
        assert cli.run("use", "main").returncode == 0  # confirms the daemon reloaded

        status = cli.status()
        human = cli.run("status").stdout
        url = cli.run("url").stdout.strip()
    warning = f"restart needed: [listen] port {port} -> {other}"
    assert warning in status["warnings"]  # type: ignore[operator]
    assert f"warning:    {warning}" in human
    assert url == f"postgresql://neondb_owner@localhost:{port}/neondb"


def test_url_with_password_checked_over_tls_prints_a_url_that_needs_none(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """With [local] tls_auth = "password", libpq's default (TLS) would ask for a password."""
    text = config_text(branch_urls) + '\n[local]\ntls_auth = "password"\n'
    with serving_text(workdir, text) as (cli, _proc, _config):
        done = cli.run("url")
        assert done.returncode == 0, done.stderr
        url = done.stdout.strip()
        assert url.endswith("/neondb?sslmode=disable")
        assert "tls_auth" in done.stderr
        with psycopg.connect(url) as conn:
            assert branch_of(conn) == "main"


def test_the_last_error_has_a_time_and_clears_once_its_branch_serves_again(
    workdir: Path, make_compute: MakeCompute, ca_file: Path
) -> None:
    """An old failure must not look current: it goes once that branch works again."""
    flaky = make_compute("flaky")
    text = (
        f'branch = "flaky"\n[listen]\nhost = ["127.0.0.1"]\nport = 0\n'
        f"[branches.flaky]\nurl = {json.dumps(flaky.url(ca_file=ca_file))}\n"
    )
    with serving_text(workdir, text) as (cli, proc, _config):
        flaky.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(local_url(port_of(proc)), connect_timeout=10)
        failed = cli.status()
        human = cli.run("status").stdout
        flaky.start()
        with psycopg.connect(local_url(port_of(proc))) as conn:
            assert branch_of(conn) == "flaky"
        cleared = cli.status()
    assert '"flaky"' in str(failed["last_error"])
    stamp = str(failed["last_error_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", stamp)
    assert f"(at {stamp})" in human
    assert cleared["last_error"] is None


def test_use_with_parent_but_without_create_is_refused_while_a_daemon_runs(
    up: DaemonProcess, cli: Cli
) -> None:
    done = cli.run("use", "dev", "--parent", "main")

    assert done.returncode == 2
    assert "--parent and --expires-in only go with --create" in done.stderr
    assert cli.status()["branch"] == "main"
