"""The three ways a client reaches the server, and the processes behind two of them.

- direct: libpq straight to PostgreSQL with ``sslmode=require``;
- neonlocal: plaintext to ``neonlocal up`` (a subprocess), which logs in upstream with TLS and
  SCRAM-SHA-256-PLUS;
- pgbouncer: plaintext to pgbouncer in session mode, which uses TLS to the server.
"""

from __future__ import annotations

import contextlib
import enum
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neonlocal.control import DaemonNotRunning, request
from neonlocal.paths import control_socket_path
from nlbench.net import free_port
from nlbench.server import DATABASE, HOSTNAME, ROLE, BenchServer


class PathName(enum.StrEnum):
    DIRECT = "direct"
    NEONLOCAL = "neonlocal"
    PGBOUNCER = "pgbouncer"


@dataclass(frozen=True)
class ClientTarget:
    """What a client needs to reach the server one way: a conninfo and maybe a password."""

    path: PathName
    conninfo: str
    password: str | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """Environment for libpq tools (pgbench, psql): the password never goes on argv."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        return env


def _conninfo(**parts: str | int) -> str:
    return " ".join(f"{key}={value}" for key, value in parts.items())


def direct_target(
    server: BenchServer, *, addr: str | None = None, port: int | None = None
) -> ClientTarget:
    conninfo = _conninfo(
        host=HOSTNAME,
        hostaddr=addr or server.addr,
        port=port or server.port,
        user=ROLE,
        dbname=DATABASE,
        sslmode="require",
    )
    return ClientTarget(PathName.DIRECT, conninfo, server.password)


def _local_target(path: PathName, port: int, dbname: str = DATABASE) -> ClientTarget:
    conninfo = _conninfo(host="127.0.0.1", port=port, user=ROLE, dbname=dbname, sslmode="disable")
    return ClientTarget(path, conninfo)


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used so far, user plus system, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def branch_url(server: BenchServer, *, addr: str, port: int) -> str:
    """The branch as `neon connection-string` would print it, pointed at ``addr:port``."""
    return (
        f"postgresql://{ROLE}:{server.password}@{HOSTNAME}:{port}/{DATABASE}"
        f"?hostaddr={addr}&sslmode=require&sslrootcert={server.ca_file}"
    )


@dataclass
class NeonlocalDaemon:
    """``python -m neonlocal --config X up`` with branches "bench", "bench-alt" and "slow"."""

    directory: Path
    proc: subprocess.Popen[bytes]
    config_path: Path
    env: dict[str, str] = field(repr=False)
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def target(self) -> ClientTarget:
        return _local_target(PathName.NEONLOCAL, self.port)

    @property
    def socket_dir(self) -> Path:
        return self.directory / "socket"

    def unix_target(self) -> ClientTarget:
        """Plaintext through the daemon's Unix socket, as psql with no host connects."""
        conninfo = _conninfo(
            host=str(self.socket_dir), port=self.port, user=ROLE, dbname=DATABASE, sslmode="disable"
        )
        return ClientTarget(PathName.NEONLOCAL, conninfo)

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "neonlocal", "--config", str(self.config_path), *args]

    def status(self) -> dict[str, Any]:
        return request(control_socket_path(self.config_path, self.env), {"op": "status"})

    def log(self) -> str:
        path = self.directory / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def use(self, branch: str) -> float:
        """Seconds `neonlocal use BRANCH` takes until it has the daemon's confirmation."""
        began = time.perf_counter()
        subprocess.run(self.cli("use", branch), env=self.env, check=True, capture_output=True)
        return time.perf_counter() - began

    def wait_idle(self, timeout: float) -> bool:
        """Whether the daemon has no session open (HTTP queries' pooled ones included)
        within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sum(self.status()["sessions"].values()):
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _probe(source: Path | None, code: str) -> bool:
    """Whether ``code`` prints True in the daemon's neonlocal (``source``, or the installed one)."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    return out.stdout.strip() == "True"


def supports_session_reuse(source: Path | None) -> bool:
    """Whether the daemon's neonlocal has ``[upstream] reuse_sessions`` (opt-in reuse)."""
    # The schema's class was UpstreamSettings before the daemon's values got that name.
    probe = (
        "import neonlocal.config.schema as c;"
        "U = getattr(c, 'UpstreamSchema', c.UpstreamSettings);"
        "print('reuse_sessions' in U.model_fields)"
    )
    return _probe(source, probe)


def supports_serverless(source: Path | None) -> bool:
    """Whether the daemon's neonlocal serves the serverless driver (``POST /sql``)."""
    probe = "import importlib.util as u; print(bool(u.find_spec('neonlocal.serverless.http')))"
    return _probe(source, probe)


def compile_bytecode(source: Path | None) -> str:
    """Compile the daemon's own modules to bytecode first, as installing the package does.

    pip compiles a package's modules when it installs it; an editable checkout compiles
    them on first import, unless PYTHONDONTWRITEBYTECODE forbids writing them (as on the
    machines this was written on). Then every process compiles the sources again, which
    the `--help` and `use` rows would count (`--help`: 85 against 65 ms on the fourth
    session's host); the daemon's memory hardly changes (0.3 MiB).
    """
    import compileall

    import neonlocal

    package = source / "neonlocal" if source is not None else Path(neonlocal.__file__).parent
    # compileall writes the files whatever PYTHONDONTWRITEBYTECODE says.
    if not compileall.compile_dir(str(package), quiet=1):
        raise RuntimeError(f"cannot compile {package}")
    return f"{package} compiled before the run, as pip install does"


