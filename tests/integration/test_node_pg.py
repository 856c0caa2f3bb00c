"""node-postgres (npm `pg`) apps reach the branch through the daemon, with and without local TLS.

The tests drive ``tests/node/query.js``; ``scripts/bootstrap`` installs its dependencies.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, write_config
from fixtures.pg import TEST_PASSWORD

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
NODE = shutil.which("node")


def _node_problem() -> str | None:
    if NODE is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        return f"node-postgres is not installed: run `npm install` in {NODE_DIR}"
    return None


pytestmark = [
    pytest.mark.pg,
    pytest.mark.skipif(_node_problem() is not None, reason=_node_problem() or ""),
]

SELECT_BRANCH = "SELECT name FROM branch_info"


@pytest.fixture
async def daemon(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    config = write_config(
        workdir / "config.toml", branch_urls, branch="main", extra='[local]\ntls_auth = "password"'
    )
    async with running_daemon(config, daemon_env(workdir)) as running:
        yield running


def local_ca(daemon: LocalDaemon) -> Path:
    return daemon.config_path.parent / "tls" / "ca.crt"


async def node_query(
    options: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """What query.js printed: {"rows": [...], "tls": "TLSv1.3" | None} or {"error", "code"}."""
    assert NODE is not None
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "NODE_"))}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        NODE, str(NODE_DIR / "query.js"), json.dumps({"sql": SELECT_BRANCH, **options}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=NODE_DIR,
    )  # fmt: skip
    out, err = await proc.communicate()
    lines = out.decode().strip().splitlines()
    assert lines, err.decode()
    outcome: dict[str, Any] = json.loads(lines[-1])
    assert (proc.returncode == 0) is ("rows" in outcome), (outcome, err.decode())
    return outcome


def client(daemon: LocalDaemon, host: str = "localhost", **extra: Any) -> dict[str, Any]:
    return {
        "host": host,
        "port": daemon.port,
        "user": "neondb_owner",
        "database": "neondb",
        "password": TEST_PASSWORD,
        **extra,
    }


async def test_node_pg_without_tls_reaches_the_branch(daemon: LocalDaemon) -> None:
    outcome = await node_query({"client": client(daemon, ssl=False)})
    assert outcome == {"rows": [{"name": "main"}], "tls": None}


async def test_node_pg_with_reject_unauthorized_false_uses_local_tls(daemon: LocalDaemon) -> None:
    outcome = await node_query({"client": client(daemon, ssl={"rejectUnauthorized": False})})
    assert outcome["rows"] == [{"name": "main"}]
    assert outcome["tls"] in ("TLSv1.2", "TLSv1.3")


async def test_node_pg_verifies_the_daemon_with_the_local_ca(
    daemon: LocalDaemon, ca_file: Path
) -> None:
    """ssl: {ca: <the local CA's PEM>} checks the certificate and the name localhost."""
    outcome = await node_query({"client": client(daemon, ssl={}), "caFile": str(local_ca(daemon))})
    assert outcome["rows"] == [{"name": "main"}]
    assert outcome["tls"] in ("TLSv1.2", "TLSv1.3")
    # The computes' CA did not sign the daemon's certificate.
    refused = await node_query({"client": client(daemon, ssl={}), "caFile": str(ca_file)})
    assert "certificate" in refused["error"]


async def test_the_neon_url_with_only_the_host_changed_works_in_node(
    daemon: LocalDaemon,
) -> None:
    """sslmode=require (verify-full to node-postgres) trusts the CA from NODE_EXTRA_CA_CERTS,
    and node-postgres' channel binding (enableChannelBinding) logs in with the role password."""
    url = (
        f"postgresql://neondb_owner:{TEST_PASSWORD}@localhost:{daemon.port}/neondb"
        "?sslmode=require&channel_binding=require"
    )
    env = {"NODE_EXTRA_CA_CERTS": str(local_ca(daemon))}
    outcome = await node_query(
        {"client": {"connectionString": url, "enableChannelBinding": True}}, env
    )
    assert outcome["rows"] == [{"name": "main"}]
    wrong = url.replace(TEST_PASSWORD, "not-the-password")
    refused = await node_query(
        {"client": {"connectionString": wrong, "enableChannelBinding": True}}, env
    )
    assert refused["code"] == "28P01"


async def test_node_pg_direct_tls_negotiation(daemon: LocalDaemon) -> None:
    """node-postgres' sslnegotiation=direct: a ClientHello with ALPN postgresql, no SSLRequest."""
    outcome = await node_query(
        {"client": client(daemon, ssl={}, sslnegotiation="direct"), "caFile": str(local_ca(daemon))}
    )
    assert outcome["rows"] == [{"name": "main"}]
    assert outcome["tls"] in ("TLSv1.2", "TLSv1.3")
