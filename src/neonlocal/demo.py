"""``neonlocal demo``: the whole product, offline, in a few seconds.

Two throwaway PostgreSQL clusters play two Neon branches (TLS with a wildcard certificate for
a Neon-like region, SCRAM, hostnames reached through ``hostaddr``). The daemon serves them on
one local address, a small "app" keeps opening connections with psql, and ``neonlocal use``
switches branches under it: new connections move, the open one stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from neonlocal import logging as nl_logging

REGION = "us-east-2.aws.neon.tech"
# Tells the branches apart; {name} is one of our two fixed demo names.
_SEED = "CREATE TABLE branch_info(name text); INSERT INTO branch_info VALUES ('{name}');"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _loopback_alias(preferred: str) -> str:
    """127.0.0.2 and up exist on Linux; elsewhere fall back to 127.0.0.1."""
    try:
        _free_port(preferred)
    except OSError:
        return "127.0.0.1"
    return preferred


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(*, seconds: float = 12.0, port: int = 0) -> int:
    from neonlocal.localpg import LocalPgError, PgNotFoundError, find_pg_bindir

    try:
        bindir = find_pg_bindir()
    except PgNotFoundError as exc:
        print(f"neonlocal: the demo needs PostgreSQL server binaries: {exc}", file=sys.stderr)
        return 1
    base = Path(tempfile.mkdtemp(prefix="neonlocal-demo-"))
    base.chmod(0o755)
    nl_logging.configure("warning")
    try:
        return asyncio.run(_demo(base, bindir, seconds, port))
    except LocalPgError as exc:
        print(f"neonlocal: demo could not start PostgreSQL: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _demo(base: Path, bindir: Path, seconds: float, port: int) -> int:
    from neonlocal.daemon import Daemon
    from neonlocal.errors import UserError
    from neonlocal.localpg import ComputeSpec, StopMode, create_compute, initdb_template
    from neonlocal.proxy.server import ListenError
    from neonlocal.tls.certs import CertificateAuthority

    _say("neonlocal demo: two local 'branches' (PostgreSQL with TLS + SCRAM, like Neon computes)")
    ca = CertificateAuthority.create("neonlocal demo CA")
    ca_file = base / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    ca_file.chmod(0o644)
    pair = ca.issue([f"*.{REGION}"])
    password = "demo-" + os.urandom(6).hex()
    pg_base = base / "pg"
    pg_base.mkdir()
    pg_base.chmod(0o755)
    template = await asyncio.to_thread(initdb_template, pg_base, bindir)
    computes = []
    for name, ident, addr in (("main", "100001", "127.0.0.2"), ("dev", "200002", "127.0.0.3")):
        addr = _loopback_alias(addr)
        spec = ComputeSpec(name, f"ep-{name}-{ident}.{REGION}", addr, _free_port(addr))
        seed = _SEED.format(name=name)
        compute = await asyncio.to_thread(
            create_compute, pg_base, spec, pair, password, seed_sql=seed, template=template
        )
        computes.append(compute)
        _say(f"  {name:5} {spec.hostname} (really {addr}:{spec.port})")
    config = base / "config.toml"
    config.write_text(
        "# written by neonlocal demo\n"
        'branch = "main"\n\n'
        f'[listen]\nhost = ["127.0.0.1"]\nport = {port}\n\n'
        + "".join(
            f'[branches.{c.spec.name}]\nurl = "{c.url(ca_file=ca_file)}"\n\n' for c in computes
        )
    )
    config.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEONLOCAL_")}
    env["XDG_RUNTIME_DIR"] = str(base)
    daemon = Daemon(config, env)
    try:
        await daemon.start()
    except (UserError, ListenError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    assert daemon.server is not None
    local_port = daemon.server.port
    url = f"postgresql://neondb_owner@localhost:{local_port}/neondb"
    _say(f"\nneonlocal listens on localhost:{local_port}; the app's DATABASE_URL={url}\n")
    psql = str(bindir / "psql")
    app_env = {**env, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    try:
        # A long-lived session, opened before any switch, as a pooled app holds one: the
        # switch ends it once idle (57P01), and the app's next connection lands on dev.
        held = await asyncio.create_subprocess_exec(
            psql, "--no-psqlrc", "-qAt", url,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=app_env,
        )  # fmt: skip
        assert held.stdin is not None
        assert held.stdout is not None
        held.stdin.write(b"SELECT 'open session sees ' || name FROM branch_info;\n")
        await held.stdin.drain()
        _say("[app] " + (await held.stdout.readline()).decode().strip())
        rounds = max(4, int(seconds))
        for i in range(rounds):
            if i == rounds // 2:
                _say("\n$ neonlocal use dev")
                reply = await daemon_switch(config, daemon, "dev")
                _say(reply + "\n")
            proc = await asyncio.create_subprocess_exec(
                psql, "--no-psqlrc", "-qAt", "-c",
                "SELECT 'new connection sees ' || name FROM branch_info", url,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=app_env,
            )  # fmt: skip
            out, _ = await proc.communicate()
            _say("[app] " + out.decode().strip())
            await asyncio.sleep(max(0.0, seconds / rounds - 0.05))
        held.stdin.write(b"SELECT 'the old session still sees ' || name FROM branch_info;\n")
        held.stdin.close()
        said = (await held.stdout.read()).decode().strip().splitlines()
        await held.wait()
        _say("[app] the session opened before the switch: " + (said[0] if said else "closed"))
        _say(
            "[app] (a pool with pre-ping, psycopg_pool, asyncpg's pool or psql reconnects "
            "here, to dev; `use --keep` leaves such sessions on main)"
        )
        _say(
            "\nDone. Next: `scripts/test` runs the test suite. With Neon: put each branch's "
            "connection string in ~/.config/neonlocal/config.toml, run `neonlocal up`, and set "
            f"DATABASE_URL={url} (see README)."
        )
        return 0
    finally:
        await daemon.stop(deadline=2.0)
        for compute in computes:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(compute.stop, StopMode.IMMEDIATE)


async def daemon_switch(config: Path, daemon: object, name: str) -> str:
    """What `neonlocal use NAME` does: rewrite the file, ask the daemon, print its answer."""
    from neonlocal.config.file import switch_branch
    from neonlocal.daemon import Daemon

    assert isinstance(daemon, Daemon)
    await asyncio.to_thread(switch_branch, config, name)
    reply = await daemon.handle_control({"op": "reload", "branch": name})
    if not reply.get("ok"):
        return f"neonlocal: the daemon did not switch: {reply.get('error')}"
    from neonlocal.cli.context import moved_sessions

    port = reply["listen"][0].rpartition(":")[2]
    line = f"localhost:{port} -> {name} ({reply['upstream_host']})"
    return line + moved_sessions(reply.get("switch"), None)
