"""Throwaway local PostgreSQL clusters that behave like Neon computes.

Used by the integration tests and by ``neonlocal demo``. A compute here, like one of Neon's,
accepts TCP only over TLS (plaintext is refused by pg_hba), authenticates with SCRAM-SHA-256
(SCRAM-SHA-256-PLUS over TLS), presents a certificate for a Neon-style hostname, listens on
its own address at port 5432, and has a role ``neondb_owner`` owning database ``neondb``.

Two things the tests and the demo need besides:
- a Unix socket, with ``trust``, inside a private directory, to seed data as the superuser;
- speed: ``initdb`` runs once per base directory into a template that each compute copies.

PostgreSQL refuses to run as root, so as root every server binary runs as the ``postgres``
OS user and the directories it needs are handed to that user.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import getpass
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neonlocal.errors import UserError
from neonlocal.tls.certs import KeyPair, write_keypair

__all__ = [
    "ComputeSpec",
    "LocalCompute",
    "LocalPgError",
    "PgNotFoundError",
    "StopMode",
    "create_compute",
    "find_pg_bindir",
    "initdb_template",
    "make_base_dir",
]

DB_OS_USER = "postgres"
DEFAULT_ROLE = "neondb_owner"
DEFAULT_DATABASE = "neondb"
_TEMPLATE_DIRNAME = "_template"
_CONF_NAME = "neonlocal.conf"
_LOG_TAIL_LINES = 40
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
# Backstop for a hung helper; pg_ctl's own -w timeout (LocalCompute.timeout_s) comes first.
_COMMAND_TIMEOUT_S = 120
_SCRAM_ITERATIONS = 4096  # PostgreSQL's default for scram_iterations


class LocalPgError(UserError):
    """A local cluster could not be created, started, stopped or seeded."""


class PgNotFoundError(LocalPgError):
    """No PostgreSQL server binaries were found on this machine."""


class StopMode(enum.StrEnum):
    """pg_ctl shutdown modes."""

    SMART = "smart"  # wait for clients to disconnect
    FAST = "fast"  # end sessions, shut down cleanly
    IMMEDIATE = "immediate"  # abort; crash recovery on next start (fine for throwaways)


@dataclass(frozen=True)
class ComputeSpec:
    """Where one compute listens and what name its certificate must carry."""

    name: str
    hostname: str
    listen_addr: str
    port: int = 5432

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"compute name must be a short [A-Za-z0-9_-] word: {self.name!r}")
        # These clusters trust any local socket user and carry a known test password:
        # they must never be reachable from another machine.
        if not ipaddress.ip_address(self.listen_addr).is_loopback:
            raise ValueError(f"listen_addr must be a loopback address: {self.listen_addr!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _as_db_user(argv: Sequence[str | Path]) -> list[str]:
    args = [str(a) for a in argv]
    return ["runuser", "-u", DB_OS_USER, "--", *args] if _running_as_root() else args


def _chown_to_db_user(path: Path) -> None:
    if _running_as_root():
        shutil.chown(path, user=DB_OS_USER, group=_db_user_group())


def _db_user_group() -> int:
    import pwd  # POSIX-only, like everything in this module

    try:
        return pwd.getpwnam(DB_OS_USER).pw_gid
    except KeyError:
        raise LocalPgError(
            f"running as root, so PostgreSQL must run as the {DB_OS_USER!r} OS user, "
            "which does not exist (install the PostgreSQL server package)"
        ) from None


def _superuser_name() -> str:
    # initdb names the bootstrap superuser after the OS user that runs it.
    return DB_OS_USER if _running_as_root() else getpass.getuser()


def find_pg_bindir() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin, else ``pg_config --bindir``."""
    candidates: list[tuple[int, Path]] = []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        for child in root.iterdir():
            bindir = child / "bin"
            if child.name.isdigit() and (bindir / "initdb").is_file():
                candidates.append((int(child.name), bindir))
    if candidates:
        return max(candidates)[1]
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        bindir = Path(result.stdout.strip())
        if result.returncode == 0 and (bindir / "initdb").is_file():
            return bindir
    raise PgNotFoundError(
        "PostgreSQL server binaries not found: looked for /usr/lib/postgresql/<major>/bin/initdb "
        "and `pg_config --bindir`. Install the server package, e.g. `apt-get install postgresql`."
    )


