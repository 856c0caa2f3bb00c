"""Loading the config file and environment: values, precedence, and errors that point home."""

from __future__ import annotations

import os
import stat
import traceback
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neonlocal.config.file import key_lines
from neonlocal.config.schema import (
    ConfigError,
    Settings,
    check_selected_branch,
    load_settings,
)
from neonlocal.config.values import TlsMode
from neonlocal.paths import (
    control_socket_path,
    default_config_path,
    ensure_private_dir,
    state_dir,
)
from neonlocal.targets import resolve_target

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "npg_TopSecret42"
URL = f"postgresql://neondb_owner:{PASSWORD}@ep-cool-rain-123456.us-east-2.aws.neon.tech/neondb"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def config_error(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        check_selected_branch(load_settings(path, env or {}))
    return caught.value


def test_example_config_loads_and_every_branch_resolves() -> None:
    """The shipped config.example.toml is valid, selects a known branch, and each branch works."""
    settings = load_settings(REPO / "config.example.toml", {})
    check_selected_branch(settings)
    assert settings.branch in settings.branches
    assert len(settings.branches) >= 2
    for name in settings.branches:
        assert resolve_target(settings, name).branch == name


def test_empty_file_gives_documented_defaults(tmp_path: Path) -> None:
    """An empty file means loopback on 5432, 30 s upstream timeout, no branch selected."""
    settings = load_settings(write(tmp_path, ""), {})
    assert settings.branch is None
    assert settings.log_level == "info"
    assert settings.listen.host == ("127.0.0.1", "::1")
    assert settings.listen.port == 5432
    assert settings.listen.max_sessions == 1000
    assert settings.listen.allow_non_loopback is False
    assert settings.local.password is None
    assert settings.upstream.connect_timeout == 30.0
    assert settings.upstream.keepalive is True
    assert settings.control.socket is None
    assert settings.branches == {}
    assert settings.config_path == tmp_path / "config.toml"


def test_full_file_is_read(tmp_path: Path) -> None:
    """Every documented key is read from the file."""
    path = write(
        tmp_path,
        f"""
branch = "feat/x"
log_level = "DEBUG"
[listen]
host = "::1"
port = 0
max_sessions = 5
[local]
password = "local-pw"
[upstream]
connect_timeout = 2.5
keepalive = false
[control]
socket = "ctl.sock"
[branches."feat/x"]
url = "{URL}"
tls = "no-verify"
user = "app"
database = "appdb"
[branches."release.v2"]
url = "{URL}"
""",
    )
    settings = load_settings(path, {})
    check_selected_branch(settings)
    assert settings.branch == "feat/x"
    assert settings.log_level == "debug"
    assert settings.listen.host == ("::1",)
    assert settings.listen.port == 0
    assert settings.listen.max_sessions == 5
    assert settings.local.password is not None
    assert settings.local.password.get_secret_value() == "local-pw"
    assert settings.upstream.connect_timeout == 2.5
    assert settings.upstream.keepalive is False
    assert settings.control.socket == Path("ctl.sock")
    feat = settings.branches["feat/x"]
    assert feat.url.get_secret_value() == URL
    assert (feat.tls, feat.user, feat.database) == (TlsMode.NO_VERIFY, "app", "appdb")
    assert sorted(settings.branches) == ["feat/x", "release.v2"]


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """NEONLOCAL_* variables win over the file, nested keys separated by "__"."""
    path = write(
        tmp_path,
        f'branch = "a"\n[listen]\nport = 5433\nmax_sessions = 7\n'
        f'[branches.a]\nurl = "{URL}"\n[branches.dev]\nurl = "{URL}"\n',
    )
    settings = load_settings(
        path,
        {
            "NEONLOCAL_LISTEN__PORT": "6543",
            "NEONLOCAL_BRANCH": "dev",
            "NEONLOCAL_CONFIG": "/elsewhere.toml",
            "OTHER": "x",
        },
    )
    assert settings.listen.port == 6543
    assert settings.listen.max_sessions == 7  # the rest of [listen] still comes from the file
    assert settings.branch == "dev"


def test_environment_alone_can_define_a_branch(tmp_path: Path) -> None:
    """Without a file (missing_ok), a branch and its URL can come from the environment."""
    settings = load_settings(
        tmp_path / "absent.toml",
        {"NEONLOCAL_BRANCH": "ci", "NEONLOCAL_BRANCHES__CI__URL": URL},
        missing_ok=True,
    )
    check_selected_branch(settings)
    assert resolve_target(settings, "ci").password == PASSWORD


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1",)),
        ("127.0.0.1, ::1", ("127.0.0.1", "::1")),
        ('["::1"]', ("::1",)),
    ],
)
def test_listen_hosts_from_the_environment(
    tmp_path: Path, value: str, expected: tuple[str, ...]
) -> None:
    """A listen address list can be given as one address, a comma list or JSON."""
    settings = load_settings(write(tmp_path, ""), {"NEONLOCAL_LISTEN__HOST": value})
    assert settings.listen.host == expected


