"""No password ever shows up in a log line, in `status`, in an error a client reads, or in a repr.

Every branch URL carries a recognisable password and the daemon demands a recognisable local
password; then every failure path and a normal session are driven with debug logging on, and
each place a secret could escape is searched for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import psycopg
import pytest
import structlog

from fixtures import rawpg
from fixtures.daemon import (
    LocalDaemon,
    daemon_env,
    running_daemon,
    start_daemon_process,
    toml_string,
    write_config,
)
from fixtures.net import free_port
from fixtures.pg import TEST_PASSWORD
from neonlocal import logging as neonlocal_logging
from neonlocal.config.schema import ConfigError, load_settings
from neonlocal.conninfo import parse_conninfo
from neonlocal.localpg import LocalCompute
from neonlocal.proxy.plan import plan_login
from neonlocal.targets import resolve_target
from neonlocal.tls.certs import CertificateAuthority

pytestmark = pytest.mark.pg

SECRET = "Sup3rS3cretPw"
LOCAL_SECRET = "L0calS3cretPw"
# The shared computes' real password is a secret too: it reaches the daemon in "main"'s URL.
SECRETS = (SECRET, LOCAL_SECRET, TEST_PASSWORD)


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} leaks a password: {text!r}"


def with_password(url: str, password: str) -> str:
    return url.replace(f":{quote(TEST_PASSWORD, safe='')}@", f":{quote(password, safe='')}@")


def fake_branch_url(host: str, port: int) -> str:
    return f"postgresql://neondb_owner:{SECRET}@{host}:{port}/neondb?hostaddr=127.0.0.1"


@pytest.fixture(params=["unredacted console", "production json"])
def log_text(request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    """Debug logs of the in-process daemon.

    "unredacted console" renders events without neonlocal's last-line redaction, so a secret
    the code itself puts into an event is caught; "production json" is what `neonlocal up`
    writes to journald.
    """
    saved = structlog.get_config()
    out = io.StringIO()
    if request.param == "production json":
        neonlocal_logging.configure("debug", json=True, stream=out)
    else:
        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.format_exc_info,
                structlog.dev.ConsoleRenderer(colors=False),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            logger_factory=structlog.PrintLoggerFactory(out),
        )
    try:
        yield out
    finally:
        structlog.configure(**saved)


@pytest.fixture
async def failing_branches(
    compute_main: LocalCompute, ca_file: Path, workdir: Path, tls_server_context: ssl.SSLContext
) -> AsyncIterator[dict[str, str | dict[str, str]]]:
    """One branch per failure path, every URL carrying SECRET."""
    good = compute_main.url(ca_file=ca_file)
    other_ca = workdir / "other-ca.crt"
    other_ca.write_bytes(CertificateAuthority.create("another CA").cert_pem)
    spec = compute_main.spec
    async with contextlib.AsyncExitStack() as stack:
        silent = await stack.enter_async_context(rawpg.fake_upstream(rawpg.never_answers))
        plain = await stack.enter_async_context(rawpg.fake_upstream(rawpg.refuses_tls))
        crash = await stack.enter_async_context(
            rawpg.fake_upstream(rawpg.hangs_up_after_tls(tls_server_context))
        )
        branches: dict[str, str | dict[str, str]] = {
            "stale": with_password(good, SECRET),
            "gone": f"postgresql://neondb_owner:{SECRET}@127.0.0.1:{free_port()}/neondb",
            "elsewhere": with_password(good, SECRET).replace(
                spec.hostname, spec.hostname.replace("us-east-2", "ap-southeast-1")
            ),
            "mitm": with_password(compute_main.url(ca_file=other_ca), SECRET),
            "cold": fake_branch_url("ep-cold-1.us-east-2.aws.neon.tech", silent),
            "plain": fake_branch_url("ep-plain-1.us-east-2.aws.neon.tech", plain),
            "crash": fake_branch_url("ep-crash-1.us-east-2.aws.neon.tech", crash)
            + f"&sslrootcert={ca_file}",
            "nodb": {"url": good, "database": "nope"},
        }
        if rawpg.dns_failure_problem() is None:
            branches["typo"] = f"postgresql://neondb_owner:{SECRET}@{rawpg.UNRESOLVABLE_HOST}/db"
        yield branches


def secret_config(path: Path, branches: dict[str, str | dict[str, str]], main_url: str) -> Path:
    extra = f"[local]\npassword = {toml_string(LOCAL_SECRET)}\n\n[upstream]\nconnect_timeout = 0.5"
    return write_config(path, {"main": main_url, **branches}, branch="main", extra=extra)


def client_view(exc: BaseException) -> str:
    """Everything a client program could print about a failed connection."""
    parts = [str(exc), repr(exc)]
    if isinstance(exc, asyncpg.PostgresError):
        parts.append(json.dumps(exc.as_dict(), default=str))
    return "\n".join(parts)


async def test_no_secret_escapes_through_logs_status_or_client_errors(
    workdir: Path,
    branch_urls: dict[str, str],
    failing_branches: dict[str, str | dict[str, str]],
    log_text: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = secret_config(workdir / "config.toml", failing_branches, branch_urls["main"])
    seen: list[tuple[str, str]] = []
    async with running_daemon(config, daemon_env(workdir)) as d:
        async with await psycopg.AsyncConnection.connect(d.url(), password=LOCAL_SECRET) as conn:
            await conn.execute("SELECT name FROM branch_info")
            seen.append(("status with a session", json.dumps(d.status())))
        with pytest.raises(asyncpg.InvalidPasswordError) as wrong_local:
            await asyncpg.connect(d.url(sslmode="disable"), password=SECRET)
        seen.append(("wrong local password", client_view(wrong_local.value)))
        for name in failing_branches:
            await d.use(name)
            with pytest.raises(asyncpg.PostgresError) as caught:
                await asyncpg.connect(d.url(sslmode="disable"), password=LOCAL_SECRET)
            seen.append((f"client error for {name}", client_view(caught.value)))
            seen.append((f"status after {name}", json.dumps(d.status())))
            assert d.status()["last_error"] is not None
        seen += await broken_edits(d, config)
    seen.append(("daemon logs", log_text.getvalue()))
    seen.append(("stdlib logs", caplog.text))
    assert "session_closed" in log_text.getvalue()
    for where, text in seen:
        assert_no_secret(where, text)


async def broken_edits(d: LocalDaemon, config: Path) -> list[tuple[str, str]]:
    """Hand edits that break the file, each quoting a secret near the mistake."""
    good = await asyncio.to_thread(config.read_text)
    seen = []
    edits = {
        "bad port": f'\n[branches.oops]\nurl = "postgresql://u:{SECRET}@h:notaport/db"\n',
        "bad TOML": f'\n[branches.oops]\nurl = "postgresql://u:{SECRET}@h/db\n',
        "unknown key": f'\n[branches.oops]\nurl = "postgresql://h/db"\npasword = "{SECRET}"\n',
    }
    for label, edit in edits.items():
        await asyncio.to_thread(config.write_text, good + edit)
        problem = await d.daemon.reload("test edit", force=True)
        assert problem is not None, label
        seen.append((f"reload problem ({label})", problem))
        seen.append((f"status ({label})", json.dumps(d.status())))
    await asyncio.to_thread(config.write_text, good)
    assert await d.daemon.reload("test edit", force=True) is None
    return seen


async def test_reprs_and_errors_of_configuration_objects_hide_passwords(
    workdir: Path,
    branch_urls: dict[str, str],
    failing_branches: dict[str, str | dict[str, str]],
) -> None:
    config = secret_config(workdir / "config.toml", failing_branches, branch_urls["main"])
    settings = load_settings(config, {})
    assert_no_secret("Settings", f"{settings!s} {settings!r} {dataclasses.asdict(settings)!s}")
    for name, branch in settings.branches.items():
        assert_no_secret(f"BranchSettings {name}", f"{branch!s} {branch!r}")
        assert branch.url is not None
        url = branch.url.get_secret_value()
        assert_no_secret(f"ConnInfo {name}", repr(parse_conninfo(url)))
        assert_no_secret(f"ConnInfo.redacted {name}", parse_conninfo(url).redacted())
        target = resolve_target(settings, name)
        assert target.password is not None
        plan = plan_login(target, {"user": "neondb_owner", "database": "neondb"})
        assert_no_secret(f"Target {name}", f"{target!s} {target!r} {target.describe()}")
        assert_no_secret(f"Plan {name}", f"{plan!s} {plan!r}")
    config.write_text(config.read_text() + "\n[bad\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, {})
    assert_no_secret("ConfigError (TOML)", f"{caught.value!s} {caught.value!r}")
    config.write_text(f'[branches.x]\nurl = "postgresql://u:{SECRET}@h:notaport/db"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config, {})
    assert_no_secret("ConfigError (URL)", f"{caught.value!s} {caught.value!r}")


async def test_neonlocal_up_debug_log_file_has_no_secret(
    workdir: Path, compute_main: LocalCompute, ca_file: Path
) -> None:
    """The real `neonlocal up --log-level debug`, one good and one refused session."""
    good = compute_main.url(ca_file=ca_file)
    config = write_config(
        workdir / "config.toml",
        {"main": good, "stale": with_password(good, SECRET)},
        branch="stale",
        extra=f"[local]\npassword = {toml_string(LOCAL_SECRET)}",
    )
    proc = start_daemon_process(config, daemon_env(workdir), log_level="debug")
    try:
        status = await asyncio.to_thread(proc.wait_ready)
        port = int(status["listen"][0].rsplit(":", 1)[1])
        url = f"postgresql://neondb_owner@127.0.0.1:{port}/neondb?sslmode=disable"
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(url, password=LOCAL_SECRET)
        status = await asyncio.to_thread(proc.status)
    finally:
        await asyncio.to_thread(proc.stop)
    log = proc.log()
    assert "session_closed" in log
    assert_no_secret("neonlocal up log", log)
    assert_no_secret("neonlocal status", json.dumps(status))
