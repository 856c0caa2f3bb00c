"""What a daemon serving static branch URLs keeps in memory: not the Neon API client (httpx),
not cryptography, which only making a certificate needs, not pydantic, which only checking
the config needs, and not prometheus_client, which only a metrics scrape needs (issue 5:
RSS idle).

The daemon runs as a real process (the test process has imported both) and writes the
modules it ended with on exit, so a module imported on any path it took - start, a session,
shutdown - is caught.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from cryptography import x509

from fixtures.daemon import DaemonProcess, daemon_env, neonlocal_cmd, toml_string, write_config
from fixtures.net import free_port
from fixtures.pg import TEST_PASSWORD
from neon_standin import NeonStandIn
from neonlocal.control import request
from neonlocal.localpg import LocalCompute
from neonlocal.tls.certs import CertificateAuthority
from neonlocal.tls.local import (
    LocalTlsError,
    certificate_expiry,
    ensure_generated,
    load_local_tls,
    tls_dir,
)

# Top-level imports of any of these come back as several MB of resident memory.
NOT_FOR_STATIC_URLS = (
    "cryptography",
    "httpx",
    "neonlocal.tls.certs",
    "neonlocal.neon.client",
    "neonlocal.config.schema",
    "pydantic",
    "pydantic_core",
    "pydantic_settings",
    "prometheus_client",
    # The serverless driver's side: loaded by the first HTTP request only.
    "h11",
    "wsproto",
    "neonlocal.serverless",
)

# `python -m neonlocal ...`, which writes sys.modules to $CENSUS_PATH when it exits.
_WITH_CENSUS = """
import atexit, os, runpy, sys

def _census():
    with open(os.environ["CENSUS_PATH"], "w") as out:
        # A None entry is a module blocked from loading (neonlocal.neon blocks httpx's CLI).
        out.write("\\n".join(sorted(n for n, m in sys.modules.items() if m is not None)))

