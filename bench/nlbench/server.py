"""The benchmark's PostgreSQL: a Neon-like compute (TLS + SCRAM) built as the test fixtures do.

It is tuned for load once created: room for 1,000+ sessions, buffers that hold the pgbench
tables, and no per-connection log lines (they would tax the connect-per-transaction run).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from neonlocal.localpg import (
    ComputeSpec,
    LocalCompute,
    StopMode,
    create_compute,
    find_pg_bindir,
    initdb_template,
    make_base_dir,
)
from neonlocal.tls.certs import CertificateAuthority
from nlbench.net import free_port

HOSTNAME = "ep-bench-000001.us-east-2.aws.neon.tech"
ROLE = "neondb_owner"
DATABASE = "neondb"
# The sessions test opens 1,000 at once through the daemon; leave room for everything else.
MAX_CONNECTIONS = 1100
COPY_TABLE = "bench_copy"
# One COPY text row: an 8-digit-ish id, a tab, 256 hex characters, a newline.
_PAYLOAD_SQL = "repeat(md5(g::text), 8)"
_ROW_BYTES_ESTIMATE = 265


@dataclass
class BenchServer:
    compute: LocalCompute
    base_dir: Path
    ca_file: Path
    password: str = field(repr=False)
    copy_bytes: int = 0

    @property
    def addr(self) -> str:
        return self.compute.spec.listen_addr

    @property
    def port(self) -> int:
        return self.compute.spec.port

    def version(self) -> str:
        return self.compute.psql("SHOW server_version", dbname="postgres").strip()

    def destroy(self) -> None:
        try:
            self.compute.stop(StopMode.IMMEDIATE)
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def start_server(work: Path, addr: str, *, scale: int, copy_mb: int) -> BenchServer:
    """Create, tune and fill the server; ``work`` is a directory every OS user may read."""
    base_dir = make_base_dir("neonlocal-bench-pg-")
    try:
        ca = CertificateAuthority.create("neonlocal bench CA")
        # The IP too, so pgbouncer (which connects by address) can verify the name.
        pair = ca.issue([HOSTNAME, addr])
        ca_file = work / "ca.crt"
        ca_file.write_bytes(ca.cert_pem)
        ca_file.chmod(0o644)
        password = "npg_" + secrets.token_urlsafe(18)
        bindir = find_pg_bindir()
        spec = ComputeSpec(name="bench", hostname=HOSTNAME, listen_addr=addr, port=free_port(addr))
        compute = create_compute(
            base_dir,
            spec,
            pair,
            password,
            template=initdb_template(base_dir, bindir),
            bindir=bindir,
        )
        server = BenchServer(compute, base_dir, ca_file, password)
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise
    try:
        _tune(server)
        _fill(server, scale=scale, copy_mb=copy_mb)
    except BaseException:
        server.destroy()
        raise
    return server


def _tune(server: BenchServer) -> None:
    server.compute.psql(
        f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS};\n"
        "ALTER SYSTEM SET shared_buffers = '256MB';\n"
        "ALTER SYSTEM SET log_connections = off;\n"
        "ALTER SYSTEM SET log_disconnections = off;\n",
        dbname="postgres",
    )
    server.compute.restart()


def _fill(server: BenchServer, *, scale: int, copy_mb: int) -> None:
    compute = server.compute
    env = {**os.environ, "PGPASSWORD": server.password}
    # pgbench -i over the Unix socket as the role, so the tables belong to it.
    subprocess.run(
        [
            str(compute.bindir / "pgbench"),
            "-i",
            "-q",
            "-s",
            str(scale),
            "-h",
            str(compute.socket_dir),
            "-p",
            str(compute.spec.port),
            "-U",
            ROLE,
            DATABASE,
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    rows = max(1, copy_mb * 1_000_000 // _ROW_BYTES_ESTIMATE)
    # Only our own constants and an integer go into these statements.
    compute.psql(
        f"CREATE TABLE {COPY_TABLE} AS SELECT g AS id, {_PAYLOAD_SQL} AS payload"  # noqa: S608
        f" FROM generate_series(1, {rows}) g;\n"
        f"VACUUM ANALYZE {COPY_TABLE};\n",
        user=ROLE,
    )
    # Text COPY of integers and hex needs no escaping: this is the exact stream size.
    size = compute.psql(
        f"SELECT sum(octet_length(id::text) + octet_length(payload) + 2) FROM {COPY_TABLE}",  # noqa: S608
        user=ROLE,
    )
    server.copy_bytes = int(size.strip())