def start_neonlocal(
    directory: Path,
    server: BenchServer,
    *,
    slow: tuple[str, int],
    max_sessions: int,
    reuse_sessions: bool = False,
    source: Path | None = None,
    loop: str | None = None,
) -> NeonlocalDaemon:
    """Start the daemon from a config written as the tests' ``write_config`` does."""
    directory.mkdir(mode=0o700)
    port = free_port()
    branches = {
        "bench": branch_url(server, addr=server.addr, port=server.port),
        "bench-alt": branch_url(server, addr=server.addr, port=server.port),
        "slow": branch_url(server, addr=slow[0], port=slow[1]),
    }
    lines = [
        "# neonlocal bench config",
        'branch = "bench"',
        'log_level = "warning"',
        "",
        "[listen]",
        'host = ["127.0.0.1"]',
        f"port = {port}",
        f"max_sessions = {max_sessions}",
        f"unix_socket_dir = {_toml_string(str(directory / 'socket'))}",
        "",
    ]
    if reuse_sessions:
        lines += ["[upstream]", "reuse_sessions = true", ""]
    for name, url in branches.items():
        lines += [f"[branches.{_toml_string(name)}]", f"url = {_toml_string(url)}", ""]
    config_path = directory / "config.toml"
    config_path.write_text("\n".join(lines))
    config_path.chmod(0o600)
    runtime = directory / "run"
    runtime.mkdir(mode=0o700)
    (directory / "socket").mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEONLOCAL_")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    if source is not None:
        # Another checkout's src/ (e.g. the last commit, for a before/after in one run).
        env["PYTHONPATH"] = str(source)
    if loop is not None:
        env["NEONLOCAL_LOOP"] = loop  # "asyncio": the standard loop even with uvloop installed
    with (directory / "daemon.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "neonlocal",
                "--config",
                str(config_path),
                "up",
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    daemon = NeonlocalDaemon(directory, proc, config_path, env, port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"neonlocal exited {proc.returncode}: {daemon.log()}")
        with contextlib.suppress(DaemonNotRunning, OSError, ValueError):
            daemon.status()
            return daemon
        time.sleep(0.05)
    daemon.stop()
    raise RuntimeError(f"neonlocal did not become ready: {daemon.log()}")


PGBOUNCER_SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path=PGBOUNCER_SEARCH_PATH)


@dataclass
class PgBouncer:
    directory: Path
    proc: subprocess.Popen[bytes]
    port: int
    tls_mode: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def target(self, dbname: str = DATABASE) -> ClientTarget:
        return _local_target(PathName.PGBOUNCER, self.port, dbname)

    def version(self) -> str:
        binary = find_pgbouncer()
        if binary is None:
            return "missing"
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
        return out.stdout.splitlines()[0] if out.stdout else "unknown"

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_pgbouncer(
    binary: str, directory: Path, server: BenchServer, *, slow: tuple[str, int]
) -> PgBouncer:
    """pgbouncer in session mode, plaintext (trust) for local clients, verified TLS upstream.

    It runs as the database OS user when we are root: pgbouncer refuses to run as root.
    """
    directory.mkdir(mode=0o700)
    as_user = "postgres" if os.geteuid() == 0 else None
    if as_user is not None:
        shutil.chown(directory, user=as_user, group=as_user)
    port = free_port()
    ca_file = directory / "ca.crt"
    shutil.copyfile(server.ca_file, ca_file)
    # The password lives only in this 0600 file, which pgbouncer uses to log in upstream.
    auth_file = directory / "userlist.txt"
    auth_file.write_text(f'"{ROLE}" "{server.password}"\n')
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": str(auth_file),
        "pool_mode": "session",
        "max_client_conn": "1200",
        "default_pool_size": "20",
        "server_tls_sslmode": "verify-full",
        "server_tls_ca_file": str(ca_file),
        "logfile": str(directory / "pgbouncer.log"),
        "log_connections": "0",
        "log_disconnections": "0",
        "ignore_startup_parameters": "extra_float_digits",
    }
    config = "[databases]\n"
    config += f"{DATABASE} = host={server.addr} port={server.port} dbname={DATABASE} user={ROLE}\n"
    config += f"{DATABASE}_slow = host={slow[0]} port={slow[1]} dbname={DATABASE} user={ROLE}\n"
    config += "\n[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
    config_path = directory / "pgbouncer.ini"
    config_path.write_text(config)
    for path in (ca_file, auth_file, config_path):
        path.chmod(0o600)
        if as_user is not None:
            shutil.chown(path, user=as_user, group=as_user)
    proc = subprocess.Popen(
        [binary, "-q", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=as_user,
        group=as_user,
        extra_groups=[] if as_user is not None else None,
    )
    bouncer = PgBouncer(directory, proc, port, settings["server_tls_sslmode"])
    _wait_listening("127.0.0.1", port, proc, bouncer.log)
    return bouncer


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], log: Any) -> None:
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {log()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on {host}:{port}: {log()}")