def test_loading_reads_only_the_given_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The env mapping passed in is the only environment consulted."""
    monkeypatch.setenv("NEONLOCAL_LISTEN__PORT", "1111")
    assert load_settings(write(tmp_path, ""), {}).listen.port == 5432
    assert Settings().listen.port == 5432


def test_missing_file_is_an_error_unless_allowed(tmp_path: Path) -> None:
    """A missing file says so; with missing_ok it yields defaults."""
    path = tmp_path / "nope" / "config.toml"
    error = config_error(path)
    assert error.path == path
    assert "no such file" in str(error)
    assert load_settings(path, {}, missing_ok=True).listen.port == 5432


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    """Pointing --config at a directory gives a clear error."""
    assert "directory" in str(config_error(tmp_path))


def test_unknown_key_is_reported_with_its_line(tmp_path: Path) -> None:
    """A typo in a key is an error at the line where it is written."""
    path = write(tmp_path, "# comment\n\n[listen]\nport = 5432\nprot = 5433\n")
    error = config_error(path)
    assert error.line == 5
    assert str(error) == f"{path}:5: listen.prot: Extra inputs are not permitted"


def test_wrong_type_in_a_branch_table_points_at_the_key(tmp_path: Path) -> None:
    """A bad value deep in a quoted branch table is reported at that key's line."""
    path = write(
        tmp_path,
        f'branch = "feat/x"\n\n[branches."feat/x"]\nurl = "{URL}"\n'
        '# TLS policy\ntls = "sometimes"\n',
    )
    error = config_error(path)
    assert error.line == 6
    assert error.message.startswith('branches."feat/x".tls: Input should be')
    assert str(error).startswith(f"{path}:6: ")


def test_missing_url_points_at_the_branch_header(tmp_path: Path) -> None:
    """A branch table without `url` is reported at its header."""
    path = write(tmp_path, 'branch = "a"\n\n[branches.a]\ntls = "verify-ca"\n')
    error = config_error(path)
    assert (error.line, error.message) == (3, "branches.a.url: Field required")


def test_keys_inside_strings_do_not_confuse_line_numbers(tmp_path: Path) -> None:
    """Multi-line strings and arrays that look like keys or headers are skipped."""
    path = write(
        tmp_path,
        'log_level = """\n[listen]\nport = 1\n"""\n[listen]\nhost = [\n  "::1",\n]\nport = "x"\n',
    )
    error = config_error(path)
    assert [(p.line, p.message.split(":")[0]) for p in error.problems] == [
        (1, "log_level"),
        (9, "listen.port"),
    ]


TOML_PIECES = [*"ab[]{}#1", "b.c", " = ", "'''", '"""', '"', "'", "[[", "\n", "\\"]


@given(st.lists(st.sampled_from(TOML_PIECES)).map("".join))
def test_locating_keys_never_fails_or_hangs(text: str) -> None:
    """Finding error lines copes with any text (a safety net; it only sees valid TOML)."""
    lines = key_lines(text)
    assert all(1 <= line <= text.count("\n") + 1 for line in lines.values())


