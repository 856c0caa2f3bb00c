"""The Neon serverless driver (npm `@neondatabase/serverless`) on the daemon's own port.

`neon()` queries over HTTP (`POST /sql`) and `Pool`/`Client` sessions over a WebSocket
(`/v2`), driven through ``tests/node/serverless.js``; ``scripts/bootstrap`` installs it.
Drizzle and Prisma (``@prisma/adapter-neon``) ride on the same driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage

from fixtures import rawpg
from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, write_config
from fixtures.net import free_port
from fixtures.pg import TEST_PASSWORD
from neonlocal.localpg import LocalCompute

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
NODE = shutil.which("node")
SELECT_BRANCH = "SELECT name FROM branch_info"


def _node_problem() -> str | None:
    if NODE is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "@neondatabase" / "serverless").is_dir():
        return f"@neondatabase/serverless is not installed: run `npm ci` in {NODE_DIR}"
    return None


pytestmark = [
    pytest.mark.pg,
    pytest.mark.skipif(_node_problem() is not None, reason=_node_problem() or ""),
]


class Driver:
    """One node process holding the driver; each call is one command and its answer."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    async def call(self, op: str, **command: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"op": op, **command}).encode() + b"\n")
        await self._proc.stdin.drain()
        line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        assert line, "the node driver process ended"
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def result(self, op: str, **command: Any) -> Any:
        answer = await self.call(op, **command)
        assert "result" in answer, answer
        return answer["result"]

    async def error(self, op: str, **command: Any) -> dict[str, Any]:
        answer = await self.call(op, **command)
        assert "error" in answer, answer
        error: dict[str, Any] = answer["error"]
        return error


def database_url(daemon: LocalDaemon, password: str = TEST_PASSWORD) -> str:
    return f"postgresql://neondb_owner:{password}@localhost:{daemon.port}/neondb"


