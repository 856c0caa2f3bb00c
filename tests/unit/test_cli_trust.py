"""`neonlocal trust`: where the local CA is, how clients use it, and `--install` for libpq."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from neonlocal.cli import main
from neonlocal.tls.local import tls_dir


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith(("NEONLOCAL_", "PG")):
            monkeypatch.delenv(name)
    path = tmp_path / "home"
    path.mkdir()
    return path


def trust(config: Path, home: Path, *args: str) -> Result:
    return CliRunner().invoke(
        main, ["--config", str(config), "trust", *args], env={"HOME": str(home)}
    )


def write(config: Path, text: str = "") -> Path:
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    return config


def test_trust_shows_the_ca_beside_the_config_and_how_clients_use_it(
    tmp_path: Path, home: Path
) -> None:
    """Before the daemon ever ran, the CA is made where `up` will find and reuse it."""
    config = write(tmp_path / "cfg" / "config.toml")
    done = trust(config, home)
    assert done.exit_code == 0, done.output
    ca = tls_dir(config) / "ca.crt"
    assert ca.is_file()
    assert f"local CA: {ca}" in done.output
    assert f"sslrootcert={ca}" in done.output
    assert f"PGSSLROOTCERT={ca}" in done.output
    assert f"NODE_EXTRA_CA_CERTS={ca}" in done.output
    assert not (home / ".postgresql").exists(), "showing installs nothing"
    again = trust(config, home)
    assert again.output == done.output
    assert ca.read_bytes() == (tls_dir(config) / "ca.crt").read_bytes()


def test_install_adds_the_ca_to_libpqs_root_crt_once(tmp_path: Path, home: Path) -> None:
    config = write(tmp_path / "config.toml")
    first = trust(config, home, "--install")
    assert first.exit_code == 0, first.output
    root = home / ".postgresql" / "root.crt"
    ca_pem = (tls_dir(config) / "ca.crt").read_text()
    assert f"added the neonlocal CA ({tls_dir(config) / 'ca.crt'}) to {root}" in first.output
    assert "is new" in first.output  # a new root.crt changes what sslmode=require checks

    second = trust(config, home, "--install")
    assert second.exit_code == 0, second.output
    assert "already in" in second.output
    assert root.read_text().count(ca_pem) == 1
    system = ssl.get_default_verify_paths().cafile
    if system and Path(system).is_file():
        assert root.read_text().startswith(Path(system).read_text())


def test_install_next_to_an_existing_root_crt_keeps_its_cas(tmp_path: Path, home: Path) -> None:
    config = write(tmp_path / "config.toml")
    root = home / ".postgresql" / "root.crt"
    root.parent.mkdir()
    company = trust(write(tmp_path / "other" / "config.toml"), home)  # any other CA will do
    assert company.exit_code == 0
    company_pem = (tmp_path / "other" / "tls" / "ca.crt").read_text()
    root.write_text(company_pem)

    done = trust(config, home, "--install")

    assert done.exit_code == 0, done.output
    assert "is new" not in done.output
    assert root.read_text() == company_pem + (tls_dir(config) / "ca.crt").read_text()


def test_trust_with_local_tls_off_says_there_is_nothing_to_trust(
    tmp_path: Path, home: Path
) -> None:
    config = write(tmp_path / "config.toml", "[local]\ntls = false\n")
    done = trust(config, home)
    assert done.exit_code == 1
    assert "local TLS is off" in done.output
    assert not tls_dir(config).exists()


def test_trust_with_a_configured_certificate_points_at_its_own_ca(
    tmp_path: Path, home: Path
) -> None:
    config = write(
        tmp_path / "config.toml",
        '[local]\ntls_cert = "/etc/my/cert.pem"\ntls_key = "/etc/my/key.pem"\n',
    )
    done = trust(config, home, "--install")
    assert done.exit_code == 1
    assert "your own certificate" in done.output
    assert "/etc/my/cert.pem" in done.output
    assert not (home / ".postgresql").exists()
