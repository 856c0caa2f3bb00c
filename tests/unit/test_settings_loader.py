"""The daemon's config loading: checked in a child process, a `use` applied without one.

The child runs the same check as the CLI (``neonlocal.config.schema.load_settings``); what matters
here is that nothing is lost or changed on the way back, that problems read the same, and
that the quick path for a branch switch can never skip a check that something else needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neonlocal.config.errors import ConfigError
from neonlocal.config.file import switch_branch
from neonlocal.config.loader import SettingsLoader
from neonlocal.config.schema import (
    AdminSchema,
    BranchSchema,
    ControlSchema,
    GitSchema,
    ListenSchema,
    LocalSchema,
    NeonSchema,
    NetworkSchema,
    SettingsSchema,
    UpstreamSchema,
    load_settings,
)
from neonlocal.config.values import (
    AdminSettings,
    BranchSettings,
    ControlSettings,
    GitSettings,
    ListenSettings,
    LocalSettings,
    NeonSettings,
    NetworkSettings,
    Settings,
    UpstreamSettings,
    check_selected_branch,
    from_json,
    from_schema,
    to_json,
)

PASSWORD = "npg_LoaderSecret7"
URL = f"postgresql://neondb_owner:{PASSWORD}@ep-cool-rain-123456.us-east-2.aws.neon.tech/neondb"

FULL = f"""\
# every section, a bit of everything
branch = "dev"
log_level = "debug"
shutdown_deadline = 12.5

[listen]
host = ["127.0.0.1", "::1"]
port = 6543
max_sessions = 50
unix_socket_dir = ""

[local]
password = "{PASSWORD}local"
tls = false
tls_auth = "password"

[upstream]
connect_timeout = 7
reuse_sessions = true
reuse_idle_timeout = 30
pipeline_auth = false

[control]
socket = "ctl.sock"

[admin]
listen = "127.0.0.1:0"

[neon]
project_id = "quiet-sea-123456"
api_key_file = "key"
pooled = true

[network]
resolve = {{ "ep-cool-rain-123456.us-east-2.aws.neon.tech" = "127.0.0.1" }}

[git]
follow = true
map = {{ main = "production" }}

[branches.dev]
url = "{URL}"
tls = "verify-ca"

[branches.api-found]
user = "app"
database = "appdb"
pooled = false
"""

PAIRS = [
    (SettingsSchema, Settings),
    (ListenSchema, ListenSettings),
    (LocalSchema, LocalSettings),
    (UpstreamSchema, UpstreamSettings),
    (ControlSchema, ControlSettings),
    (AdminSchema, AdminSettings),
    (NeonSchema, NeonSettings),
    (NetworkSchema, NetworkSettings),
    (GitSchema, GitSettings),
    (BranchSchema, BranchSettings),
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def load(loader: SettingsLoader) -> Settings:
    return asyncio.run(loader.load())


def child_loader(path: Path, env: dict[str, str] | None = None) -> SettingsLoader:
    return SettingsLoader(path, env or {}, isolate=True)


# --- the daemon's values mirror the schema ---------------------------------------------------


@pytest.mark.parametrize(("schema", "plain"), PAIRS, ids=[p.__name__ for _, p in PAIRS])
def test_the_daemon_knows_every_key_the_schema_accepts(schema: type, plain: type) -> None:
    """A key added to the schema but not to the daemon's values would be dropped silently."""
    keys = {f.name for f in dataclasses.fields(plain)} - {"provenance"}
    assert keys == set(schema.model_fields)


def test_the_daemon_has_the_schemas_defaults() -> None:
    assert from_schema(SettingsSchema()) == Settings()


def test_values_cross_a_pipe_unchanged(tmp_path: Path) -> None:
    """Every kind of value (secrets, paths, enums, tables, tuples) survives JSON both ways."""
    settings = load_settings(write(tmp_path, FULL), {"NEONLOCAL_LISTEN__PORT": "7000"})
    again = from_json(to_json(settings))
    assert again == settings
    assert again.provenance == settings.provenance
    assert again.branches["dev"].url is not None
    assert again.branches["dev"].url.get_secret_value() == URL
    assert PASSWORD not in repr(again)