def test_inline_tables_and_dotted_keys_are_located(tmp_path: Path) -> None:
    """Values set through dotted keys or inline tables are reported on their line."""
    path = write(tmp_path, 'log_level = "info"\nlisten.port = "x"\nupstream = { keepalive = 3 }\n')
    error = config_error(path)
    assert [p.line for p in error.problems] == [2, 3]


def test_every_problem_is_reported(tmp_path: Path) -> None:
    """Several mistakes give several lines, each with its own location."""
    path = write(tmp_path, "[listen]\nport = 70000\n[upstream]\nconnect_timeout = 0\n")
    error = config_error(path)
    assert str(error).splitlines() == [
        f"{path}:2: listen.port: Input should be less than or equal to 65535",
        f"{path}:4: upstream.connect_timeout: Input should be greater than 0",
    ]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[listen]\nport = -1\n", "listen.port"),
        ("[listen]\nmax_sessions = 0\n", "listen.max_sessions"),
        ("[listen]\nhost = []\n", "listen.host"),
        ("[upstream]\nconnect_timeout = -5\n", "upstream.connect_timeout"),
        ("[upstream]\nconnect_timeout = inf\n", "upstream.connect_timeout"),
        ('log_level = "verbose"\n', "log_level"),
        ('branch = ""\n', "branch"),
        ('[local]\npassword = ""\n', "local.password"),
        ('[branches.a]\nurl = "postgresql:///db"\n', "branches.a.url"),
        ('[branches.a]\nurl = "postgresql://h/db"\nuser = ""\n', "branches.a.user"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path: Path, text: str, where: str) -> None:
    """Ports, limits, timeouts and names are validated when the file is loaded."""
    assert config_error(write(tmp_path, text)).message.startswith(f"{where}: ")


def test_port_zero_means_any_free_port(tmp_path: Path) -> None:
    """port = 0 is accepted (the OS picks a port)."""
    assert load_settings(write(tmp_path, "[listen]\nport = 0\n"), {}).listen.port == 0


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    """Broken TOML is reported at the line tomllib found it, with the column."""
    path = write(tmp_path, 'branch = "a"\n[listen]\nport = \n')
    error = config_error(path)
    assert error.line == 3
    assert str(error).startswith(f"{path}:3: invalid TOML: ")
    assert "column" in str(error)


def test_bad_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 is reported as such, not as a crash."""
    path = tmp_path / "config.toml"
    path.write_bytes(b'branch = "\xff"\n')
    assert "UTF-8" in str(config_error(path))


def test_bad_value_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    """A value that came from the environment is blamed on the variable, not a line."""
    path = write(tmp_path, "[listen]\nport = 5432\n")
    error = config_error(path, {"NEONLOCAL_LISTEN__PORT": "many"})
    assert error.line is None
    assert error.env_var == "NEONLOCAL_LISTEN__PORT"
    assert str(error).startswith("environment variable NEONLOCAL_LISTEN__PORT: listen.port: ")


def test_undecodable_json_in_the_environment_names_the_variable(tmp_path: Path) -> None:
    """A table given as non-JSON text in the environment is blamed on that variable."""
    error = config_error(write(tmp_path, ""), {"NEONLOCAL_LISTEN": "port=1"})
    assert error.env_var == "NEONLOCAL_LISTEN"


def test_file_problem_is_not_blamed_on_an_unrelated_variable(tmp_path: Path) -> None:
    """With env overriding one key of a table, a bad other key is still found in the file."""
    path = write(tmp_path, "[listen]\nport = 1\nmax_sessions = 0\n")
    error = config_error(path, {"NEONLOCAL_LISTEN__PORT": "6543"})
    assert (error.line, error.env_var) == (3, None)


@pytest.mark.parametrize(
    "text",
    [
        f'[branches.a]\nurl = ["{URL}"]\n',
        f'[branches.a]\nurl = {{ value = "{URL}" }}\n',
        f'[branches.a]\nurl = "{URL.replace("@ep-", "@h1,ep-")}"\n',
        f'[branches.a]\nurl = "{URL.replace("/neondb", ":{PASSWORD}/neondb")}"\n',
        f'[branches.a]\nurl = "{URL}?{PASSWORD}=1"\n',
        f'[local]\npassword = ["{PASSWORD}"]\n',
    ],
)
def test_secrets_never_appear_in_config_errors(tmp_path: Path, text: str) -> None:
    """A bad URL or password value is reported without echoing it, even in the traceback."""
    error = config_error(write(tmp_path, text))
    assert PASSWORD not in str(error)
    assert PASSWORD not in "".join(traceback.format_exception(error))


def test_secrets_never_appear_in_settings_repr(tmp_path: Path) -> None:
    """Printing loaded settings shows neither branch URLs' passwords nor the local password."""
    path = write(tmp_path, f'[local]\npassword = "{PASSWORD}x"\n[branches.a]\nurl = "{URL}"\n')
    settings = load_settings(path, {})
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)


