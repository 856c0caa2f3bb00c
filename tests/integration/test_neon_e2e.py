"""Branches by name through the Neon API, end to end: the real CLI and daemon, the API
stand-in, and real TLS + SCRAM PostgreSQL computes behind Neon-style host names.

The stand-in hands out the computes' host names; ``[network] resolve`` maps each to the
compute's loopback address, and ``[neon] sslrootcert`` is the test CA.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import psycopg
import pytest
import structlog
from click.testing import CliRunner, Result

from fixtures.daemon import (
    LocalDaemon,
    daemon_env,
    neonlocal_cmd,
    running_daemon,
    start_daemon_process,
    toml_string,
)
from fixtures.pg import TEST_PASSWORD, MakeCompute
from neon_standin import FakeBranch, NeonStandIn
from neonlocal.cli import main
from neonlocal.errors import StartupError
from neonlocal.localpg import LocalCompute

pytestmark = pytest.mark.pg

# Branches created through the API get this host; it leads to the "dev" compute.
CREATED_HOST = "ep-created-300003.us-east-2.aws.neon.tech"
STALE_PASSWORD = "npg_Stale-Password-1"


@dataclass(frozen=True)
class Done:
    code: int
    out: str
    err: str


@dataclass
class NeonSetup:
    """A config file and environment pointing neonlocal at the stand-in and the computes."""

    workdir: Path
    standin: NeonStandIn
    ca_file: Path
    resolve: dict[str, str]
    config: Path = field(init=False)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.workdir / "config.toml"
        env = daemon_env(self.workdir)
        env.pop("NEON_API_HOST", None)
        env["NEON_API_KEY"] = self.standin.api_key
        self.env = env
        self.write()

    def write(
        self,
        *,
        branch: str | None = "main",
        project_id: str | None = None,
        api_url: str | None = None,
        extra: str = "",
    ) -> Path:
        lines = [f"branch = {toml_string(branch)}"] if branch else []
        lines += ["", "[listen]", 'host = ["127.0.0.1"]', "port = 0", ""]
        lines += [
            "[neon]",
            f"project_id = {toml_string(project_id or self.standin.project_id)}",
            f"api_url = {toml_string(api_url or self.standin.base_url)}",
            f"sslrootcert = {toml_string(str(self.ca_file))}",
            "",
            "[network.resolve]",
            *(f"{toml_string(host)} = {toml_string(addr)}" for host, addr in self.resolve.items()),
            "",
            extra,
        ]
        self.config.write_text("\n".join(lines))
        self.config.chmod(0o600)
        return self.config

    async def cli(self, *args: str, stdin: str = "", env: Mapping[str, str] | None = None) -> Done:
        """`neonlocal --config PATH ARGS...` in its own process, as a user runs it."""
        proc = await asyncio.create_subprocess_exec(
            *neonlocal_cmd("--config", str(self.config), *args),
            env=dict(env or self.env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
        assert proc.returncode is not None
        return Done(proc.returncode, out.decode(), err.decode())

    async def run(
        self, *args: str, stdin: str = "", env: Mapping[str, str | None] | None = None
    ) -> Done:
        """The same command in this process (quicker), for tests with no daemon in it.

        Only for those: the command's output capture and logging setup are process-wide.
        """
        overrides: dict[str, str | None] = {"NEON_API_HOST": None, "NEON_API_KEY": None}
        overrides.update({k: v for k, v in self.env.items() if not k.startswith("NEON")})
        overrides.update(env if env is not None else {"NEON_API_KEY": self.standin.api_key})
        argv = ["--config", str(self.config), *args]

        def invoke() -> Result:
            saved = structlog.get_config()
            try:
                return CliRunner().invoke(main, argv, input=stdin, env=overrides)
            finally:
                structlog.configure(**saved)

        result = await asyncio.to_thread(invoke)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Done(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def standin(compute_main: LocalCompute, compute_dev: LocalCompute) -> Iterator[NeonStandIn]:
    """The project: "main" (default) and "dev" on the shared computes, same password."""
    with NeonStandIn(main_host=compute_main.spec.hostname, password=TEST_PASSWORD) as api:
        api.add_branch("dev", host=compute_dev.spec.hostname)
        api.host_factory = lambda _name: CREATED_HOST
        yield api


@pytest.fixture
def setup(
    workdir: Path,
    standin: NeonStandIn,
    ca_file: Path,
    compute_main: LocalCompute,
    compute_dev: LocalCompute,
) -> NeonSetup:
    resolve = {
        compute_main.spec.hostname: compute_main.spec.listen_addr,
        compute_dev.spec.hostname: compute_dev.spec.listen_addr,
        CREATED_HOST: compute_dev.spec.listen_addr,
    }
    return NeonSetup(workdir, standin, ca_file, resolve)


async def branch_via(daemon: LocalDaemon) -> str:
    """Which compute a new connection through the daemon lands on (its branch_info row)."""
    conn = await asyncpg.connect(daemon.url())
    try:
        name = await conn.fetchval("SELECT name FROM branch_info")
    finally:
        await conn.close()
    assert isinstance(name, str)
    return name


async def refused(daemon: LocalDaemon) -> asyncpg.PostgresError:
    # sslmode=disable: one attempt (asyncpg's default "prefer" tries again without TLS).
    with pytest.raises(asyncpg.PostgresError) as caught:
        await asyncpg.connect(daemon.url(sslmode="disable"))
    return caught.value


def dead_api_url() -> str:
    """An API URL where nothing listens (a port that was just free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/api/v2"


# --- use, create, reset, delete -------------------------------------------------------------


async def test_use_finds_a_branch_by_name_and_new_connections_reach_it(
    setup: NeonSetup, compute_dev: LocalCompute
) -> None:
    async with running_daemon(setup.config, setup.env) as daemon:
        assert await branch_via(daemon) == "main"

        done = await setup.cli("use", "dev")

        assert done.code == 0, done.err
        assert done.out.splitlines() == [
            f"localhost:{daemon.port} -> dev ({compute_dev.spec.hostname}:5432)"
        ]
        assert await branch_via(daemon) == "dev"
        assert daemon.status()["branch"] == "dev"
        assert TEST_PASSWORD not in done.out + done.err
        assert "branch = " in setup.config.read_text()
        assert TEST_PASSWORD not in setup.config.read_text()


async def test_use_asks_the_api_afresh_so_a_branch_made_again_is_reached_where_it_is_now(
    setup: NeonSetup, compute_main: LocalCompute
) -> None:
    async with running_daemon(setup.config, setup.env) as daemon:
        assert (await setup.cli("use", "dev")).code == 0
        assert (await setup.cli("use", "main")).code == 0
        # Someone deletes "dev" and makes it again: same name, another compute.
        setup.standin.branch("dev").endpoints[0].host = compute_main.spec.hostname

        done = await setup.cli("use", "dev")

        assert done.code == 0, done.err
        assert f"-> dev ({compute_main.spec.hostname}:5432)" in done.out
        assert await branch_via(daemon) == "main"  # the compute "dev" has now


async def test_use_create_makes_a_branch_with_a_compute_a_mark_and_an_expiry(
    setup: NeonSetup,
) -> None:
    async with running_daemon(setup.config, setup.env) as daemon:
        done = await setup.cli(
            "use", "dev-juan", "--create", "--parent", "dev", "--expires-in", "7d"
        )

        assert done.code == 0, done.err
        assert done.out.splitlines() == [
            f"localhost:{daemon.port} -> dev-juan ({CREATED_HOST}:5432)"
        ]
        assert "created branch dev-juan from dev, expires " in done.err
        [create] = setup.standin.requests_to("create_branch")
        assert create.body["endpoints"] == [{"type": "read_write"}]
        assert create.body["annotation_value"] == {"created-by": "neonlocal"}
        assert create.body["branch"]["name"] == "dev-juan"
        assert create.body["branch"]["parent_id"] == setup.standin.branch("dev").id
        expires = datetime.fromisoformat(create.body["branch"]["expires_at"])
        assert timedelta(days=7, minutes=-5) < expires - datetime.now(UTC) <= timedelta(days=7)
        # Nothing touched the branch before its operations finished.
        assert setup.standin.requests_to("get_operation")
        assert all(op.status(float("inf")) == "finished" for op in setup.standin.operations())
        assert await branch_via(daemon) == "dev"  # the new branch's compute (a copy of dev)
        assert daemon.status()["branch"] == "dev-juan"


async def test_use_create_of_an_existing_branch_just_uses_it(setup: NeonSetup) -> None:
    done = await setup.run("use", "dev", "--create")
    assert done.code == 0, done.err
    assert "branch dev already exists; using it as it is" in done.err
    assert setup.standin.requests_to("create_branch") == []


async def test_branch_reset_asks_first_then_restores_from_the_parent(setup: NeonSetup) -> None:
    declined = await setup.run("branch", "reset", "dev", stdin="n\n")
    assert declined.code == 1
    assert "Reset dev to the latest state of main?" in declined.out
    assert declined.err.strip() == "neonlocal: nothing was reset"
    assert setup.standin.requests_to("restore_branch") == []

    done = await setup.run("branch", "reset", "dev", "--yes")

    assert done.code == 0, done.err
    assert done.out.strip() == "reset dev to main; new connections see its data"
    [restore] = setup.standin.requests_to("restore_branch")
    assert restore.path.endswith(f"/branches/{setup.standin.branch('dev').id}/restore")
    assert restore.body == {"source_branch_id": setup.standin.branch("main").id}


async def test_branch_delete_removes_a_branch_but_never_the_default_or_a_protected_one(
    setup: NeonSetup,
) -> None:
    doomed = setup.standin.add_branch("scratch")
    setup.standin.add_branch("prod", protected=True)

    done = await setup.run("branch", "delete", "scratch", "--yes")

    assert done.code == 0, done.err
    assert done.out.strip() == "deleted branch scratch"
    assert not setup.standin.has_branch("scratch")
    for name, why in (("main", "the project's default branch"), ("prod", "a protected branch")):
        no = await setup.run("branch", "delete", name, "--yes")
        assert no.code == 1
        assert no.err.strip() == f"neonlocal: refusing to delete branch '{name}': it is {why}"
        assert setup.standin.has_branch(name)
    assert [r.path.rsplit("/", 1)[1] for r in setup.standin.requests_to("delete_branch")] == [
        doomed.id
    ]


async def test_branches_lists_state_compute_parent_and_expiry_and_marks_the_selected(
    setup: NeonSetup,
) -> None:
    setup.standin.add_branch("preview", parent="dev", expires_at="2099-01-02T03:04:05Z")
    setup.standin.branch("dev").endpoints[0].state = "active"
    setup.write(branch="dev")

    done = await setup.run("branches")

    assert done.code == 0, done.err
    header, *lines = done.out.splitlines()
    assert header.split() == ["NAME", "ID", "STATE", "COMPUTE", "PARENT", "EXPIRES"]
    rows = {line[2:].split()[0]: (line[:2].strip(), line[2:].split()[1:]) for line in lines}
    dev_id = setup.standin.branch("dev").id
    assert rows["dev"] == ("*", [dev_id, "ready", "active", "main", "-"])
    assert rows["preview"][0] == ""
    assert rows["preview"][1][1:] == ["ready", "idle", "dev", "2099-01-02", "03:04", "UTC"]
    assert rows["main"][1][:1] == ["(default)"]
    listed = json.loads((await setup.run("branches", "--json")).out)
    assert {b["name"]: (b["selected"], b["parent"]) for b in listed} == {
        "dev": (True, "main"), "main": (False, None), "preview": (False, "dev"),
    }  # fmt: skip


async def test_init_checks_the_key_stores_it_privately_and_writes_the_project(
    setup: NeonSetup,
) -> None:
    setup.config.unlink()
    env = {"NEON_API_KEY": None, "NEON_API_HOST": setup.standin.base_url}

    wrong = await setup.run("init", stdin="napi_wrong-key\n", env=env)
    assert wrong.code == 1
    assert wrong.err.startswith("neonlocal: the Neon API key was rejected; create a new one at ")
    assert not setup.config.exists()
    assert not (setup.workdir / "neon-api-key").exists()

    done = await setup.run("init", stdin=f"{setup.standin.api_key}\n", env=env)

    assert done.code == 0, done.err
    key_file = setup.workdir / "neon-api-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() == setup.standin.api_key
    assert setup.standin.api_key not in done.out + done.err
    written = setup.config.read_text()
    assert f'project_id = "{setup.standin.project_id}"' in written
    assert f'api_key_file = "{key_file}"' in written
    assert stat.S_IMODE(setup.config.stat().st_mode) == 0o600
    # From now on the key comes from the file alone.
    listed = await setup.run("branches", env=env)
    assert listed.code == 0, listed.err
    assert "dev" in listed.out


# --- password refresh and computes ------------------------------------------------------------


async def test_a_reset_that_changes_the_password_is_survived_by_fetching_the_new_one(
    setup: NeonSetup, make_compute: MakeCompute, capsys: pytest.CaptureFixture[str]
) -> None:
    compute = make_compute("resettable")
    setup.resolve[compute.spec.hostname] = compute.spec.listen_addr
    setup.standin.add_branch("feature", host=compute.spec.hostname)
    new_password = "npg_After-Reset-77"

    def on_restore(branch: FakeBranch, _source: FakeBranch) -> None:
        # What a Neon reset can do: the role comes back with another password.
        branch.roles["neondb_owner"] = new_password
        compute.psql(f"ALTER ROLE neondb_owner PASSWORD '{new_password}'")

    setup.standin.on_restore = on_restore
    setup.write(branch="feature")
    async with running_daemon(setup.config, setup.env) as daemon:
        assert await branch_via(daemon) == "resettable"
        done = await setup.cli("branch", "reset", "feature", "--yes")
        assert done.code == 0, done.err
        reveals = len(setup.standin.requests_to("reveal_password"))

        assert await branch_via(daemon) == "resettable"  # no error reached the client

        assert len(setup.standin.requests_to("reveal_password")) == reveals + 1
        assert await branch_via(daemon) == "resettable"
        assert len(setup.standin.requests_to("reveal_password")) == reveals + 1
    out = capsys.readouterr().out
    assert "credentials_refreshed" in out
    assert new_password not in out
    assert TEST_PASSWORD not in out


async def test_a_suspended_compute_is_logged_as_waking_and_nothing_polls_it(
    setup: NeonSetup, capsys: pytest.CaptureFixture[str]
) -> None:
    setup.standin.branch("dev").endpoints[0].state = "active"
    setup.write(branch="dev")
    async with running_daemon(setup.config, setup.env) as daemon:
        started = capsys.readouterr().out
        assert "branch_resolved" in started
        assert "compute_waking" not in started

        assert (await daemon.use("main"))["ok"]

        switched = capsys.readouterr().out
        waking = [line for line in switched.splitlines() if "compute_waking" in line]
        assert len(waking) == 1
        assert "branch=main" in waking[0]
        assert "compute=idle" in waking[0]
        asked = len(setup.standin.requests)
        assert await branch_via(daemon) == "main"
        # The client's connection woke the compute; the API was not asked about it.
        assert len(setup.standin.requests) == asked


async def test_a_daemon_that_loses_the_api_keeps_serving_what_it_resolved(
    setup: NeonSetup,
) -> None:
    setup.standin.add_branch("never-used")
    async with running_daemon(setup.config, setup.env) as daemon:
        assert (await daemon.use("dev"))["ok"]
        setup.write(branch="dev", api_url=dead_api_url())  # from now on nothing answers

        back = await daemon.use("main")
        assert back["ok"], back
        assert await branch_via(daemon) == "main"

        unreachable = await daemon.use("never-used")
        assert not unreachable["ok"]
        assert "cannot reach the Neon API" in unreachable["error"]
        assert daemon.status()["branch"] == "main"
        assert await branch_via(daemon) == "main"


# --- ephemeral branches ----------------------------------------------------------------------


def test_up_ephemeral_serves_a_fresh_branch_and_deletes_it_on_sigterm(setup: NeonSetup) -> None:
    proc = start_daemon_process(setup.config, setup.env, "--ephemeral", "--parent", "dev")
    try:
        status = proc.wait_ready()
        name = status["ephemeral_branch"]
        assert isinstance(name, str)
        assert name.startswith("neonlocal-ephemeral-")
        assert status["branch"] == name
        branch = setup.standin.branch(name)
        assert branch.parent_id == setup.standin.branch("dev").id
        assert branch.annotations == {"created-by": "neonlocal", "purpose": "ephemeral"}
        port = int(status["listen"][0].rpartition(":")[2])
        with psycopg.connect(f"postgresql://neondb_owner@127.0.0.1:{port}/neondb") as conn:
            row = conn.execute("SELECT name FROM branch_info").fetchone()
            assert row == ("dev",)

        assert proc.stop(signal.SIGTERM) == 0
    finally:
        proc.stop()
        print(proc.log())
    assert not setup.standin.has_branch(name)
    assert "ephemeral_branch_deleted" in proc.log()


def test_an_ephemeral_branch_outliving_a_killed_daemon_still_expires(setup: NeonSetup) -> None:
    proc = start_daemon_process(setup.config, setup.env, "--ephemeral", "--expires-in", "2h")
    try:
        name = proc.wait_ready()["ephemeral_branch"]
        assert proc.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        proc.stop()
        print(proc.log())
    left = setup.standin.branch(name)
    assert left.expires_at is not None
    expires = datetime.fromisoformat(left.expires_at)
    assert timedelta(minutes=115) < expires - datetime.now(UTC) <= timedelta(hours=2)
    assert setup.standin.requests_to("delete_branch") == []


# --- errors: one line for a CLI user ------------------------------------------------------


def _wrong_key(_s: NeonSetup) -> dict[str, str | None]:
    return {"NEON_API_KEY": "napi_not-the-right-key"}


def _no_project(s: NeonSetup) -> None:
    s.write(project_id="standin-project-404")


def _unreachable(s: NeonSetup) -> str:
    url = dead_api_url()
    s.write(api_url=url)
    return url


CliScenario = Callable[[NeonSetup], tuple[tuple[str, ...], str, Mapping[str, str | None] | None]]
CLI_ERRORS: dict[str, CliScenario] = {
    "401 key rejected": lambda s: (
        ("use", "dev"),
        "neonlocal: the Neon API key was rejected (401)",
        _wrong_key(s),
    ),
    "404 project": lambda s: (
        (_no_project(s) or ("use", "dev")),
        "neonlocal: no Neon project with id 'standin-project-404' is visible to this API key",
        None,
    ),
    "unknown branch": lambda s: (
        ("use", "dve"),
        f"neonlocal: no branch named 'dve' in project {s.standin.project_id}; did you mean 'dev'?",
        None,
    ),
    "412 passwords not stored": lambda s: (
        (s.standin.set_store_passwords(False) or ("use", "dev")),
        "neonlocal: project does not store passwords; put a connection string in "
        "[branches.dev] url",
        None,
    ),
    "422 branch limit": lambda s: (
        (s.standin.set_branch_limit(2) or ("use", "one-too-many", "--create")),
        "neonlocal: the Neon project has reached its branch limit (422)",
        None,
    ),
    "API unreachable": lambda s: (
        ("use", "dev"),
        f"neonlocal: cannot reach the Neon API at {_unreachable(s)}: ",
        None,
    ),
}


@pytest.mark.parametrize("scenario", list(CLI_ERRORS))
async def test_each_api_failure_is_one_clear_line_for_the_cli_user(
    setup: NeonSetup, scenario: str
) -> None:
    args, expected, env = CLI_ERRORS[scenario](setup)
    before = setup.config.read_text()

    done = await setup.run(*args, env=env)

    assert done.code == 1
    assert done.out == ""
    assert len(done.err.splitlines()) == 1, done.err
    assert done.err.startswith(expected), done.err
    assert setup.standin.api_key not in done.err
    assert setup.config.read_text() == before  # nothing was switched


# --- errors: a clear ErrorResponse for a connecting client -----------------------------------


async def _rotate_key(s: NeonSetup, _daemon: LocalDaemon) -> None:
    s.standin.api_key = "napi_rotated-key"


async def _lose_project(s: NeonSetup, _daemon: LocalDaemon) -> None:
    s.standin.inject("list_branches", 404, times=None)
    s.standin.inject("get_project", 404, times=None)


async def _forget_dev(s: NeonSetup, _daemon: LocalDaemon) -> None:
    dev = s.standin.branch("dev")
    del s.standin.project().branches[dev.id]


async def _stop_storing_passwords(s: NeonSetup, _daemon: LocalDaemon) -> None:
    s.standin.set_store_passwords(False)


async def _lose_the_api(s: NeonSetup, daemon: LocalDaemon) -> None:
    s.write(branch="dev", api_url=dead_api_url())
    assert await daemon.daemon.reload("test: the API is gone", force=True) is None


Breaker = Callable[[NeonSetup, LocalDaemon], Awaitable[None]]
CLIENT_ERRORS: dict[str, tuple[Breaker, str]] = {
    "401 key rejected": (_rotate_key, "the Neon API key was rejected (401)"),
    "404 project": (
        _lose_project,
        "no Neon project with id 'standin-project-100000' is visible to this API key",
    ),
    "unknown branch": (_forget_dev, "no branch named 'dev' in project standin-project-100000"),
    "412 passwords not stored": (
        _stop_storing_passwords,
        "project does not store passwords; put a connection string in [branches.dev] url",
    ),
    "API unreachable": (_lose_the_api, "cannot reach the Neon API at http://127.0.0.1:"),
}


@pytest.mark.parametrize("scenario", list(CLIENT_ERRORS))
async def test_a_failed_password_refresh_reaches_the_client_as_a_clear_error(
    setup: NeonSetup, compute_dev: LocalCompute, scenario: str
) -> None:
    """The compute refuses the password we hold; fetching a new one fails: say why."""
    setup.standin.set_password("dev", "neondb_owner", STALE_PASSWORD)
    setup.write(branch="dev")
    break_api, expected = CLIENT_ERRORS[scenario]
    async with running_daemon(setup.config, setup.env) as daemon:
        await break_api(setup, daemon)

        error = await refused(daemon)

        assert error.sqlstate == "28P01"
        message = str(error)
        assert message.startswith(
            f'neonlocal: branch "dev" ({compute_dev.spec.hostname}:5432) refused the password '
            "neonlocal holds, and fetching a new one failed: "
        )
        assert expected in message
        assert STALE_PASSWORD not in message
        assert setup.standin.api_key not in message
        assert daemon.status()["branch"] == "dev"


async def test_a_daemon_started_without_the_api_tells_clients_why_and_keeps_trying(
    setup: NeonSetup,
) -> None:
    url = dead_api_url()
    setup.write(api_url=url)
    async with running_daemon(setup.config, setup.env) as daemon:
        error = await refused(daemon)
        assert error.sqlstate == "08001"
        assert str(error).startswith(
            f'neonlocal: branch "main": cannot reach the Neon API at {url}'
        )
        assert "keeps trying" in str(error)

        # The API comes back (here: the config now points at it); the daemon recovers.
        setup.write()
        assert (await daemon.daemon.handle_control({"op": "reload"}))["ok"]
        assert await branch_via(daemon) == "main"


async def test_a_daemon_whose_key_is_rejected_refuses_to_start_with_one_line(
    setup: NeonSetup,
) -> None:
    env = {**setup.env, "NEON_API_KEY": "napi_not-the-right-key"}
    with pytest.raises(StartupError) as caught:
        async with running_daemon(setup.config, env):
            pass
    assert str(caught.value).startswith("neonlocal: the Neon API key was rejected (401)")
    assert "napi_not-the-right-key" not in str(caught.value)