atexit.register(_census)
runpy.run_module("neonlocal", run_name="__main__", alter_sys=True)
"""


def _unreachable_url() -> str:
    port = free_port("127.0.0.1")
    return (
        f"postgresql://neondb_owner:npg_secret@ep-quiet-000001.us-east-2.aws.neon.tech:{port}"
        "/neondb?hostaddr=127.0.0.1&sslmode=require"
    )


def _modules_of_a_daemon_run(
    workdir: Path,
    url: str,
    *,
    session_works: bool,
    meanwhile: Callable[[DaemonProcess], None] | None = None,
) -> list[str]:
    """Start `neonlocal up` for a static branch, run one session through it, stop it."""
    config = write_config(workdir / "config.toml", {"main": url, "other": url}, branch="main")
    return _modules_of(
        config, daemon_env(workdir), session_works=session_works, meanwhile=meanwhile
    )


def _modules_of(
    config: Path,
    env: dict[str, str],
    *,
    session_works: bool,
    meanwhile: Callable[[DaemonProcess], None] | None = None,
) -> list[str]:
    """`neonlocal up` with ``config``: one session through it, then stop; what it imported."""
    workdir = config.parent
    census = workdir / "modules.txt"
    env["CENSUS_PATH"] = str(census)
    log_path = workdir / "daemon.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WITH_CENSUS, "--config", str(config), "up"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
    daemon = DaemonProcess(proc, config, env, log_path)
    try:
        port = int(daemon.wait_ready()["listen"][0].rpartition(":")[2])
        dsn = f"host=127.0.0.1 port={port} user=neondb_owner dbname=neondb sslmode=disable"
        if session_works:
            with psycopg.connect(dsn, connect_timeout=10) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        else:
            with pytest.raises(psycopg.OperationalError, match="neonlocal"):
                psycopg.connect(dsn, connect_timeout=10)
        if meanwhile is not None:
            meanwhile(daemon)
    finally:
        assert daemon.stop() == 0, daemon.log()
    modules = census.read_text().split()
    # The census is real: the daemon's own proxy was among what it loaded.
    assert "neonlocal.proxy.server" in modules
    return modules


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def test_a_first_start_makes_the_local_certificate_without_loading_cryptography(
    workdir: Path,
) -> None:
    """The certificate is made by a short-lived helper; the daemon never holds cryptography."""
    modules = _modules_of_a_daemon_run(workdir, _unreachable_url(), session_works=False)

    assert _loaded(modules, NOT_FOR_STATIC_URLS) == []
    made = tls_dir(workdir / "config.toml")
    assert {p.name for p in made.iterdir()} == {"ca.crt", "ca.key", "server.crt", "server.key"}
    assert (made / "server.key").stat().st_mode & 0o077 == 0


def test_a_restart_with_its_certificate_keeps_it_and_loads_no_api_client(
    workdir: Path,
) -> None:
    made = tls_dir(workdir / "config.toml")
    files = [p.read_bytes() for p in ensure_generated(made)]

    modules = _modules_of_a_daemon_run(workdir, _unreachable_url(), session_works=False)

    assert _loaded(modules, NOT_FOR_STATIC_URLS) == []
    assert [p.read_bytes() for p in ensure_generated(made)] == files


@pytest.mark.pg
def test_a_session_over_tls_and_scram_to_a_branch_loads_neither(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    modules = _modules_of_a_daemon_run(workdir, branch_urls["main"], session_works=True)

    assert _loaded(modules, NOT_FOR_STATIC_URLS) == []
    assert "scramp" in modules  # the session really logged in upstream


def test_switching_and_editing_the_config_check_it_outside_the_daemon(workdir: Path) -> None:
    """`use`, an edit, and an edit that is refused: each answered, none loads the schema."""

    def edit_config(daemon: DaemonProcess) -> None:
        use = subprocess.run(
            [*neonlocal_cmd("--config", str(daemon.config_path), "use", "other")],
            capture_output=True,
            text=True,
            env=daemon.env,
            check=False,
        )
        assert use.returncode == 0, use.stderr
        assert daemon.status()["branch"] == "other"
        text = daemon.config_path.read_text()
        daemon.config_path.write_text(text.replace("port = 0", "port = 0\nmax_sessions = 7"))
        assert request(daemon.control, {"op": "reload"})["ok"]
        daemon.config_path.write_text(text.replace("port = 0", 'port = "any"'))
        refused = request(daemon.control, {"op": "reload"})
        assert not refused["ok"]
        assert "listen.port" in refused["error"]
        assert daemon.status()["branch"] == "other"

    modules = _modules_of_a_daemon_run(
        workdir, _unreachable_url(), session_works=False, meanwhile=edit_config
    )

    assert _loaded(modules, NOT_FOR_STATIC_URLS) == []


# What `neonlocal use` must not need while a daemon runs: the daemon checks the name.
NOT_FOR_USE = (
    "pydantic",
    "pydantic_core",
    "neonlocal.config.schema",
    "httpx",
    "asyncio",
    "watchfiles",
)


def _cli_modules(
    daemon: DaemonProcess, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run `neonlocal --config X ARGS` in its own process; its result and what it imported."""
    census = daemon.config_path.parent / "cli-modules.txt"
    done = subprocess.run(
        [sys.executable, "-c", _WITH_CENSUS, "--config", str(daemon.config_path), *args],
        capture_output=True,
        text=True,
        env={**daemon.env, "CENSUS_PATH": str(census)},
        check=False,
    )
    return done, census.read_text().split()


def test_use_and_status_with_a_daemon_running_leave_the_config_to_it(workdir: Path) -> None:
    """`use` asks the daemon about the name, so it starts in a fraction of the time."""
    seen: list[tuple[subprocess.CompletedProcess[str], list[str]]] = []

    def switch(daemon: DaemonProcess) -> None:
        seen.append(_cli_modules(daemon, "use", "other"))
        seen.append(_cli_modules(daemon, "use", "nope"))
        seen.append(_cli_modules(daemon, "status"))
        assert daemon.status()["branch"] == "other"

    _modules_of_a_daemon_run(workdir, _unreachable_url(), session_works=False, meanwhile=switch)

    (switched, modules), (unknown, unknown_modules), (status, status_modules) = seen
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("branch:     other\nupstream:   ep-quiet-000001.")
    assert _loaded(status_modules, NOT_FOR_USE) == []
    assert switched.returncode == 0, switched.stderr
    assert "-> other (ep-quiet-000001.us-east-2.aws.neon.tech:" in switched.stdout
    assert unknown.returncode == 1
    assert 'unknown branch "nope"; known: main, other' in unknown.stderr
    assert "neonlocal.cli" in modules  # the census is real
    assert _loaded(modules, NOT_FOR_USE) == []
    assert _loaded(unknown_modules, NOT_FOR_USE) == []


