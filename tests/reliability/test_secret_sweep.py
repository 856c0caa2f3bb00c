"""Every error path of a real `neonlocal up --log-level debug`; not one secret in what anyone sees.

The daemon holds: branch passwords (in URLs and from the Neon API), a local password, and a
Neon API key read from ``[neon] api_key_file``. The sweep drives good and failing sessions,
local TLS and password failures, upstream TLS and password failures, and Neon API failures
(401, 404, 500 with a message echoing the key), through real clients and the real CLI; then
it searches the daemon's log, the CLI's output (``use``, ``status``, ``status --json``) and
every client error for each secret. Files that hold secrets must be private when neonlocal
creates them, and a key file others can read is refused with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import stat
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from fixtures import rawpg
from fixtures.daemon import (
    DaemonProcess,
    daemon_env,
    neonlocal_cmd,
    running_daemon,
    start_daemon_process,
    toml_string,
    write_config,
)
from fixtures.pg import TEST_PASSWORD
from neon_standin import NeonStandIn
from neonlocal.localpg import LocalCompute
from neonlocal.tls.certs import CertificateAuthority
from reliability.conftest import Figures
from reliability.measure import process_env

pytestmark = [pytest.mark.reliability, pytest.mark.pg]

LOCAL_SECRET = "L0cal-Sweep-S3cret"
URL_SECRET = "Url-Sweep-S3cret"
STALE_SECRET = "Stale-Sweep-S3cret"
API_KEY = "napi_sweep-secret-key-7d1e4b"


def with_password(url: str, password: str) -> str:
    return url.replace(
        f":{urllib.parse.quote(TEST_PASSWORD, safe='')}@",
        f":{urllib.parse.quote(password, safe='')}@",
    )


@dataclass
class Sweep:
    """The running daemon, the places to search, and what was seen there."""

    up: DaemonProcess
    standin: NeonStandIn
    port: int
    seen: list[tuple[str, str]] = field(default_factory=list)
    paths: int = 0

    @property
    def secrets(self) -> tuple[str, ...]:
        return (LOCAL_SECRET, URL_SECRET, STALE_SECRET, API_KEY, TEST_PASSWORD)

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = await asyncio.to_thread(
            subprocess.run,
            neonlocal_cmd("--config", str(self.up.config_path), *args),
            env=self.up.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.seen.append((f"neonlocal {' '.join(args)}", done.stdout + done.stderr))
        return done

    async def client_error(self, label: str, password: str = LOCAL_SECRET) -> asyncpg.PostgresError:
        dsn = f"postgresql://neondb_owner@127.0.0.1:{self.port}/neondb?sslmode=disable"
        with pytest.raises(asyncpg.PostgresError) as caught:
            await asyncpg.connect(dsn, password=password)
        error = caught.value
        self.seen.append(
            (
                f"client error: {label}",
                f"{error!s} {error!r} {json.dumps(error.as_dict(), default=str)}",
            )
        )
        self.paths += 1
        return error

    async def served(self) -> str:
        dsn = f"postgresql://neondb_owner@127.0.0.1:{self.port}/neondb?sslmode=disable"
        conn = await asyncpg.connect(dsn, password=LOCAL_SECRET)
        try:
            return str(await conn.fetchval("SELECT name FROM branch_info"))
        finally:
            await conn.close()


@pytest.fixture
def standin(compute_main: LocalCompute, compute_dev: LocalCompute) -> Iterator[NeonStandIn]:
    with NeonStandIn(API_KEY, main_host=compute_main.spec.hostname, password=TEST_PASSWORD) as api:
        api.add_branch("dev", host=compute_dev.spec.hostname)
        yield api


def sweep_config(
    workdir: Path,
    computes: dict[str, LocalCompute],
    ca_file: Path,
    standin: NeonStandIn,
    branch: str = "main",
) -> Path:
    key_file = workdir / "neon.key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    other_ca = workdir / "other-ca.crt"
    other_ca.write_bytes(CertificateAuthority.create("not the branch's CA").cert_pem)
    main_url = computes["main"].url(ca_file=ca_file)
    resolve = "\n".join(
        f"{toml_string(c.spec.hostname)} = {toml_string(c.spec.listen_addr)}"
        for c in computes.values()
    )
    extra = f"""unix_socket_dir = ""

[local]
password = {toml_string(LOCAL_SECRET)}

[upstream]
connect_timeout = 2

[neon]
project_id = {toml_string(standin.project_id)}
api_url = {toml_string(standin.base_url)}
api_key_file = "neon.key"
sslrootcert = {toml_string(str(ca_file))}

