"""Where the Neon API key and URL come from, and why a readable key file is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neonlocal.apikey import ApiKeyError, api_url, load_api_key, open_api, read_key_file
from neonlocal.config.schema import Settings, load_settings
from neonlocal.neon import DEFAULT_API_URL

KEY = "napi_unit-test-key-0123456789"


def settings_with(tmp_path: Path, neon: str = "") -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(f'[neon]\nproject_id = "p-1"\n{neon}')
    return load_settings(path, {})


def key_file(tmp_path: Path, mode: int, text: str = KEY + "\n") -> Path:
    path = tmp_path / "neon-api-key"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_environment_key_wins_over_the_key_file(tmp_path: Path) -> None:
    key_file(tmp_path, 0o600, "napi_from-the-file\n")
    settings = settings_with(tmp_path, 'api_key_file = "neon-api-key"\n')
    assert load_api_key(settings, {"NEON_API_KEY": f"  {KEY} "}) == KEY


def test_a_private_key_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    key_file(tmp_path, 0o600)
    settings = settings_with(tmp_path, 'api_key_file = "neon-api-key"\n')
    assert load_api_key(settings, {}) == KEY


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620])
def test_a_key_file_other_users_can_reach_is_refused_like_ssh_does(
    tmp_path: Path, mode: int
) -> None:
    path = key_file(tmp_path, mode)
    with pytest.raises(ApiKeyError) as caught:
        read_key_file(path)
    message = str(caught.value)
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message
    assert KEY not in message


def test_a_key_file_mode_0400_is_accepted(tmp_path: Path) -> None:
    assert read_key_file(key_file(tmp_path, 0o400)) == KEY


def test_a_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    real = key_file(tmp_path, 0o600)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ApiKeyError, match="symbolic link"):
        read_key_file(link)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("\n  \n", "is empty"), (f"{KEY}\nsecond line\n", "more than one line")],
)
def test_a_key_file_must_hold_exactly_one_key(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ApiKeyError, match=problem) as caught:
        read_key_file(key_file(tmp_path, 0o600, text))
    assert KEY not in str(caught.value)


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, 'api_key_file = "nowhere"\n')
    with pytest.raises(ApiKeyError, match=r"nowhere does not exist"):
        load_api_key(settings, {})


def test_without_any_key_the_message_says_where_to_put_one(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError) as caught:
        load_api_key(settings_with(tmp_path), {})
    assert "NEON_API_KEY" in str(caught.value)
    assert "api_key_file" in str(caught.value)
    assert "neonlocal init" in str(caught.value)


def test_the_api_url_comes_from_the_config_then_neon_api_host_then_the_default(
    tmp_path: Path,
) -> None:
    plain = settings_with(tmp_path)
    assert api_url(plain, {}) == DEFAULT_API_URL == "https://console.neon.tech/api/v2"
    assert api_url(plain, {"NEON_API_HOST": "http://127.0.0.1:9/api/v2"}) == (
        "http://127.0.0.1:9/api/v2"
    )
    configured = settings_with(tmp_path, 'api_url = "http://127.0.0.1:8/api/v2"\n')
    assert api_url(configured, {"NEON_API_HOST": "http://127.0.0.1:9/api/v2"}) == (
        "http://127.0.0.1:8/api/v2"
    )


async def test_the_client_reaches_the_chosen_url_and_hides_the_key(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, 'api_url = "http://127.0.0.1:8/api/v2"\n')
    async with open_api(settings, {"NEON_API_KEY": KEY}) as api:
        assert api.base_url == "http://127.0.0.1:8/api/v2"
        assert KEY not in repr(api)


def test_a_key_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    path = key_file(tmp_path, 0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(ApiKeyError, match="belongs to another user"):
        read_key_file(path)