# --- the child ---------------------------------------------------------------------------------


def test_a_check_in_a_child_gives_what_checking_here_gives(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    env = {"NEONLOCAL_LISTEN__PORT": "7000", "HOME": "/nowhere"}
    loader = child_loader(path, env)

    settings = load(loader)

    assert loader.checks == 1
    assert settings == load_settings(path, env)
    assert settings.listen.port == 7000
    assert settings.provenance.branch_line == 2


@pytest.mark.parametrize(
    ("text", "env"),
    [
        (f'[branches.a]\nurl = "{URL}"\nnonsense = 1\n[listen]\nport = -1\n', {}),
        ('branch = "a"\n[listen\n', {}),
        ("", {"NEONLOCAL_UPSTREAM__CONNECT_TIMEOUT": "soon"}),
        (f'[local]\npassword = ""\n[branches.a]\nurl = "{URL}?sslmode=disable"\n', {}),
    ],
    ids=["two problems", "bad toml", "bad variable", "secrets"],
)
def test_a_problem_found_by_the_child_reads_the_same(
    tmp_path: Path, text: str, env: dict[str, str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as here:
        load_settings(path, env)

    with pytest.raises(ConfigError) as there:
        load(child_loader(path, env))

    assert str(there.value) == str(here.value)
    assert (there.value.line, there.value.env_var) == (here.value.line, here.value.env_var)
    assert PASSWORD not in str(there.value)


def test_a_missing_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(child_loader(tmp_path / "gone.toml"))


def test_loading_in_a_child_never_loads_pydantic_here(tmp_path: Path) -> None:
    """The point of the child: the daemon's process stays without the schema's libraries."""
    path = write(tmp_path, FULL)
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "import neonlocal.app, neonlocal.daemon\n"
        "from neonlocal.config.loader import SettingsLoader\n"
        "loader = SettingsLoader(Path(sys.argv[1]), {})\n"
        "assert loader.isolated\n"
        "print(asyncio.run(loader.load()).listen.port)\n"
        "print(sorted(m for m in sys.modules if m.startswith('pydantic')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert done.stdout.split("\n")[:2] == ["6543", "[]"]


# --- a branch switch ----------------------------------------------------------------------------


def test_switching_the_branch_needs_no_check(tmp_path: Path) -> None:
    """`neonlocal use` rewrites only `branch`: the daemon takes it over at once."""
    path = write(tmp_path, FULL)
    loader = child_loader(path)
    first = load(loader)

    switch_branch(path, "api-found")
    switched = load(loader)

    assert loader.checks == 1
    assert switched == dataclasses.replace(first, branch="api-found")
    assert switched == load_settings(path, {})


def test_a_switch_to_an_unknown_branch_is_blamed_on_the_new_line(tmp_path: Path) -> None:
    path = write(tmp_path, f'[branches.a]\nurl = "{URL}"\n')
    loader = child_loader(path)
    load(loader)

    switch_branch(path, "b")  # a new key, which tomlkit puts first
    settings = load(loader)

    assert loader.checks == 1
    with pytest.raises(ConfigError) as caught:
        check_selected_branch(settings)
    assert str(caught.value) == f'{path}:1: branch: unknown branch "b"; known: a'


def test_removing_the_branch_key_unselects_without_a_check(tmp_path: Path) -> None:
    path = write(tmp_path, f'branch = "a"\n[branches.a]\nurl = "{URL}"\n')
    loader = child_loader(path)
    load(loader)

    path.write_text(f'[branches.a]\nurl = "{URL}"\n')

    assert load(loader).branch is None
    assert loader.checks == 1


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: text.replace("port = 6543", "port = 6544"),
        lambda text: text + '\n[branches.new]\nurl = "postgresql://u@h/db"\n',
        lambda text: text.replace('log_level = "debug"', 'log_level = "info"'),
    ],
    ids=["a value", "a table", "a key beside branch"],
)
def test_any_other_edit_is_checked(tmp_path: Path, edit: object) -> None:
    assert callable(edit)
    path = write(tmp_path, FULL)
    loader = child_loader(path)
    load(loader)

    path.write_text(edit(FULL))
    settings = load(loader)

    assert loader.checks == 2
    assert settings == load_settings(path, {})


@pytest.mark.parametrize("value", ['""', '"a\\u0007b"', "42", "{ name = 'a' }"])
def test_a_branch_value_that_cannot_be_a_name_gets_the_full_check(
    tmp_path: Path, value: str
) -> None:
    path = write(tmp_path, f'branch = "a"\n[branches.a]\nurl = "{URL}"\n')
    loader = child_loader(path)
    load(loader)

    path.write_text(f'branch = {value}\n[branches.a]\nurl = "{URL}"\n')
    with pytest.raises(ConfigError) as caught:
        load(loader)

    assert caught.value.line == 1
    assert str(caught.value).startswith(f"{path}:1: branch: ")


def test_a_refused_edit_is_not_remembered(tmp_path: Path) -> None:
    """After a refused edit, a later switch is checked together with that edit again."""
    path = write(tmp_path, f'branch = "a"\n[branches.a]\nurl = "{URL}"\n')
    loader = child_loader(path)
    load(loader)
    path.write_text(f'branch = "a"\n[listen]\nport = "x"\n[branches.a]\nurl = "{URL}"\n')
    with pytest.raises(ConfigError):
        load(loader)

    switch_branch(path, "b")

    with pytest.raises(ConfigError, match=r"listen\.port"):
        load(loader)


def test_a_branch_chosen_by_the_environment_is_never_switched_by_the_file(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, f'branch = "a"\n[branches.a]\nurl = "{URL}"\n')
    loader = child_loader(path, {"neonlocal_branch": "a"})
    load(loader)

    switch_branch(path, "b")

    assert load(loader).branch == "a"
    assert loader.checks == 2


# --- a check that goes wrong -------------------------------------------------------------------


def child_running(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """Make the loader's child run ``code`` instead of the real check."""
    monkeypatch.setattr(
        "neonlocal.config.loader.child_argv", lambda module: [sys.executable, "-c", code]
    )


def child_hanging(monkeypatch: pytest.MonkeyPatch, pid_file: Path) -> None:
    """A child that writes its pid to ``pid_file`` and then never answers."""
    child_running(
        monkeypatch,
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    )


def test_a_check_that_cannot_start_is_a_config_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of processes, say: the daemon keeps its settings and says why, in one line."""
    monkeypatch.setattr(
        "neonlocal.config.loader.child_argv", lambda module: [str(tmp_path / "no-python")]
    )
    with pytest.raises(ConfigError) as caught:
        load(child_loader(write(tmp_path, FULL)))
    assert str(caught.value).endswith(
        "cannot check the config: the check failed (cannot start it: No such file or directory)"
    )


def test_a_check_that_crashes_says_so_without_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child_running(monkeypatch, f"import sys; print('{PASSWORD}'); sys.exit(3)")
    with pytest.raises(ConfigError, match=r"the check failed \(exit status 3\)") as caught:
        load(child_loader(write(tmp_path, FULL)))
    assert PASSWORD not in str(caught.value)


def test_a_check_that_hangs_is_given_up_and_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"
    child_hanging(monkeypatch, pid_file)
    monkeypatch.setattr("neonlocal.config.loader.CHECK_TIMEOUT_S", 1.0)
    with pytest.raises(ConfigError, match="took too long"):
        load(child_loader(write(tmp_path, FULL)))
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_a_daemon_stopping_mid_check_leaves_no_child_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"
    child_hanging(monkeypatch, pid_file)
    loader = child_loader(write(tmp_path, FULL))

    async def stop_mid_check() -> None:
        check = asyncio.create_task(loader.load())
        async with asyncio.timeout(10):
            while not pid_file.exists() or not pid_file.read_text():  # noqa: ASYNC110 - another process writes it
                await asyncio.sleep(0.01)
        check.cancel()
        with pytest.raises(asyncio.CancelledError):
            await check

    asyncio.run(stop_mid_check())
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