[network.resolve]
{resolve}
"""
    return write_config(
        workdir / "config.toml",
        {
            "main": main_url,
            "stale": with_password(main_url, URL_SECRET),
            "mitm": with_password(computes["main"].url(ca_file=other_ca), URL_SECRET),
        },
        branch=branch,
        extra=extra,
    )


@pytest.fixture
def sweep(
    workdir: Path,
    computes: dict[str, LocalCompute],
    ca_file: Path,
    standin: NeonStandIn,
) -> Iterator[Sweep]:
    config = sweep_config(workdir, computes, ca_file, standin)
    env = process_env(workdir)
    for name in ("NEON_API_KEY", "NEON_API_HOST"):
        env.pop(name, None)
    up = start_daemon_process(config, env, log_level="debug")
    try:
        status = up.wait_ready()
        yield Sweep(up, standin, int(status["listen"][0].rsplit(":", 1)[1]))
    finally:
        up.stop()


async def test_no_secret_in_logs_cli_output_status_or_client_errors(
    sweep: Sweep, figures: Figures
) -> None:
    assert await sweep.served() == "main"
    await sweep.client_error("wrong local password", password=URL_SECRET)
    # A local TLS handshake that fails: SSLRequest accepted, then garbage.
    assert await asyncio.to_thread(broken_local_tls, sweep.port) == b"S"
    sweep.paths += 1

    assert (await sweep.cli("use", "mitm")).returncode == 0
    error = await sweep.client_error("upstream certificate from another CA")
    assert "certificate verify failed" in str(error)
    assert (await sweep.cli("use", "stale")).returncode == 0
    assert (await sweep.client_error("upstream refuses the URL's password")).sqlstate == "28P01"

    # Through the Neon API: the compute refuses the password the API gave; the refresh
    # then fails with an API error whose text echoes the key (a careless server).
    sweep.standin.set_password("dev", "neondb_owner", STALE_SECRET)
    assert (await sweep.cli("use", "dev")).returncode == 0
    sweep.standin.inject("*", 500, times=None, message=f"internal error for Bearer {API_KEY}")
    await sweep.client_error("API 500 during a password refresh")
    sweep.standin.clear_faults()
    assert (await sweep.cli("use", "no-such-branch")).returncode != 0
    sweep.paths += 1
    sweep.standin.api_key = "napi_rotated-elsewhere"  # our key is now refused: 401
    assert (await sweep.cli("use", "another-branch")).returncode != 0
    await sweep.client_error("API 401 during a password refresh")
    sweep.paths += 1

    assert (await sweep.cli("use", "main")).returncode == 0
    assert await sweep.served() == "main"
    status_text = await sweep.cli("status")
    assert "last error:" in status_text.stdout
    await sweep.cli("status", "--json")
    await asyncio.to_thread(sweep.up.stop)
    log = sweep.up.log()
    assert "session_closed" in log
    sweep.seen.append(("daemon debug log", log))

    for where, text in sweep.seen:
        for secret in sweep.secrets:
            assert secret not in text, f"{where} shows a secret: {text}"
    figures.record(error_paths=sweep.paths, places_searched=len(sweep.seen), leaks=0)


def broken_local_tls(port: int) -> bytes:
    """SSLRequest, then garbage where the TLS ClientHello belongs; returns the daemon's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=rawpg.READ_TIMEOUT_S) as sock:
        sock.sendall(rawpg.ssl_request())
        answer = sock.recv(1)
        sock.sendall(b"\x16\x03\x01\x00\x05garbage")
        with contextlib.suppress(ConnectionError):
            while sock.recv(65536):
                pass
    return answer


# --- files that hold secrets --------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_config_created_by_use_is_private(
    workdir: Path, compute_main: LocalCompute, ca_file: Path
) -> None:
    """`neonlocal use` creating the config (later holding passwords): 0600, in a 0700 directory."""
    config = workdir / "fresh" / "neonlocal" / "config.toml"
    env = process_env(workdir)
    env["NEONLOCAL_BRANCHES__MAIN__URL"] = compute_main.url(ca_file=ca_file)
    done = subprocess.run(
        neonlocal_cmd("--config", str(config), "use", "main"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert TEST_PASSWORD not in done.stdout + done.stderr
    assert mode(config) == 0o600
    assert mode(config.parent) == 0o700


async def test_generated_local_tls_keys_are_private(
    workdir: Path, compute_main: LocalCompute, ca_file: Path
) -> None:
    config = write_config(
        workdir / "config.toml", {"main": compute_main.url(ca_file=ca_file)}, branch="main"
    )
    async with running_daemon(config, daemon_env(workdir)):
        pass
    tls = workdir / "tls"
    keys = sorted(tls.glob("*.key"))
    assert [k.name for k in keys] == ["ca.key", "server.key"]
    assert mode(tls) == 0o700
    for key in keys:
        assert mode(key) == 0o600, key


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o644])
async def test_an_api_key_file_others_can_read_is_refused_with_the_reason(
    workdir: Path,
    computes: dict[str, LocalCompute],
    ca_file: Path,
    standin: NeonStandIn,
    loose: int,
) -> None:
    """By `neonlocal up` when its branch needs the API, and by `neonlocal use` of such a branch."""
    config = sweep_config(workdir, computes, ca_file, standin, branch="dev")
    (workdir / "neon.key").chmod(loose)
    env = process_env(workdir)
    for name in ("NEON_API_KEY", "NEON_API_HOST"):
        env.pop(name, None)
    up = start_daemon_process(config, env, log_level="debug")
    try:
        returncode = await asyncio.to_thread(up.proc.wait, 60)
    finally:
        up.stop()
    use = await asyncio.to_thread(
        subprocess.run,
        neonlocal_cmd("--config", str(config), "use", "dev"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert returncode != 0
    assert use.returncode != 0
    for output in (up.log(), use.stdout + use.stderr):
        assert f"accessible by other users (mode {loose:04o})" in output
        assert "chmod 600" in output
        assert API_KEY not in output
    assert standin.requests == []