def test_selected_branch_must_be_configured(tmp_path: Path) -> None:
    """check_selected_branch blames the `branch` line and lists the known names."""
    path = write(tmp_path, f'# hi\nbranch = "dev-mara"\n[branches.dev-maria]\nurl = "{URL}"\n')
    settings = load_settings(path, {})  # loading alone accepts any name
    with pytest.raises(ConfigError) as caught:
        check_selected_branch(settings)
    assert caught.value.line == 2
    assert str(caught.value) == (
        f'{path}:2: branch: unknown branch "dev-mara"; known: dev-maria (did you mean "dev-maria"?)'
    )


def test_selected_branch_from_the_environment_blames_the_variable(tmp_path: Path) -> None:
    """An unknown branch chosen through NEONLOCAL_BRANCH names that variable."""
    settings = load_settings(write(tmp_path, 'branch = "a"\n'), {"NEONLOCAL_BRANCH": "b"})
    with pytest.raises(ConfigError) as caught:
        check_selected_branch(settings)
    assert caught.value.env_var == "NEONLOCAL_BRANCH"


def test_no_selected_branch_passes_the_check(tmp_path: Path) -> None:
    """With no branch selected there is nothing to check."""
    check_selected_branch(load_settings(write(tmp_path, ""), {}))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "myhost.lan"])  # noqa: S104
def test_non_loopback_listen_needs_opt_in_and_password(tmp_path: Path, host: str) -> None:
    """Listening beyond loopback is refused unless allowed AND protected by a password."""
    path = write(tmp_path, f'[listen]\nhost = ["127.0.0.1", "{host}"]\n')
    error = config_error(path)
    assert error.line == 2
    assert "allow_non_loopback" in error.message
    only_allowed = write(tmp_path, f'[listen]\nhost = "{host}"\nallow_non_loopback = true\n')
    assert "password" in config_error(only_allowed).message
    both = f'[listen]\nhost = "{host}"\nallow_non_loopback = true\n[local]\npassword = "pw"\n'
    assert load_settings(write(tmp_path, both), {}).listen.host == (host,)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.2", "::1"])
def test_loopback_addresses_need_no_opt_in(tmp_path: Path, host: str) -> None:
    """Any loopback address may be used without a password."""
    settings = load_settings(write(tmp_path, f'[listen]\nhost = "{host}"\n'), {})
    assert settings.listen.host == (host,)


def test_settings_equal_when_only_comments_differ(tmp_path: Path) -> None:
    """Reformatting the file does not count as a configuration change."""
    first = load_settings(write(tmp_path, f'branch = "a"\n[branches.a]\nurl = "{URL}"\n'), {})
    second = load_settings(
        write(tmp_path, f'# note\n\nbranch = "a"  # current\n\n[branches.a]\nurl = "{URL}"\n'), {}
    )
    assert first == second
    third = load_settings(write(tmp_path, f'branch = "b"\n[branches.a]\nurl = "{URL}"\n'), {})
    assert first != third


