"""Git following: real `git checkout`s in a temporary repository move the daemon between
Neon branches found (or created) through the API stand-in."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from fixtures.daemon import LocalDaemon, daemon_env, running_daemon, toml_string
from fixtures.pg import TEST_PASSWORD
from neon_standin import NeonStandIn
from neonlocal.errors import StartupError
from neonlocal.localpg import LocalCompute

# Hosts the stand-in hands out; only the test that connects maps them to computes.
MAIN_HOST = "ep-main-100001.us-east-2.aws.neon.tech"
DEV_HOST = "ep-dev-200002.us-east-2.aws.neon.tech"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "neonlocal tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "neonlocal tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, **GIT_ENV, "HOME": str(repo.parent)}
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


@dataclass
class Logs:
    """Daemon log lines (stdout), kept across reads so a test can wait for one."""

    capsys: pytest.CaptureFixture[str]
    seen: list[str] = field(default_factory=list)

    def lines(self, event: str) -> list[str]:
        self.seen += self.capsys.readouterr().out.splitlines()
        return [line for line in self.seen if f" {event} " in line]

    async def wait_for(self, event: str, count: int = 1) -> list[str]:
        await eventually(lambda: len(self.lines(event)) >= count, f"{count} x {event}")
        return self.lines(event)


async def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class GitSetup:
    workdir: Path
    standin: NeonStandIn
    repo: Path
    config: Path
    env: dict[str, str]

    def write(self, git_table: str, *, branch: str = "main", resolve: str = "") -> None:
        self.config.write_text(
            "\n".join(
                [
                    f"branch = {toml_string(branch)}",
                    "",
                    "[listen]",
                    'host = ["127.0.0.1"]',
                    "port = 0",
                    "",
                    "[neon]",
                    f"project_id = {toml_string(self.standin.project_id)}",
                    f"api_url = {toml_string(self.standin.base_url)}",
                    resolve,
                    "",
                    "[git]",
                    "follow = true",
                    'repo = "repo"  # beside this file',
                    git_table,
                ]
            )
        )

    async def checkout(self, *args: str) -> None:
        await asyncio.to_thread(git, self.repo, "checkout", "-q", *args)


@pytest.fixture
def standin() -> Iterator[NeonStandIn]:
    with NeonStandIn(main_host=MAIN_HOST, password=TEST_PASSWORD) as api:
        api.add_branch("dev", host=DEV_HOST)
        api.add_branch("prod", protected=True)
        yield api


@pytest.fixture
def setup(workdir: Path, standin: NeonStandIn) -> GitSetup:
    repo = workdir / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "commit", "-q", "--allow-empty", "-m", "first")
    env = daemon_env(workdir)
    env.pop("NEON_API_HOST", None)
    env["NEON_API_KEY"] = standin.api_key
    return GitSetup(workdir, standin, repo, workdir / "config.toml", env)


def branch(daemon: LocalDaemon) -> str | None:
    name = daemon.status()["branch"]
    assert name is None or isinstance(name, str)
    return name


async def test_checking_out_a_branch_selects_the_neon_branch_of_the_same_name(
    setup: GitSetup, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = Logs(capsys)
    setup.write("")
    async with running_daemon(setup.config, setup.env) as daemon:
        await logs.wait_for("git_follow_skipped")  # HEAD is on main, the default branch

        await setup.checkout("-b", "dev")

        await eventually(lambda: branch(daemon) == "dev", "the switch to dev")
        [followed] = await logs.wait_for("git_followed")
        assert "git_branch=dev" in followed
        assert 'branch = "dev"' in setup.config.read_text()  # as `neonlocal use dev` writes


@pytest.mark.pg
async def test_open_sessions_stay_while_new_ones_follow_the_checkout(
    setup: GitSetup, compute_main: LocalCompute, compute_dev: LocalCompute, ca_file: Path
) -> None:
    resolve = "\n".join(
        [
            f"sslrootcert = {toml_string(str(ca_file))}",
            "",
            "[network.resolve]",
            f'"{MAIN_HOST}" = "{compute_main.spec.listen_addr}"',
            f'"{DEV_HOST}" = "{compute_dev.spec.listen_addr}"',
            "",
            "[switch]",
            'sessions = "keep"',
        ]
    )
    setup.write("", resolve=resolve)
    async with running_daemon(setup.config, setup.env) as daemon:
        before = await asyncpg.connect(daemon.url())
        try:
            assert await before.fetchval("SELECT name FROM branch_info") == "main"

            await setup.checkout("-b", "dev")
            await eventually(lambda: branch(daemon) == "dev", "the switch to dev")

            after = await asyncpg.connect(daemon.url())
            try:
                assert await after.fetchval("SELECT name FROM branch_info") == "dev"
            finally:
                await after.close()
            assert await before.fetchval("SELECT name FROM branch_info") == "main"
        finally:
            await before.close()


async def test_a_missing_neon_branch_is_created_from_the_parent_when_configured(
    setup: GitSetup,
) -> None:
    setup.write('create = true\nparent = "dev"')
    async with running_daemon(setup.config, setup.env) as daemon:
        await setup.checkout("-b", "feature-x")

        await eventually(lambda: branch(daemon) == "feature-x", "the switch to feature-x")
        [create] = setup.standin.requests_to("create_branch")
        assert create.body["branch"]["name"] == "feature-x"
        assert create.body["branch"]["parent_id"] == setup.standin.branch("dev").id
        assert create.body["endpoints"] == [{"type": "read_write"}]
        assert create.body["annotation_value"] == {
            "created-by": "neonlocal",
            "purpose": "git-follow",
        }


async def test_without_create_a_branch_unknown_to_neon_changes_nothing(
    setup: GitSetup, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = Logs(capsys)
    setup.write("", branch="dev")
    async with running_daemon(setup.config, setup.env) as daemon:
        await logs.wait_for("git_follow_skipped")

        await setup.checkout("-b", "nothing-here")

        [_, skipped] = await logs.wait_for("git_follow_skipped", 2)
        assert "git_branch=nothing-here" in skipped
        assert 'no Neon branch named "nothing-here"; set [git] create = true' in skipped
        assert branch(daemon) == "dev"
        assert setup.standin.requests_to("create_branch") == []


async def test_default_and_protected_branches_are_followed_only_when_mapped(
    setup: GitSetup, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = Logs(capsys)
    git(setup.repo, "checkout", "-q", "-b", "dev")
    setup.write('[git.map]\n"release/1.0" = "prod"', branch="dev")
    async with running_daemon(setup.config, setup.env) as daemon:
        await eventually(lambda: len(logs.lines("git_followed")) == 1, "following dev")

        await setup.checkout("main")
        [skipped_main] = await logs.wait_for("git_follow_skipped")
        await setup.checkout("-b", "prod")
        [_, skipped_prod] = await logs.wait_for("git_follow_skipped", 2)

        assert "is the default branch of the project" in skipped_main
        assert "is a protected branch" in skipped_prod
        assert branch(daemon) == "dev"

        await setup.checkout("-b", "release/1.0")

        await eventually(lambda: branch(daemon) == "prod", "the mapped switch to prod")


async def test_a_mapped_git_branch_selects_the_neon_branch_it_names(setup: GitSetup) -> None:
    setup.write('[git.map]\n"feature/login" = "dev"')
    async with running_daemon(setup.config, setup.env) as daemon:
        await setup.checkout("-b", "feature/login")

        await eventually(lambda: branch(daemon) == "dev", "the mapped switch to dev")


async def test_a_detached_head_changes_nothing(
    setup: GitSetup, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = Logs(capsys)
    git(setup.repo, "checkout", "-q", "-b", "dev")
    setup.write("", branch="main")
    async with running_daemon(setup.config, setup.env) as daemon:
        await eventually(lambda: branch(daemon) == "dev", "following dev at start")

        await setup.checkout("--detach")

        await logs.wait_for("git_head_detached")
        assert branch(daemon) == "dev"
        assert 'branch = "dev"' in setup.config.read_text()


async def test_a_directory_outside_any_repository_stops_the_start_with_one_line(
    setup: GitSetup,
) -> None:
    setup.write("")
    setup.config.write_text(setup.config.read_text().replace('repo = "repo"', 'repo = "/"'))
    with pytest.raises(StartupError, match=r"^neonlocal: \[git\] follow: / is not inside a git"):
        async with running_daemon(setup.config, setup.env):
            pass
