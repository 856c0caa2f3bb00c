"""Protected branches against real PostgreSQL: writes refused with PostgreSQL's own 25006,
allowed after `use NAME --write`, and a `use` that asks first."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from fixtures.daemon import (
    LocalDaemon,
    daemon_env,
    neonlocal_cmd,
    running_daemon,
    toml_string,
)
from fixtures.pg import TEST_PASSWORD
from neon_standin import NeonStandIn
from neonlocal.config.file import switch_branch
from neonlocal.localpg import LocalCompute

pytestmark = pytest.mark.pg

# A write that changes nothing that outlives the session, and that read-only refuses.
WRITE = "CREATE TEMP TABLE protect_probe (x int)"


def protected_config(workdir: Path, branch_urls: dict[str, str], protect: str = "true") -> Path:
    path = workdir / "config.toml"
    path.write_text(
        "\n".join(
            [
                'branch = "dev"',
                "",
                "[listen]",
                'host = ["127.0.0.1"]',
                "port = 0",
                'unix_socket_dir = ""',
                "",
                "[branches.main]",
                f"url = {toml_string(branch_urls['main'])}",
                f"protect = {protect}",
                "",
                "[branches.dev]",
                f"url = {toml_string(branch_urls['dev'])}",
                "",
            ]
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture
async def daemon(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    async with running_daemon(protected_config(workdir, branch_urls), daemon_env(workdir)) as d:
        yield d


async def use(daemon: LocalDaemon, name: str, *, write: bool = False) -> None:
    """What `neonlocal use NAME [--write] --yes` does once it has its yes."""
    await asyncio.to_thread(switch_branch, daemon.config_path, name)
    reply = await daemon.daemon.handle_control({"op": "reload", "branch": name, "write": write})
    assert reply["ok"], reply


async def try_write(url: str) -> tuple[str | None, str | None, str | None]:
    """(the session's neonlocal.read_only, its branch, the SQLSTATE of a write or None)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        status = conn.info.parameter_status("neonlocal.read_only")
        branch = conn.info.parameter_status("neonlocal.branch")
        try:
            await conn.execute(WRITE)
        except psycopg.Error as exc:
            return status, branch, exc.sqlstate
        return status, branch, None


async def test_a_write_on_a_protected_branch_fails_with_25006(daemon: LocalDaemon) -> None:
    await use(daemon, "main")

    status, branch, refused = await try_write(daemon.url(sslmode="disable"))

    assert (status, branch, refused) == ("on", "main", "25006")
    async with await psycopg.AsyncConnection.connect(daemon.url(sslmode="disable")) as conn:
        cur = await conn.execute("SHOW default_transaction_read_only")
        assert await cur.fetchone() == ("on",)
    assert daemon.status()["read_only"] is True


async def test_use_with_write_allows_writes_until_the_selection_changes(
    daemon: LocalDaemon,
) -> None:
    await use(daemon, "main", write=True)
    assert await try_write(daemon.url(sslmode="disable")) == ("off", "main", None)

    await use(daemon, "dev")
    assert await try_write(daemon.url(sslmode="disable")) == (None, "dev", None)

    await use(daemon, "main")
    assert await try_write(daemon.url(sslmode="disable")) == ("on", "main", "25006")


async def test_a_session_open_before_write_was_allowed_stays_read_only(
    daemon: LocalDaemon,
) -> None:
    await use(daemon, "main")
    async with await psycopg.AsyncConnection.connect(
        daemon.url(sslmode="disable"), autocommit=True
    ) as before:
        await use(daemon, "main", write=True)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await before.execute(WRITE)
        assert await try_write(daemon.url(sslmode="disable")) == ("off", "main", None)


async def test_unprotected_branches_get_no_read_only_status(daemon: LocalDaemon) -> None:
    assert await try_write(daemon.url(sslmode="disable")) == (None, "dev", None)


async def test_protect_confirm_lets_sessions_write(
    workdir: Path, branch_urls: dict[str, str]
) -> None:
    config = protected_config(workdir, branch_urls, protect='"confirm"')
    async with running_daemon(config, daemon_env(workdir)) as daemon:
        await use(daemon, "main")
        assert await try_write(daemon.url(sslmode="disable")) == ("off", "main", None)


@dataclass(frozen=True)
class Done:
    code: int
    out: str
    err: str


async def cli(config: Path, env: dict[str, str], *args: str, stdin: str = "") -> Done:
    proc = await asyncio.create_subprocess_exec(
        *neonlocal_cmd("--config", str(config), *args),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def test_use_of_a_protected_branch_needs_yes_off_a_terminal(daemon: LocalDaemon) -> None:
    refused = await cli(daemon.config_path, daemon.env, "use", "main")

    assert refused.code == 2
    assert refused.err.strip() == (
        "neonlocal: branch main is protected: pass --yes to select it "
        "(read-only; --write allows writes)"
    )
    assert 'branch = "dev"' in daemon.config_path.read_text()
    assert daemon.status()["branch"] == "dev"

    done = await cli(daemon.config_path, daemon.env, "use", "main", "--yes")

    assert done.code == 0, done.err
    assert done.out.strip().endswith(
        "; read-only (protected: `neonlocal use main --write` allows writes)"
    )
    assert await try_write(daemon.url(sslmode="disable")) == ("on", "main", "25006")
    status = await cli(daemon.config_path, daemon.env, "status")
    assert "branch:     main (read-only: protected)" in status.out.splitlines()


async def test_use_with_write_and_yes_from_the_cli_allows_writes(daemon: LocalDaemon) -> None:
    done = await cli(daemon.config_path, daemon.env, "use", "main", "--write", "--yes")

    assert done.code == 0, done.err
    assert "protected, writes allowed" in done.out
    assert await try_write(daemon.url(sslmode="disable")) == ("off", "main", None)
    status = await cli(daemon.config_path, daemon.env, "status")
    assert "read-only" not in status.out


async def test_a_branch_neon_marks_protected_is_read_only(
    workdir: Path, ca_file: Path, compute_main: LocalCompute, compute_dev: LocalCompute
) -> None:
    with NeonStandIn(main_host=compute_main.spec.hostname, password=TEST_PASSWORD) as standin:
        standin.add_branch("prod", host=compute_dev.spec.hostname, protected=True)
        config = workdir / "config.toml"
        config.write_text(
            "\n".join(
                [
                    'branch = "prod"',
                    "[listen]",
                    'host = ["127.0.0.1"]',
                    "port = 0",
                    'unix_socket_dir = ""',
                    "[neon]",
                    f"project_id = {toml_string(standin.project_id)}",
                    f"api_url = {toml_string(standin.base_url)}",
                    f"sslrootcert = {toml_string(str(ca_file))}",
                    "[network.resolve]",
                    f"{toml_string(compute_dev.spec.hostname)} = "
                    f"{toml_string(compute_dev.spec.listen_addr)}",
                    f"{toml_string(compute_main.spec.hostname)} = "
                    f"{toml_string(compute_main.spec.listen_addr)}",
                    "",
                ]
            )
        )
        config.chmod(0o600)
        env = {**daemon_env(workdir), "NEON_API_KEY": standin.api_key}
        async with running_daemon(config, env) as daemon:
            assert await try_write(daemon.url(sslmode="disable")) == ("on", "prod", "25006")
            await use(daemon, "main")
            assert await try_write(daemon.url(sslmode="disable")) == (None, "main", None)