def make_base_dir(prefix: str = "neonlocal-pg-") -> Path:
    """A fresh temporary directory the database OS user can reach (pytest's tmp_path is not)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=tempfile.gettempdir()))
    # Traverse-only for others: the postgres user reaches its own subdirectories, nothing more.
    base.chmod(0o711)
    return base


def _run(argv: Sequence[str | Path], what: str, *, input_text: str | None = None) -> str:
    try:
        result = subprocess.run(
            [str(a) for a in argv],
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
            timeout=_COMMAND_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise LocalPgError(f"{what} did not finish within {_COMMAND_TIMEOUT_S} s") from None
    except FileNotFoundError as exc:
        raise LocalPgError(f"{what} failed: {exc.strerror}: {exc.filename}") from None
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-4000:]
        raise LocalPgError(f"{what} failed (exit {result.returncode}): {output}")
    return result.stdout


def _write_db_file(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)
    _chown_to_db_user(path)


def initdb_template(base_dir: Path, bindir: Path | None = None) -> Path:
    """Run initdb once into ``base_dir/_template`` and return it; later calls reuse it.

    Safe against concurrent callers: initdb runs in a private directory that is renamed
    into place, and the loser of a race simply uses the winner's template.
    """
    base_dir = Path(base_dir)
    template = base_dir / _TEMPLATE_DIRNAME
    if (template / "PG_VERSION").is_file():
        return template
    bindir = bindir or find_pg_bindir()
    scratch = Path(tempfile.mkdtemp(prefix=".initdb-", dir=base_dir))
    try:
        _chown_to_db_user(scratch)
        datadir = scratch / "data"
        _run(
            _as_db_user(
                [
                    bindir / "initdb",
                    "--pgdata",
                    datadir,
                    "--username",
                    _superuser_name(),
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",  # a throwaway cluster does not need to survive power loss
                    "--no-instructions",
                ]
            ),
            "initdb",
        )
        # Per-compute settings live in their own file, so the copied postgresql.conf stays stock.
        with (datadir / "postgresql.conf").open("a") as conf:
            conf.write(f"\ninclude_if_exists '{_CONF_NAME}'\n")
        try:
            datadir.rename(template)
        except OSError:
            if not (template / "PG_VERSION").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return template


def _conf_literal(value: str | Path) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _conninfo_value(value: str | Path) -> str:
    text = str(value)
    if text and re.fullmatch(r"[A-Za-z0-9_./:@+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def scram_verifier(password: str, *, iterations: int = _SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677).

    Computing it here means the plaintext password never reaches the server, so it cannot
    turn up in a server log or an error message that quotes the statement.
    """
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


