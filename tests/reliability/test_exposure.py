"""The daemon listens on loopback only, unless told otherwise twice: a setting and a local password.

Binding a non-loopback address is the one way a laptop's database credentials could be used
from another machine, so it needs ``[listen] allow_non_loopback = true`` and a ``[local]
password``, and the daemon says in its log that it is exposed. (Only loopback is ever
connected to here; the wildcard address is bound for a moment on a port the OS picks.)
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import asyncpg
import pytest
import structlog

from fixtures.daemon import daemon_env, running_daemon, toml_string
from neonlocal.config.values import ListenSettings
from neonlocal.errors import StartupError
from neonlocal.localpg import LocalCompute

pytestmark = [pytest.mark.reliability, pytest.mark.pg]

LOCAL_SECRET = "Expose-L0cal-S3cret"
EVERYWHERE = "0.0.0.0"  # noqa: S104 - the exposure under test


def config_file(path: Path, url: str, listen: str = "", local: str = "") -> Path:
    text = f"""branch = "main"

[listen]
port = 0
unix_socket_dir = ""
{listen}

[local]
{local}

[branches.main]
url = {toml_string(url)}
"""
    path.write_text(text)
    path.chmod(0o600)
    return path


def tcp_hosts(listening: list[str]) -> list[str]:
    hosts = []
    for address in listening:
        if address.startswith("/"):
            continue  # the Unix socket
        host = address.rsplit(":", 1)[0].strip("[]")
        hosts.append(host)
    return hosts


async def test_by_default_every_listening_address_is_loopback(
    workdir: Path, compute_main: LocalCompute, ca_file: Path
) -> None:
    assert all(ipaddress.ip_address(h).is_loopback for h in ListenSettings().host)
    config = config_file(workdir / "config.toml", compute_main.url(ca_file=ca_file))
    async with running_daemon(config, daemon_env(workdir)) as daemon:
        assert daemon.daemon.server is not None
        hosts = tcp_hosts(daemon.daemon.server.listening)
    assert hosts
    assert all(ipaddress.ip_address(h).is_loopback for h in hosts), hosts


@pytest.mark.parametrize(
    ("listen", "local", "refusal"),
    [
        (f'host = ["{EVERYWHERE}"]', "", "allow_non_loopback = true"),
        (
            f'host = ["127.0.0.1", "{EVERYWHERE}"]',
            f"password = {toml_string(LOCAL_SECRET)}",
            "allow_non_loopback",
        ),
        (f'host = ["{EVERYWHERE}"]\nallow_non_loopback = true', "", "password"),
    ],
    ids=["neither", "password only", "setting only"],
)
async def test_a_non_loopback_address_without_both_conditions_is_refused(
    workdir: Path, compute_main: LocalCompute, ca_file: Path, listen: str, local: str, refusal: str
) -> None:
    config = config_file(workdir / "config.toml", compute_main.url(ca_file=ca_file), listen, local)
    with pytest.raises(StartupError) as caught:
        async with running_daemon(config, daemon_env(workdir)):
            pass
    message = str(caught.value)
    assert EVERYWHERE in message
    assert refusal in message
    assert LOCAL_SECRET not in message


async def test_with_both_it_listens_says_so_and_demands_the_password(
    workdir: Path, compute_main: LocalCompute, ca_file: Path
) -> None:
    config = config_file(
        workdir / "config.toml",
        compute_main.url(ca_file=ca_file),
        f'host = ["{EVERYWHERE}"]\nallow_non_loopback = true',
        f"password = {toml_string(LOCAL_SECRET)}",
    )
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(config, daemon_env(workdir)) as daemon:
            assert daemon.daemon.server is not None
            assert tcp_hosts(daemon.daemon.server.listening) == [EVERYWHERE]
            dsn = f"postgresql://neondb_owner@127.0.0.1:{daemon.port}/neondb?sslmode=disable"
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(dsn, password="not-it")
            conn = await asyncpg.connect(dsn, password=LOCAL_SECRET)
            assert await conn.fetchval("SELECT name FROM branch_info") == "main"
            await conn.close()
    warnings = [e for e in logs if e["event"] == "listening_beyond_loopback"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["addresses"] == [EVERYWHERE]