@contextlib.asynccontextmanager
async def driver(
    daemon: LocalDaemon, url: str | None = None, *, secure: bool = False, port: int | None = None
) -> AsyncIterator[Driver]:
    """The driver in a node process; ``secure``: https and wss, trusting the local CA."""
    assert NODE is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "NODE_"))}
    if secure:
        env["NODE_EXTRA_CA_CERTS"] = str(daemon.config_path.parent / "tls" / "ca.crt")
    options = {
        "port": port or daemon.port,
        "url": url or database_url(daemon),
        "secure": secure,
    }
    proc = await asyncio.create_subprocess_exec(
        NODE, str(NODE_DIR / "serverless.js"), json.dumps(options),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=NODE_DIR,
    )  # fmt: skip
    try:
        yield Driver(proc)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def daemon(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    config = write_config(workdir / "config.toml", branch_urls, branch="main")
    async with running_daemon(config, daemon_env(workdir)) as running:
        yield running


# --- WebSocket sessions (Pool, Client) -----------------------------------------------------------


async def test_a_client_over_a_websocket_reaches_the_selected_branch(daemon: LocalDaemon) -> None:
    """The driver's pipelined startup, cleartext password and first query, then more."""
    async with driver(daemon) as node:
        await node.result("connect", name="c", kind="client")
        first = await node.result("query", name="c", sql=SELECT_BRANCH)
        assert first["rows"] == [{"name": "main"}]
        two = await node.result("query", name="c", sql="SELECT $1::int + 1 AS n", params=[1])
        assert two["rows"] == [{"n": 2}]
        await node.result("end", name="c")


async def test_an_interactive_transaction_over_a_websocket(daemon: LocalDaemon) -> None:
    async with driver(daemon) as node:
        await node.result("connect", name="c", kind="client")
        await node.result("query", name="c", sql="CREATE TEMP TABLE t (n int)")
        await node.result("query", name="c", sql="BEGIN")
        inserted = await node.result("query", name="c", sql="INSERT INTO t VALUES (1), (2)")
        assert inserted["rowCount"] == 2
        await node.result("query", name="c", sql="ROLLBACK")
        after = await node.result("query", name="c", sql="SELECT count(*)::int AS n FROM t")
        assert after["rows"] == [{"n": 0}]


async def test_a_pool_over_websockets_and_errors_keep_their_sqlstate(daemon: LocalDaemon) -> None:
    async with driver(daemon) as node:
        await node.result("connect", name="p", kind="pool")
        rows = await node.result("query", name="p", sql=SELECT_BRANCH)
        assert rows["rows"] == [{"name": "main"}]
        error = await node.error("query", name="p", sql="SELEC 1")
        assert error["code"] == "42601"
        error = await node.error("query", name="p", sql="SELECT 1/0")
        assert error["code"] == "22012"
        # The pool's session survived its errors.
        assert (await node.result("query", name="p", sql="SELECT 1 AS one"))["rows"] == [{"one": 1}]


async def test_listen_over_a_websocket_hears_notify_sent_over_http(daemon: LocalDaemon) -> None:
    async with driver(daemon) as node:
        await node.result("connect", name="listener", kind="client")
        await node.result("query", name="listener", sql="LISTEN sls_channel")
        await node.result("sql", sql="SELECT pg_notify('sls_channel', $1)", params=["hello"])
        for _ in range(50):
            notes = await node.result("notifications", name="listener")
            if notes:
                break
            await asyncio.sleep(0.1)
        assert notes == [{"channel": "sls_channel", "payload": "hello"}]


async def test_use_moves_new_websocket_sessions_and_ends_old_ones_when_idle(
    daemon: LocalDaemon,
) -> None:
    async with driver(daemon) as node:
        await node.result("connect", name="old", kind="client")
        await daemon.use("dev")
        await asyncio.sleep(0.2)
        ended = await node.error("query", name="old", sql=SELECT_BRANCH)
        assert "not queryable" in ended["message"]
        told = await node.result("lastError", name="old")
        assert told["code"] == "57P01"
        await node.result("connect", name="new", kind="client")
        now = await node.result("query", name="new", sql=SELECT_BRANCH)
        assert now["rows"] == [{"name": "dev"}]


async def test_terminate_ends_websocket_sessions_on_the_old_branch(daemon: LocalDaemon) -> None:
    async with driver(daemon) as node:
        await node.result("connect", name="old", kind="client")
        await daemon.use("dev", sessions="terminate")
        server = daemon.daemon.server
        assert server is not None
        told = None
        # The driver hears of it between queries, as soon as its event loop turns.
        for _ in range(100):
            told = await node.result("lastError", name="old")
            if told and not [s for s in server.sessions if s.branch == "main"]:
                break
            await asyncio.sleep(0.1)
        assert not [s for s in server.sessions if s.branch == "main"]
        assert told is not None
        assert told.get("code") == "57P01", told


@pytest.fixture
async def daemon_without_passwords(
    workdir: Path, computes: dict[str, LocalCompute], ca_file: Path
) -> AsyncIterator[LocalDaemon]:
    """Branch URLs with no password: TCP clients' own logins are relayed to the server."""
    urls = {name: c.url(ca_file=ca_file, password=False) for name, c in computes.items()}
    config = write_config(workdir / "config.toml", urls, branch="main")
    async with running_daemon(config, daemon_env(workdir)) as running:
        yield running


async def test_without_a_password_in_the_branch_url_the_drivers_own_logs_in(
    daemon_without_passwords: LocalDaemon,
) -> None:
    """The driver can only give a cleartext password: the daemon logs in upstream with it,
    over a WebSocket and over HTTP, and the server decides."""
    daemon = daemon_without_passwords
    async with driver(daemon) as node:
        await node.result("connect", name="c", kind="client")
        over_ws = await node.result("query", name="c", sql=SELECT_BRANCH)
        assert over_ws["rows"] == [{"name": "main"}]
        await node.result("end", name="c")
        assert await node.result("sql", sql=SELECT_BRANCH) == [{"name": "main"}]
    async with driver(daemon, database_url(daemon, "not-the-password")) as node:
        refused_http = await node.error("sql", sql=SELECT_BRANCH)
        # The driver pipelines its login: connect() returns, the first query hears the refusal.
        await node.result("connect", name="c", kind="client")
        refused_ws = await node.error("query", name="c", sql=SELECT_BRANCH)
    assert refused_http["code"] == refused_ws["code"] == "28P01"
    assert "neondb_owner" in refused_http["message"]


# --- SQL over HTTP (neon()) ----------------------------------------------------------------------


async def test_neon_http_parameters_of_many_types(daemon: LocalDaemon) -> None:
    sql = (
        "SELECT $1::int AS i, $2::bigint AS b, $3::numeric AS n, $4::text AS t, $5::bool AS o,"
        " $6::json AS j, $7::jsonb AS jb, $8::timestamptz AS ts, $9::bytea AS by,"
        " $10::int[] AS a, $11::text[] AS ta, $12::text AS nothing"
    )
    params = [
        42, "9007199254740993", "12345.678901234567890", "it's \"quoted\" ü", True,
        {"k": [1, "x"]}, {"b": None}, "2024-01-02T03:04:05.678Z", "\\x00ff10",
        [1, 2, 3], ["a", "b c", None], None,
    ]  # fmt: skip
    async with driver(daemon) as node:
        rows = await node.result("sql", sql=sql, params=params)
    assert rows == [
        {
            "i": 42,
            "b": "9007199254740993",
            "n": "12345.678901234567890",
            "t": 'it\'s "quoted" ü',
            "o": True,
            "j": {"k": [1, "x"]},
            "jb": {"b": None},
            "ts": "2024-01-02T03:04:05.678Z",
            "by": {"bytea": "00ff10"},
            "a": [1, 2, 3],
            "ta": ["a", "b c", None],
            "nothing": None,
        }
    ]


async def test_neon_http_full_results_have_the_edges_shape(daemon: LocalDaemon) -> None:
    async with driver(daemon) as node:
        full = await node.result(
            "sql",
            sql="SELECT name, 1::int2 AS small FROM branch_info",
            opts={"fullResults": True, "arrayMode": True},
        )
        insert = await node.result(
            "sql",
            sql="INSERT INTO branch_info SELECT 'x' WHERE false",
            opts={"fullResults": True},
        )
    assert [f["name"] for f in full["fields"]] == ["name", "small"]
    assert full["fields"][1] == {
        "name": "small",
        "dataTypeID": 21,
        "tableID": 0,
        "columnID": 0,
        "dataTypeSize": 2,
        "dataTypeModifier": -1,
        "format": "text",
    }
    assert full["fields"][0]["tableID"] > 0
    assert full["fields"][0]["columnID"] == 1
    assert full["rows"] == [["main", 1]]
    assert (full["command"], full["rowCount"], full["rowAsArray"]) == ("SELECT", 1, True)
    assert (insert["command"], insert["rowCount"]) == ("INSERT", 0)


async def test_a_failing_statement_rolls_the_whole_transaction_back(daemon: LocalDaemon) -> None:
    async with driver(daemon) as node:
        await node.result("sql", sql="DROP TABLE IF EXISTS sls_tx")
        await node.result("sql", sql="CREATE TABLE sls_tx (n int)")
        try:
            error = await node.error(
                "transaction",
                queries=[
                    {"sql": "INSERT INTO sls_tx VALUES ($1)", "params": [1]},
                    {"sql": "SELECT 1/0"},
                ],
            )
            assert error["code"] == "22012"
            assert error["message"] == "division by zero"
            count = await node.result("sql", sql="SELECT count(*)::int AS n FROM sls_tx")
            assert count == [{"n": 0}]
            results = await node.result(
                "transaction",
                queries=[
                    {"sql": "INSERT INTO sls_tx VALUES ($1)", "params": [2]},
                    {"sql": "SELECT current_setting('transaction_isolation') AS level"},
                ],
                opts={"isolationLevel": "Serializable", "readOnly": False},
            )
            assert results == [[], [{"level": "serializable"}]]
            read_only = await node.error(
                "transaction",
                queries=[{"sql": "INSERT INTO sls_tx VALUES (3)"}],
                opts={"readOnly": True},
            )
            assert read_only["code"] == "25006"
        finally:
            await node.result("sql", sql="DROP TABLE sls_tx")


async def test_neon_http_errors_carry_the_postgres_fields(daemon: LocalDaemon) -> None:
    async with driver(daemon) as node:
        error = await node.error("sql", sql="SELECT nosuchcolumn FROM branch_info")
    assert error["code"] == "42703"
    assert error["name"] == "NeonDbError"
    assert error["position"] == "8"
    assert 'column "nosuchcolumn" does not exist' in error["message"]


async def test_neon_http_follows_use_and_reuses_upstream_sessions(daemon: LocalDaemon) -> None:
    pid = "SELECT pg_backend_pid() AS pid"
    async with driver(daemon) as node:
        first = await node.result("sql", sql=pid)
        assert await node.result("sql", sql=pid) == first
        await daemon.use("dev")
        assert await node.result("sql", sql=SELECT_BRANCH) == [{"name": "dev"}]


async def test_idle_http_sessions_close_after_a_short_time(
    daemon: LocalDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("neonlocal.serverless.pool.IDLE_TIMEOUT_S", 0.2)
    server = daemon.daemon.server
    assert server is not None
    async with driver(daemon) as node:
        await node.result("sql", sql=SELECT_BRANCH)
        assert len(server.sessions) == 1
        await asyncio.sleep(0.6)
        assert len(server.sessions) == 0


async def test_answers_over_10_mib_are_refused_with_a_clear_error(daemon: LocalDaemon) -> None:
    async with driver(daemon) as node:
        error = await node.error("sql", sql="SELECT repeat('x', 11 * 1024 * 1024)")
        assert "response is too large (max is 10485760 bytes)" in error["message"]
        # The session is still good.
        assert await node.result("sql", sql=SELECT_BRANCH) == [{"name": "main"}]


# --- Drizzle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("orm_driver", ["neon-http", "neon-serverless"])
async def test_drizzle_inserts_and_selects_through_the_daemon(
    daemon: LocalDaemon, orm_driver: str
) -> None:
    table = "sls_drizzle_" + orm_driver.replace("-", "_")
    async with driver(daemon) as node:
        await node.result("sql", sql=f"DROP TABLE IF EXISTS {table}")
        await node.result("sql", sql=f"CREATE TABLE {table} (id int, name text)")
        try:
            outcome = await node.result("drizzle", driver=orm_driver, table=table)
        finally:
            await node.result("sql", sql=f"DROP TABLE {table}")
    assert outcome == {
        "inserted": [{"id": 1, "name": orm_driver}],
        "selected": [{"id": 1, "name": orm_driver}],
    }


# --- Prisma -----------------------------------------------------------------------------------

PRISMA_CLI = NODE_DIR / "node_modules" / "prisma" / "build" / "index.js"
PRISMA_NODE = (20, 19)  # the oldest Node.js Prisma 7 runs on
PRISMA_TABLE = "sls_prisma_items"  # the model's table in tests/node/prisma/schema.prisma
# `prisma generate` with no network: no update check or telemetry, and the schema engine (a
# native binary from Prisma's own server, run by migrate only) replaced by a failing stub.
PRISMA_OFFLINE = {
    "CHECKPOINT_DISABLE": "1",
    "PRISMA_HIDE_UPDATE_MESSAGE": "1",
    "PRISMA_SCHEMA_ENGINE_BINARY": str(NODE_DIR / "prisma" / "no-schema-engine"),
}


@pytest.fixture(scope="module")
def prisma_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client `prisma generate` writes for tests/node/prisma/schema.prisma, in a temp dir."""
    if not PRISMA_CLI.is_file():
        pytest.skip(f"prisma is not installed: run `npm ci` in {NODE_DIR}")
    assert NODE is not None
    version = subprocess.run([NODE, "-p", "process.versions.node"], capture_output=True, text=True)
    if tuple(int(part) for part in version.stdout.split(".")[:2]) < PRISMA_NODE:
        pytest.skip(f"Prisma 7 needs Node.js 20.19 or later, not {version.stdout.strip()}")
    where = tmp_path_factory.mktemp("prisma")
    shutil.copy(NODE_DIR / "prisma" / "schema.prisma", where)
    # The generated client imports Prisma's runtime; Node looks for it in ../node_modules.
    (where / "node_modules").symlink_to(NODE_DIR / "node_modules")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_", "PRISMA_"))}
    generate = subprocess.run(
        [NODE, str(PRISMA_CLI), "generate", "--schema", "schema.prisma"],
        cwd=where, env=env | PRISMA_OFFLINE, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert generate.returncode == 0, generate.stdout + generate.stderr
    return where / "generated"


@contextlib.asynccontextmanager
async def prisma_table(node: Driver) -> AsyncIterator[None]:
    await node.result("sql", sql=f"DROP TABLE IF EXISTS {PRISMA_TABLE}")
    await node.result("sql", sql=f"CREATE TABLE {PRISMA_TABLE} (id int PRIMARY KEY, name text)")
    try:
        yield
    finally:
        await node.result("sql", sql=f"DROP TABLE {PRISMA_TABLE}")


@pytest.mark.parametrize("adapter", ["neon", "neon-http"])
async def test_prisma_inserts_and_selects_through_the_daemon(
    daemon: LocalDaemon, branch_urls: dict[str, str], prisma_client: Path, adapter: str
) -> None:
    """PrismaNeon (a Pool of WebSocket sessions) and PrismaNeonHttp; the row is on the branch."""
    async with driver(daemon) as node, prisma_table(node):
        await node.result("prisma", name="orm", adapter=adapter, client=str(prisma_client))
        row = {"id": 1, "name": adapter}
        created = await node.result("prismaRun", name="orm", action="create", data=row)
        items = await node.result("prismaRun", name="orm", action="items")
        async with await psycopg.AsyncConnection.connect(branch_urls["main"]) as direct:
            cursor = await direct.execute("SELECT id, name FROM sls_prisma_items")
            on_branch = await cursor.fetchall()
    assert created == row
    assert items == [row]
    assert on_branch == [(1, adapter)]


@pytest.mark.parametrize("adapter", ["neon", "neon-http"])
async def test_use_moves_prismas_next_query(
    daemon: LocalDaemon, prisma_client: Path, adapter: str
) -> None:
    async with driver(daemon) as node:
        await node.result("prisma", name="orm", adapter=adapter, client=str(prisma_client))
        assert await node.result("prismaRun", name="orm", action="branch") == [{"name": "main"}]
        await daemon.use("dev")
        await asyncio.sleep(0.2)
        assert await node.result("prismaRun", name="orm", action="branch") == [{"name": "dev"}]


# --- the PostgreSQL protocol in a WebSocket, byte for byte --------------------------------------


class RawWebSocket:
    """A WebSocket client speaking raw PostgreSQL messages, as the driver does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._received = bytearray()

    async def open(self, path: str = "/v2") -> None:
        self._writer.write(self._ws.send(Request(host="localhost", target=path)))
        while not any(isinstance(e, AcceptConnection) for e in await self._events()):
            pass

    async def _events(self) -> list[object]:
        data = await asyncio.wait_for(self._reader.read(65536), 10)
        assert data, "the daemon closed the connection"
        self._ws.receive_data(data)
        return list(self._ws.events())

    def send(self, data: bytes) -> None:
        self._writer.write(self._ws.send(BytesMessage(data=data)))

    def send_text(self, text: str) -> None:
        self._writer.write(self._ws.send(TextMessage(data=text)))

    async def read_to_end(self) -> bytes:
        """The raw bytes the daemon still sends, until it closes."""
        return await asyncio.wait_for(self._reader.read(), 10)

    async def read_until_ready(self) -> list[rawpg.Message]:
        """Backend messages up to and including the next ReadyForQuery."""
        while True:
            messages = _whole_messages(bytes(self._received))
            for index, message in enumerate(messages):
                if message.kind == b"Z":
                    consumed = sum(5 + len(m.payload) for m in messages[: index + 1])
                    del self._received[:consumed]
                    return messages[: index + 1]
            for event in await self._events():
                if isinstance(event, BytesMessage):
                    self._received += event.data


def _whole_messages(data: bytes) -> list[rawpg.Message]:
    out, pos = [], 0
    while len(data) - pos >= 5:
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if len(data) - pos < 1 + length:
            break
        out.append(rawpg.Message(data[pos : pos + 1], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


@contextlib.asynccontextmanager
async def raw_websocket(port: int) -> AsyncIterator[RawWebSocket]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        ws = RawWebSocket(reader, writer)
        await ws.open()
        yield ws
    finally:
        writer.close()


LOGIN = {"user": "neondb_owner", "database": "neondb"}


async def test_a_websocket_session_gets_the_branch_parameter_and_a_working_cancel_key(
    daemon: LocalDaemon,
) -> None:
    """Startup, password and a query in one frame, as the driver pipelines them; then a
    cancel with the session's key (over TCP, as any cancel) stops its query."""
    async with raw_websocket(daemon.port) as ws:
        ws.send(rawpg.startup(LOGIN) + rawpg.typed(b"p", b"x\0") + rawpg.query("SELECT 1"))
        login = await ws.read_until_ready()
        assert login[0].payload == (3).to_bytes(4, "big")  # AuthenticationCleartextPassword
        status = dict(rawpg.parameter_status(m) for m in login if m.kind == b"S")
        assert status["neonlocal.branch"] == "main"
        key = next(m.payload for m in login if m.kind == b"K")
        answer = await ws.read_until_ready()
        assert [m.kind for m in answer] == [b"T", b"D", b"C", b"Z"]
        ws.send(rawpg.query("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(
            rawpg.exchange,
            "127.0.0.1",
            daemon.port,
            rawpg.cancel_request(int.from_bytes(key[:4], "big"), key[4:]),
        )
        cancelled = await asyncio.wait_for(ws.read_until_ready(), 10)
        errors = [rawpg.parse_error(m.payload) for m in cancelled if m.kind == b"E"]
        assert [e.sqlstate for e in errors] == ["57014"]


async def test_text_frames_are_refused(daemon: LocalDaemon) -> None:
    """The PostgreSQL protocol travels in binary frames only; a text frame ends the socket."""
    async with raw_websocket(daemon.port) as ws:
        ws.send_text("SELECT 1")
        data = await ws.read_to_end()
    assert data[:1] == b"\x88"  # a Close frame
    assert int.from_bytes(data[2:4], "big") == 1003


# --- HTTP on the PostgreSQL port -----------------------------------------------------------------


async def http_exchange(port: int, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send one raw request; the status and JSON body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        body = await reader.readexactly(int(headers["content-length"]))
    finally:
        writer.close()
    return int(lines[0].split(" ")[1]), json.loads(body)


def sql_request(daemon: LocalDaemon, body: bytes, *, length: int | None = None) -> bytes:
    head = (
        f"POST /sql HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Neon-Connection-String: {database_url(daemon)}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


async def test_an_http_request_for_another_path_is_answered_in_http(daemon: LocalDaemon) -> None:
    status, body = await http_exchange(
        daemon.port, b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert status == 404
    assert "POST /sql" in body["message"]


async def test_sql_over_http_with_raw_requests(daemon: LocalDaemon) -> None:
    """Without Neon-Raw-Text-Output values come back as JSON, as the edge converts them."""
    query = json.dumps({"query": "SELECT $1::int AS n, true AS t, '{\"a\":1}'::jsonb AS j",
                        "params": [7]}).encode()  # fmt: skip
    status, body = await http_exchange(daemon.port, sql_request(daemon, query))
    assert status == 200
    assert body["rows"] == [{"n": 7, "t": True, "j": {"a": 1}}]
    status, body = await http_exchange(daemon.port, sql_request(daemon, b"{not json"))
    assert status == 400
    assert "not valid JSON" in body["message"]


async def test_a_request_over_10_mib_is_refused_before_it_is_read(daemon: LocalDaemon) -> None:
    size = 11 * 1024 * 1024
    status, body = await http_exchange(
        daemon.port, sql_request(daemon, b"x" * (10 * 1024 * 1024 + 1024), length=size)
    )
    assert status == 413
    assert body["message"] == "request is too large (max is 10485760 bytes)"


async def test_local_password_is_checked_for_both_http_and_websockets(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    config = write_config(
        workdir / "config.toml", branch_urls, branch="main", extra='[local]\npassword = "localpw"'
    )
    async with running_daemon(config, daemon_env(workdir)) as daemon:
        async with driver(daemon, database_url(daemon, "localpw")) as node:
            assert await node.result("sql", sql=SELECT_BRANCH) == [{"name": "main"}]
            await node.result("connect", name="c", kind="client")
            assert (await node.result("query", name="c", sql=SELECT_BRANCH))["rows"] == [
                {"name": "main"}
            ]
        async with driver(daemon, database_url(daemon, "wrong")) as node:
            refused = await node.error("sql", sql=SELECT_BRANCH)
            assert refused["code"] == "28P01"
            assert 'password authentication failed for user "neondb_owner"' in refused["message"]
            # With pipelineConnect the driver's connect() resolves before the server answers.
            await node.call("connect", name="c", kind="client")
            # The refusal may come before the query is asked: then the client says it first.
            refused = await node.error("query", name="c", sql=SELECT_BRANCH)
            if "code" not in refused:
                refused = await node.result("lastError", name="c")
            assert refused["code"] == "28P01"


async def test_trust_mode_takes_any_password_as_the_edge_would_check_its_own(
    daemon: LocalDaemon,
) -> None:
    async with driver(daemon, database_url(daemon, "anything")) as node:
        assert await node.result("sql", sql=SELECT_BRANCH) == [{"name": "main"}]
        await node.result("connect", name="c", kind="client")
        assert (await node.result("query", name="c", sql=SELECT_BRANCH))["rows"] == [
            {"name": "main"}
        ]


async def test_an_http_connection_that_never_finishes_its_request_is_closed(
    daemon: LocalDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("neonlocal.serverless.http.IDLE_TIMEOUT_S", 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        writer.write(b"POST /sql HTTP/1.1\r\nHost: local")
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_a_client_hanging_up_mid_query_leaves_no_session_behind(daemon: LocalDaemon) -> None:
    server = daemon.daemon.server
    assert server is not None
    body = json.dumps({"query": "SELECT pg_sleep(1)"}).encode()
    _reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(sql_request(daemon, body))
    await asyncio.sleep(0.3)
    assert len(server.sessions) == 1
    writer.close()
    for _ in range(50):
        if not server.sessions:
            break
        await asyncio.sleep(0.1)
    assert not server.sessions


async def test_https_and_wss_with_the_local_certificate(daemon: LocalDaemon) -> None:
    """After `neonlocal trust`, an app may keep useSecureWebSocket = true and https."""
    async with driver(daemon, secure=True) as node:
        assert await node.result("sql", sql=SELECT_BRANCH) == [{"name": "main"}]
        await node.result("connect", name="c", kind="client")
        assert (await node.result("query", name="c", sql=SELECT_BRANCH))["rows"] == [
            {"name": "main"}
        ]


async def test_requests_sent_back_to_back_on_one_connection_are_answered_in_order(
    daemon: LocalDaemon,
) -> None:
    first = json.dumps({"query": "SELECT 1 AS n"}).encode()
    second = json.dumps({"query": "SELECT 2 AS n"}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        writer.write(sql_request(daemon, first) + sql_request(daemon, second))
        answers = []
        for _ in range(2):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answers.append(json.loads(await reader.readexactly(length))["rows"])
    finally:
        writer.close()
    assert answers == [[{"n": 1}], [{"n": 2}]]


async def test_a_pinned_port_serves_the_driver_on_its_own_branch(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """Each [ports] port is a server of its own: HTTP and WebSockets there stay on its branch."""
    pinned = free_port("127.0.0.1")
    config = write_config(
        workdir / "config.toml", branch_urls, branch="main", extra=f'[ports]\n{pinned} = "dev"'
    )
    async with (
        running_daemon(config, daemon_env(workdir)) as daemon,
        driver(daemon, port=pinned) as node,
    ):
        assert await node.result("sql", sql=SELECT_BRANCH) == [{"name": "dev"}]
        await node.result("connect", name="c", kind="client")
        rows = await node.result("query", name="c", sql=SELECT_BRANCH)
        assert rows["rows"] == [{"name": "dev"}]


async def test_require_tls_and_tls_auth_hold_for_https_and_wss(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    """[local] require_tls refuses plain http and ws; over https and wss, tls_auth = "password"
    asks for the branch role's own password, as it does of TCP clients over TLS."""
    config = write_config(
        workdir / "config.toml",
        branch_urls,
        branch="main",
        extra='[local]\nrequire_tls = true\ntls_auth = "password"',
    )
    async with running_daemon(config, daemon_env(workdir)) as daemon:
        async with driver(daemon) as node:
            refused = await node.error("sql", sql=SELECT_BRANCH)
            assert refused["code"] == "28000"
            assert "requires TLS" in refused["message"]
        async with driver(daemon, secure=True) as node:
            assert await node.result("sql", sql=SELECT_BRANCH) == [{"name": "main"}]
            await node.result("connect", name="c", kind="client")
            rows = await node.result("query", name="c", sql=SELECT_BRANCH)
            assert rows["rows"] == [{"name": "main"}]
        async with driver(daemon, database_url(daemon, "wrong"), secure=True) as node:
            refused = await node.error("sql", sql=SELECT_BRANCH)
            assert refused["code"] == "28P01"
