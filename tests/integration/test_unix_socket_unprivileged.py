"""`psql -d neondb` as a normal user: the daemon runs as "nobody", as a developer's would.

On Debian libpq looks in /var/run/postgresql, which only the postgres user may write to, so a
normal user's daemon puts its socket elsewhere; it must say where and how to reach it, and
the OS user's own name (libpq's default role) must still reach the branch.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import neonlocal
from fixtures.daemon import toml_string
from neonlocal.control import DaemonNotRunning, request
from neonlocal.localpg import LocalCompute
from neonlocal.paths import control_socket_path

pytestmark = [
    pytest.mark.pg,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a daemon as another user"),
]

USER = "nobody"
LIBPQ_DIR = Path("/var/run/postgresql")


def as_user(*argv: str) -> list[str]:
    return ["runuser", "-u", USER, "--", *argv]


def neonlocal_as_user(*args: str) -> list[str]:
    """`neonlocal ...` run by the user. This interpreter may live where only root can reach
    (pyenv under /root), so the system's Python of the same version runs this checkout with
    the virtualenv's packages instead, as the user's own installation would."""
    system = Path("/usr/bin/python3")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = subprocess.run(
        [str(system), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if found.stdout.strip() != version:
        pytest.skip(f"no Python {version} that {USER} may run")
    for needed in user_path().split(os.pathsep):
        if subprocess.run(as_user("test", "-x", needed), check=False).returncode != 0:
            pytest.skip(f"{USER} cannot reach {needed} (a checkout in a private directory)")
    return as_user(str(system), "-m", "neonlocal", *args)


def user_path() -> str:
    """The checkout's sources and the virtualenv's packages, for the system's Python."""
    source = Path(neonlocal.__file__).resolve().parents[1]
    return os.pathsep.join((str(source), sysconfig.get_paths()["purelib"]))


@pytest.fixture
def home() -> Iterator[Path]:
    """A home for the user: its config, its local TLS, its runtime directory."""
    path = Path(tempfile.mkdtemp(prefix="neonlocal-test-nobody-"))
    entry = pwd.getpwnam(USER)
    (path / "run").mkdir()
    for directory in (path, path / "run"):
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        directory.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "NEONLOCAL_"))}
    env.update({"HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"), "USER": USER})
    env["PYTHONPATH"] = user_path()
    return env


def wait_for_status(control: Path, proc: subprocess.Popen[str]) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            return request(control, {"op": "status"}, timeout=2.0)
        except (DaemonNotRunning, OSError, ValueError):
            time.sleep(0.1)
    raise TimeoutError("the daemon did not answer")


def test_a_normal_users_daemon_says_where_its_socket_is_and_psql_reaches_it(
    home: Path, compute_main: LocalCompute, ca_file: Path
) -> None:
    writable = subprocess.run(as_user("test", "-w", str(LIBPQ_DIR)), check=False).returncode == 0
    if writable or not LIBPQ_DIR.is_dir():
        pytest.skip(f"{LIBPQ_DIR} is not the root-only directory of a Debian-built libpq")
    config = home / "config.toml"
    config.write_text(
        'branch = "main"\n[listen]\nhost = ["127.0.0.1"]\nport = 0\nunix_socket_dir = "auto"\n'
        f"[branches.main]\nurl = {toml_string(compute_main.url(ca_file=ca_file))}\n"
    )
    entry = pwd.getpwnam(USER)
    os.chown(config, entry.pw_uid, entry.pw_gid)
    config.chmod(0o600)
    env = user_env(home)
    proc = subprocess.Popen(
        neonlocal_as_user("--config", str(config), "up"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        status = wait_for_status(control_socket_path(config, env), proc)
        socket_file = Path(str(status["unix_socket"]))
        hint = str(status["unix_socket_hint"])
        human = subprocess.run(
            neonlocal_as_user("--config", str(config), "status"),
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        psql = subprocess.run(
            as_user(
                "psql", "-X", "-qAt", "-h", str(socket_file.parent),
                "-p", socket_file.name.rpartition(".")[2], "-d", "neondb",
                "-c", "SELECT current_user || ' on ' || name FROM branch_info",
            ),
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert socket_file.parent != LIBPQ_DIR
    assert f"PGHOST={socket_file.parent}" in hint
    assert f"libpq looks in {LIBPQ_DIR}" in hint
    assert re.search(rf"socket:\s+{re.escape(str(socket_file))} \(libpq looks in", human.stdout)
    assert "unix_socket_not_where_libpq_looks" in log
    # libpq's default role here is "nobody", which the branch does not have: over the
    # owner-only socket the daemon knows it is only a default and logs in as the URL's role.
    assert (psql.returncode, psql.stdout.strip()) == (0, "neondb_owner on main"), psql.stderr
    assert json.dumps(status)  # the status is plain data