def test_settings_are_immutable(tmp_path: Path) -> None:
    """Loaded settings cannot be changed behind the daemon's back."""
    settings = load_settings(write(tmp_path, ""), {})
    with pytest.raises(AttributeError, match="cannot assign"):
        settings.branch = "x"


# --- paths ------------------------------------------------------------------------------


def test_config_path_defaults_to_xdg_config_home() -> None:
    """The default file is $XDG_CONFIG_HOME/neonlocal/config.toml, else ~/.config/..."""
    assert default_config_path({"XDG_CONFIG_HOME": "/x/cfg", "HOME": "/home/m"}) == Path(
        "/x/cfg/neonlocal/config.toml"
    )
    assert default_config_path({"HOME": "/home/m"}) == Path("/home/m/.config/neonlocal/config.toml")
    # A relative XDG_CONFIG_HOME is invalid per the XDG spec and ignored.
    assert default_config_path({"XDG_CONFIG_HOME": "rel", "HOME": "/home/m"}) == Path(
        "/home/m/.config/neonlocal/config.toml"
    )


def test_neonlocal_config_overrides_the_default_path() -> None:
    """NEONLOCAL_CONFIG wins over XDG, with ~ expanded from HOME."""
    env = {"NEONLOCAL_CONFIG": "~/work/nl.toml", "XDG_CONFIG_HOME": "/x", "HOME": "/home/m"}
    assert default_config_path(env) == Path("/home/m/work/nl.toml")


def test_control_socket_is_per_config_file(tmp_path: Path) -> None:
    """Different config files get different sockets; the same file always the same one."""
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    a = control_socket_path(tmp_path / "a.toml", env)
    b = control_socket_path(tmp_path / "b.toml", env)
    assert a != b
    assert a == control_socket_path(tmp_path / "sub" / ".." / "a.toml", env)
    assert a.parent == tmp_path / "neonlocal"
    assert a.suffix == ".sock"
    assert len(a.stem) == 12


def test_control_socket_without_runtime_dir_is_in_a_per_user_tmp_dir(tmp_path: Path) -> None:
    """Without XDG_RUNTIME_DIR the socket lives in /tmp/neonlocal-<uid>/."""
    path = control_socket_path(tmp_path / "a.toml", {})
    assert path.parent == Path(f"/tmp/neonlocal-{os.getuid()}")


def test_control_socket_path_stays_short() -> None:
    """A very long runtime dir falls back to /tmp so the socket path fits AF_UNIX."""
    long_dir = "/run/" + "x" * 120
    path = control_socket_path(
        Path("/home/m/.config/neonlocal/config.toml"), {"XDG_RUNTIME_DIR": long_dir}
    )
    assert len(str(path)) < 100
    assert not str(path).startswith(long_dir)


def test_configured_control_socket_is_relative_to_the_config_dir(tmp_path: Path) -> None:
    """[control] socket wins; a relative one sits next to the config file."""
    config = tmp_path / "c" / "config.toml"
    assert control_socket_path(config, {}, Path("ctl.sock")) == tmp_path / "c" / "ctl.sock"
    assert control_socket_path(config, {}, Path("/run/x.sock")) == Path("/run/x.sock")


def test_state_dir_is_the_config_files_directory(tmp_path: Path) -> None:
    """Generated state goes beside the config file."""
    assert state_dir(tmp_path / "config.toml") == tmp_path


def test_private_dir_is_created_0700_and_tightened(tmp_path: Path) -> None:
    """ensure_private_dir makes a 0700 directory and fixes a too-open one we own."""
    created = ensure_private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(created.stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    ensure_private_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


def test_private_dir_refuses_a_symlink(tmp_path: Path) -> None:
    """A symlink planted where the private directory should be is refused."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError):
        ensure_private_dir(tmp_path / "link")


def test_private_dir_refuses_another_users_directory(tmp_path: Path) -> None:
    """A directory owned by someone else is refused (needs root to set up)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PermissionError, match="another user"):
        ensure_private_dir(theirs)