@pytest.mark.pg
def test_a_daemon_resolving_branches_through_the_neon_api_loads_no_pydantic(
    workdir: Path, compute_main: LocalCompute, ca_file: Path
) -> None:
    """The API client and its response models (msgspec) load; the config schema does not."""
    with NeonStandIn(main_host=compute_main.spec.hostname, password=TEST_PASSWORD) as api:
        config = workdir / "config.toml"
        config.write_text(
            "\n".join(
                [
                    'branch = "main"',
                    "[listen]",
                    'host = ["127.0.0.1"]',
                    "port = 0",
                    'unix_socket_dir = ""',
                    "[neon]",
                    f"project_id = {toml_string(api.project_id)}",
                    f"api_url = {toml_string(api.base_url)}",
                    f"sslrootcert = {toml_string(str(ca_file))}",
                    "[network.resolve]",
                    f"{toml_string(compute_main.spec.hostname)} = "
                    f"{toml_string(compute_main.spec.listen_addr)}",
                ]
            )
        )
        env = daemon_env(workdir)
        env.pop("NEON_API_HOST", None)
        env["NEON_API_KEY"] = api.api_key

        used: list[tuple[subprocess.CompletedProcess[str], list[str]]] = []
        modules = _modules_of(
            config,
            env,
            session_works=True,
            meanwhile=lambda daemon: used.append(_cli_modules(daemon, "use", "main")),
        )

        assert api.requests_to("list_branches")  # the branch was found through the API
    (switched, cli_modules) = used[0]
    assert switched.returncode == 0, switched.stderr
    # `use` of an API branch: the daemon asked the API; the command loaded no client.
    assert _loaded(cli_modules, NOT_FOR_USE) == []

    assert "neonlocal.neon.client" in modules
    assert _loaded(modules, ("pydantic", "pydantic_core", "neonlocal.config.schema")) == []
    # Nor httpx's command-line client, which click and pygments (both here) would bring.
    assert _loaded(modules, ("httpx._main", "pygments")) == []


@pytest.mark.parametrize("days", [1, 400, 365 * 30])  # from 2050 on: GeneralizedTime
def test_the_certificate_expiry_read_without_cryptography_is_the_real_one(days: int) -> None:
    ca = CertificateAuthority.create("expiry CA", days=365 * 40)
    pem = ca.issue(["localhost", "127.0.0.1"], days=days).cert_pem

    expiry = certificate_expiry(pem.decode())

    assert expiry == x509.load_pem_x509_certificate(pem).not_valid_after_utc
    assert expiry.tzinfo == datetime.UTC


@pytest.mark.parametrize(
    "damage",
    [
        lambda pem: "",
        lambda pem: pem.replace("-----END CERTIFICATE-----", ""),
        lambda pem: pem[:120] + pem[-26:],  # cut short in the middle
    ],
)
def test_an_unreadable_certificate_has_no_expiry(damage: Callable[[str], str]) -> None:
    pem = CertificateAuthority.create("x").issue(["localhost"]).cert_pem.decode()
    with pytest.raises(ValueError):
        certificate_expiry(damage(pem))


def test_a_local_ca_whose_key_is_not_its_own_stops_local_tls_with_one_line(
    tmp_path: Path,
) -> None:
    made = tls_dir(tmp_path / "config.toml")
    ensure_generated(made)
    (made / "ca.key").write_bytes(CertificateAuthority.create("another CA").as_keypair().key_pem)

    with pytest.raises(LocalTlsError, match="cannot set up local TLS") as caught:
        load_local_tls(tmp_path / "config.toml")

    assert "\n" not in str(caught.value)
    assert "PRIVATE KEY" not in str(caught.value)


def test_a_certificate_the_helper_cannot_write_is_one_line_saying_why(tmp_path: Path) -> None:
    made = tls_dir(tmp_path / "config.toml")
    ensure_generated(made)
    (made / "server.crt").unlink()
    (made / "server.crt").mkdir()  # in the way of the new certificate

    with pytest.raises(LocalTlsError, match="cannot set up local TLS") as caught:
        load_local_tls(tmp_path / "config.toml")

    assert "Is a directory" in str(caught.value)
    assert "\n" not in str(caught.value)