@dataclass(frozen=True)
class LocalCompute:
    """One PostgreSQL cluster playing a Neon compute; its state lives on disk under `root`."""

    spec: ComputeSpec
    root: Path
    bindir: Path
    password: str = field(repr=False)
    role: str = DEFAULT_ROLE
    database: str = DEFAULT_DATABASE
    timeout_s: int = 30

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def superuser(self) -> str:
        return _superuser_name()

    def start(self) -> None:
        self._pg_ctl("start", ["-l", self.log_file])

    def stop(self, mode: StopMode | str = StopMode.FAST) -> None:
        self._pg_ctl("stop", ["-m", StopMode(mode).value])

    def restart(self) -> None:
        self.stop(StopMode.FAST)
        self.start()

    def is_running(self) -> bool:
        # Exit 0: running; 3: not running; 4: no data directory.
        result = subprocess.run(
            _as_db_user([self.bindir / "pg_ctl", "status", "-D", self.datadir]),
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def url(self, *, ca_file: Path | str | None = None, password: bool = True) -> str:
        """A libpq URL that reaches this compute exactly as a client reaches Neon.

        ``host`` is the Neon-style hostname (used for SNI and certificate checks) while
        ``hostaddr`` says where it really is, so no DNS or /etc/hosts entry is needed.
        """
        quote = urllib.parse.quote
        userinfo = quote(self.role, safe="")
        if password:
            userinfo += ":" + quote(self.password, safe="")
        query = {"hostaddr": self.spec.listen_addr, "sslmode": "verify-full"}
        if ca_file is not None:
            query["sslrootcert"] = str(ca_file)
        return (
            f"postgresql://{userinfo}@{self.spec.hostname}:{self.spec.port}/"
            f"{quote(self.database, safe='')}?{urllib.parse.urlencode(query, safe='/:')}"
        )

    def superuser_dsn(self, dbname: str | None = None) -> str:
        """Key/value conninfo for the Unix socket as the bootstrap superuser (trust, no TLS)."""
        parts: dict[str, str | Path] = {
            "host": self.socket_dir,
            "port": str(self.spec.port),
            "user": self.superuser,
            "dbname": dbname or self.database,
        }
        return " ".join(f"{k}={_conninfo_value(v)}" for k, v in parts.items())

    def server_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def psql(self, sql: str, *, dbname: str | None = None, user: str | None = None) -> str:
        """Run `sql` through psql over the Unix socket (stops at the first error)."""
        return _run(
            [
                self.bindir / "psql",
                "--no-psqlrc",
                "--quiet",
                "--tuples-only",
                "--no-align",
                "--set",
                "ON_ERROR_STOP=1",
                "--host",
                self.socket_dir,
                "--port",
                str(self.spec.port),
                "--username",
                user or self.superuser,
                "--dbname",
                dbname or self.database,
                "--file",
                "-",
            ],
            f"psql on compute {self.spec.name!r}",
            input_text=sql,
        )

    def _pg_ctl(self, command: str, extra: Sequence[str | Path]) -> None:
        argv = [
            self.bindir / "pg_ctl",
            command,
            "-D",
            self.datadir,
            "-w",
            "-t",
            str(self.timeout_s),
            *extra,
        ]
        try:
            _run(_as_db_user(argv), f"pg_ctl {command} of compute {self.spec.name!r}")
        except LocalPgError as exc:
            raise LocalPgError(f"{exc}\n--- server log (tail) ---\n{self._log_tail()}") from None

    def _log_tail(self) -> str:
        return "\n".join(self.server_log().splitlines()[-_LOG_TAIL_LINES:])


def _compute_conf(spec: ComputeSpec, root: Path) -> str:
    settings: dict[str, str] = {
        "listen_addresses": _conf_literal(spec.listen_addr),
        "port": str(spec.port),
        "unix_socket_directories": _conf_literal(root / "socket"),
        "unix_socket_permissions": "0700",
        "ssl": "on",
        "ssl_cert_file": _conf_literal(root / "tls" / "server.crt"),
        "ssl_key_file": _conf_literal(root / "tls" / "server.key"),
        "ssl_min_protocol_version": _conf_literal("TLSv1.2"),
        "password_encryption": _conf_literal("scram-sha-256"),
        "hba_file": _conf_literal(root / "data" / "pg_hba.conf"),
        # Room for load tests, while several clusters still fit in a small machine's memory.
        "max_connections": "600",
        "shared_buffers": _conf_literal("32MB"),
        # Throwaway data: trade durability for speed.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "log_connections": "on",
        "log_disconnections": "on",
        "log_line_prefix": _conf_literal("%m [%p] %q%u@%d "),
        "cluster_name": _conf_literal(spec.name),
    }
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


# Like Neon: TCP only over TLS, only SCRAM. The Unix socket is trusted, which is safe because
# its directory is private to the database OS user (and root).
_HBA = """\
# TYPE   DATABASE USER ADDRESS    METHOD
local    all      all             trust
hostssl  all      all  0.0.0.0/0  scram-sha-256
hostssl  all      all  ::/0       scram-sha-256
"""


def _lay_out_compute(root: Path, spec: ComputeSpec, tls: KeyPair, template: Path) -> None:
    _chown_to_db_user(root)
    root.chmod(0o700)
    # cp -a keeps owners and the 0700 mode PostgreSQL insists on for its data directory.
    _run(["cp", "-a", template, root / "data"], f"copying the template for {spec.name!r}")
    for private_dir in (root / "socket", root / "tls"):
        private_dir.mkdir(mode=0o700)
        _chown_to_db_user(private_dir)
    write_keypair(
        tls,
        root / "tls" / "server.crt",
        root / "tls" / "server.key",
        owner=DB_OS_USER if _running_as_root() else None,
    )
    _write_db_file(root / "data" / _CONF_NAME, _compute_conf(spec, root))
    _write_db_file(root / "data" / "pg_hba.conf", _HBA)


def create_compute(
    base_dir: Path,
    spec: ComputeSpec,
    tls: KeyPair,
    password: str,
    *,
    seed_sql: str | None = None,
    template: Path | None = None,
    bindir: Path | None = None,
    role: str = DEFAULT_ROLE,
    database: str = DEFAULT_DATABASE,
) -> LocalCompute:
    """Create, start and seed a compute in ``base_dir/<spec.name>``; returns it running.

    `template` is a data directory from `initdb_template`; by default the one cached in
    `base_dir` is used (and made on first use). `seed_sql` runs in the database as `role`,
    so the tables it creates belong to the role a client logs in with.
    """
    base_dir = Path(base_dir)
    bindir = bindir or find_pg_bindir()
    template = template or initdb_template(base_dir, bindir)
    root = base_dir / spec.name
    try:
        root.mkdir()
    except FileExistsError:
        raise LocalPgError(f"a compute named {spec.name!r} already exists in {base_dir}") from None
    compute = LocalCompute(
        spec=spec, root=root, bindir=bindir, password=password, role=role, database=database
    )
    try:
        _lay_out_compute(root, spec, tls, template)
        compute.start()
        compute.psql(
            f"CREATE ROLE {_sql_ident(role)} LOGIN CREATEDB CREATEROLE"
            f" PASSWORD {_sql_literal(scram_verifier(password))};\n"
            f"CREATE DATABASE {_sql_ident(database)} OWNER {_sql_ident(role)};\n",
            dbname="postgres",
        )
        if seed_sql:
            compute.psql(seed_sql, user=role)
    except BaseException:
        # The error already carries the server log's tail; leave nothing half-made behind,
        # so the same name can be tried again. A start that timed out may have left a server.
        with contextlib.suppress(LocalPgError):
            compute.stop(StopMode.IMMEDIATE)
        shutil.rmtree(root, ignore_errors=True)
        raise
    return compute
