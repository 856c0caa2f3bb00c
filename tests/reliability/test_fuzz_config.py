"""Random edits of a valid config never crash the loader or the daemon, and never quote a secret.

Thousands of mutations go through ``load_settings`` (and the checks the daemon runs after it)
directly: each either loads or raises ConfigError, nothing else. A few hundred rejected ones
are then written to the file a live daemon watches, with sessions in between: every rejection
is reported, the last good config keeps serving, and a good edit afterwards still applies.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings

from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, toml_string
from fixtures.pg import TEST_PASSWORD
from neonlocal.config.errors import UnknownBranch
from neonlocal.config.schema import ConfigError, Settings, check_selected_branch, load_settings
from neonlocal.localpg import LocalCompute
from neonlocal.targets import TargetError, resolve_target
from reliability import mutate
from reliability.conftest import Figures
from reliability.measure import eventually

pytestmark = pytest.mark.reliability

DIRECT_CASES = int(os.environ.get("NEONLOCAL_FUZZ_CONFIG_CASES", "3000"))
LIVE_CASES = int(os.environ.get("NEONLOCAL_FUZZ_LIVE_CASES", "250"))
LOCAL_SECRET = "L0cal-Fuzz-S3cret"
URL_SECRET = "Url-Fuzz-S3cret"


def config_text(main_url: str, dev_url: str, *, branch: str = "main") -> str:
    return f"""# neonlocal config under fuzzing
branch = {toml_string(branch)}
log_level = "info"
shutdown_deadline = 1

[listen]
host = ["127.0.0.1"]
port = 0
max_sessions = 50
unix_socket_dir = ""

[local]
password = {toml_string(LOCAL_SECRET)}
tls = false

[upstream]
connect_timeout = 5
keepalive = true

[branches.main]
url = {toml_string(main_url)}

[branches."dev"]
url = {toml_string(dev_url)}
database = "neondb"
"""


def check_loads_or_config_error(path: Path, secrets: tuple[str, ...]) -> bool:
    """True if the file was accepted; any failure other than a reported one raises."""
    try:
        loaded = load_settings(path, {})
        check_selected_branch(loaded)
        if loaded.branch is not None:
            resolve_target(loaded, loaded.branch)
    except (ConfigError, TargetError, UnknownBranch) as exc:
        text = f"{exc!s} {exc!r}"
        for secret in secrets:
            assert secret not in text, f"a config error quotes a secret: {text}"
        return False
    assert isinstance(loaded, Settings)
    for secret in secrets:
        assert secret not in repr(loaded)
    return True


@pytest.mark.timeout(600)
def test_thousands_of_mutated_configs_load_or_are_reported(figures: Figures) -> None:
    base = config_text(
        f"postgresql://neondb_owner:{URL_SECRET}@ep-a-1.us-east-2.aws.neon.tech/neondb",
        f"postgresql://neondb_owner:{URL_SECRET}@ep-b-2.us-east-2.aws.neon.tech:5432/neondb"
        "?sslmode=require&hostaddr=127.0.0.9",
    ).encode()
    directory = Path(tempfile.mkdtemp(prefix="neonlocal-fuzzcfg-"))
    path = directory / "config.toml"
    outcomes = {"accepted": 0, "rejected": 0}
    path.write_bytes(base)
    assert check_loads_or_config_error(path, (LOCAL_SECRET, URL_SECRET))

    @settings(
        max_examples=DIRECT_CASES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(mutate.EDITS)
    def load_mutated(edits: list[mutate.Edit]) -> None:
        path.write_bytes(mutate.apply(base, edits))
        accepted = check_loads_or_config_error(path, (LOCAL_SECRET, URL_SECRET))
        outcomes["accepted" if accepted else "rejected"] += 1

    try:
        load_mutated()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert outcomes["rejected"] > 0
    assert outcomes["accepted"] > 0
    figures.record(cases=sum(outcomes.values()), **outcomes, crashes=0)


# --- through the live watcher -------------------------------------------------------------------


def fingerprint(path: Path, env: dict[str, str]) -> str:
    """What the daemon fingerprints to know it has read this exact file (daemon._fingerprint)."""
    digest = hashlib.sha256(path.read_bytes())
    for key in sorted(k for k in env if k.startswith("NEONLOCAL_")):
        digest.update(f"{key}={env[key]}".encode())
    return digest.hexdigest()


def has_read(daemon: LocalDaemon, expected: str) -> bool:
    return daemon.daemon._fingerprint == expected


async def serves(daemon: LocalDaemon, expected: str) -> None:
    conn = await asyncpg.connect(daemon.url(sslmode="disable"), password=LOCAL_SECRET)
    try:
        assert await conn.fetchval("SELECT name FROM branch_info") == expected
    finally:
        await conn.close()


@pytest.mark.pg
@pytest.mark.timeout(300)
async def test_rejected_edits_on_the_watched_file_keep_the_last_good_config_serving(
    workdir: Path,
    computes: dict[str, LocalCompute],
    ca_file: Path,
    figures: Figures,
    no_unhandled_errors: list[object],
) -> None:
    main_url = computes["main"].url(ca_file=ca_file)
    dev_url = computes["dev"].url(ca_file=ca_file)
    good = config_text(main_url, dev_url)
    path = workdir / "config.toml"
    path.write_text(good)
    path.chmod(0o600)
    secrets = (LOCAL_SECRET, TEST_PASSWORD)
    env = daemon_env(workdir)
    rng = random.Random(7)  # fixed: a failure can be replayed
    scratch = workdir / "candidate.toml"
    written = 0
    async with running_daemon(path, env) as daemon:
        await serves(daemon, "main")
        while written < LIVE_CASES:
            candidate = mutate.apply(good.encode(), mutate.random_edits(rng))
            candidate += f"\n# case {written}\n".encode()
            scratch.write_bytes(candidate)
            if check_loads_or_config_error(scratch, secrets):
                continue  # an accepted edit may legitimately change what is served
            # Atomically, as editors and `neonlocal use` save, so no half file is read.
            os.replace(scratch, path)
            written += 1
            await eventually(
                functools.partial(has_read, daemon, fingerprint(path, env)),
                what=f"the watcher to read rejected case {written}",
            )
            problem = daemon.status()["config_error"]
            assert problem, f"case {written} was not reported"
            for secret in secrets:
                assert secret not in problem
            if written % 25 == 0:
                await serves(daemon, "main")
        await serves(daemon, "main")
        # The watcher survived all that: a good edit is still picked up.
        path.write_text(config_text(main_url, dev_url, branch="dev"))
        await eventually(lambda: daemon.status()["branch"] == "dev", what="the good edit")
        assert daemon.status()["config_error"] is None
        await serves(daemon, "dev")
    figures.record(rejected_edits_through_the_watcher=written, crashes=0)
