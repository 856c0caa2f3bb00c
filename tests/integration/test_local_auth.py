"""An optional local password guards the daemon with SCRAM; without one, loopback is trusted."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from fixtures import rawpg
from fixtures.daemon import LocalDaemon, serving, toml_string

pytestmark = pytest.mark.pg

LOCAL_PASSWORD = "l0cal-Pa55 with spaces"
SELECT_BRANCH = "SELECT name FROM branch_info"


@pytest.fixture
async def guarded(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    """A daemon serving "main" that demands LOCAL_PASSWORD from its clients."""
    async with serving(
        workdir, branch_urls, f"[local]\npassword = {toml_string(LOCAL_PASSWORD)}"
    ) as running:
        yield running


async def psql(url: str, password: str | None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    proc = await asyncio.create_subprocess_exec(
        "psql", "--no-psqlrc", "--no-password", "-qAt", "-c", SELECT_BRANCH, url,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode()


@pytest.mark.parametrize("sslmode", ["disable", "require"])
async def test_psql_with_the_local_password_gets_in(guarded: LocalDaemon, sslmode: str) -> None:
    """libpq sends an empty SCRAM user name (n=,r=...) in plaintext and over local TLS."""
    code, out, err = await psql(guarded.url(sslmode=sslmode), LOCAL_PASSWORD)
    assert (code, out) == (0, "main"), err


async def test_psycopg_with_the_local_password_gets_in(guarded: LocalDaemon) -> None:
    async with await psycopg.AsyncConnection.connect(
        guarded.url(), password=LOCAL_PASSWORD
    ) as conn:
        cur = await conn.execute(SELECT_BRANCH)
        assert await cur.fetchone() == ("main",)


async def test_asyncpg_with_the_local_password_gets_in(guarded: LocalDaemon) -> None:
    conn = await asyncpg.connect(guarded.url(sslmode="disable"), password=LOCAL_PASSWORD)
    try:
        assert await conn.fetchval(SELECT_BRANCH) == "main"
    finally:
        await conn.close()


async def test_wrong_local_password_is_28P01(guarded: LocalDaemon) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as caught:
        await asyncpg.connect(guarded.url(sslmode="disable"), password="not-it")
    assert caught.value.sqlstate == "28P01"
    assert 'password authentication failed for user "neondb_owner"' in str(caught.value)
    code, _out, err = await psql(guarded.url(), "not-it")
    assert code != 0
    assert "password authentication failed" in err


async def test_no_password_fails_cleanly_and_the_daemon_carries_on(guarded: LocalDaemon) -> None:
    """The client gives up at the password request; the next client with a password works."""
    code, _out, err = await psql(guarded.url(), None)
    assert code != 0
    assert "no password supplied" in err
    with pytest.raises(psycopg.OperationalError):
        await psycopg.AsyncConnection.connect(guarded.url())
    code, out, err = await psql(guarded.url(), LOCAL_PASSWORD)
    assert (code, out) == (0, "main"), err


async def test_password_is_asked_before_anything_reaches_the_branch(guarded: LocalDaemon) -> None:
    """The first thing an unauthenticated client hears is the SCRAM-SHA-256 challenge."""
    async with rawpg.raw_client("127.0.0.1", guarded.port) as client:
        await client.send(rawpg.startup({"user": "neondb_owner", "database": "neondb"}))
        challenge = await client.read_message()
    assert challenge is not None
    assert challenge.kind == b"R"
    assert challenge.payload == b"\0\0\0\x0aSCRAM-SHA-256\0\0"


async def test_a_client_that_never_answers_the_password_request_is_dropped_without_a_word(
    guarded: LocalDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As PostgreSQL after authentication_timeout ("canceling authentication due to timeout"
    goes to its log only; test_same_as_direct.py shows the server doing so): a bare close."""
    monkeypatch.setattr("neonlocal.proxy.session.STARTUP_TIMEOUT_S", 0.5)
    async with rawpg.raw_client("127.0.0.1", guarded.port) as client:
        await client.send(rawpg.startup({"user": "neondb_owner", "database": "neondb"}))
        challenge = await client.read_message()
        assert challenge is not None
        assert challenge.kind == b"R"
        assert await client.read_to_end() == b""


async def test_without_a_local_password_loopback_is_trusted(daemon: LocalDaemon) -> None:
    code, out, err = await psql(daemon.url(), None)
    assert (code, out) == (0, "main"), err
