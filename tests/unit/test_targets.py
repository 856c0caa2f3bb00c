"""Branch tables become upstream targets; TLS is only ever weakened by an explicit opt-out."""

from __future__ import annotations

import pytest

from neonlocal.config.errors import UnknownBranch
from neonlocal.config.schema import SettingsSchema
from neonlocal.config.values import BranchSettings, Secret, Settings, TlsMode, from_schema
from neonlocal.conninfo import ConnInfoError
from neonlocal.targets import Negotiation, Target, TargetError, build_target, resolve_target

HOST = "ep-cool-rain-123456.us-east-2.aws.neon.tech"
PASSWORD = "npg_FakePw123"
URL = f"postgresql://neondb_owner:{PASSWORD}@{HOST}/neondb?sslmode=require&channel_binding=require"


def branch(url: str = URL, **fields: object) -> BranchSettings:
    """A [branches.b] table as the config check leaves it."""
    checked = SettingsSchema.model_validate({"branches": {"b": {"url": url, **fields}}})
    return from_schema(checked).branches["b"]


def test_neon_url_becomes_a_verified_target() -> None:
    """A pasted Neon URL gives a target that verifies the certificate against its host."""
    target = build_target("dev-maria", branch())
    assert target.branch == "dev-maria"
    assert (target.host, target.port, target.hostaddr) == (HOST, 5432, None)
    assert (target.user, target.password, target.database) == ("neondb_owner", PASSWORD, "neondb")
    assert target.tls is TlsMode.VERIFY_FULL
    assert not target.insecure
    assert target.sslrootcert is None
    assert target.channel_binding == "require"


@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer", "require", "verify-ca"])
def test_sslmode_in_the_url_never_weakens_verification(sslmode: str) -> None:
    """Whatever sslmode a pasted URL carries, the target still verifies fully."""
    target = build_target("b", branch(f"postgresql://u:p@{HOST}/db?sslmode={sslmode}"))
    assert target.tls is TlsMode.VERIFY_FULL
    assert not target.insecure


@pytest.mark.parametrize("mode", list(TlsMode))
def test_tls_key_is_the_opt_out(mode: TlsMode) -> None:
    """Only the branch table's `tls` key changes verification, and anything weaker is insecure."""
    target = build_target("b", branch(tls=mode.value))
    assert target.tls is mode
    assert target.insecure is (mode is not TlsMode.VERIFY_FULL)


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", None), ("?sslrootcert=system", None), ("?sslrootcert=%2Fetc%2Fca.pem", "/etc/ca.pem")],
)
def test_sslrootcert_system_or_absent_means_the_system_store(
    query: str, expected: str | None
) -> None:
    """No sslrootcert, or "system", selects the system trust store; a path is a CA file."""
    assert build_target("b", branch(f"postgresql://u@{HOST}/db{query}")).sslrootcert == expected


@pytest.mark.parametrize(
    ("url", "negotiation", "direct"),
    [
        (URL, Negotiation.AUTO, True),
        (URL + "&sslnegotiation=postgres", Negotiation.POSTGRES, False),
        (URL + "&sslnegotiation=direct", Negotiation.DIRECT, True),
        (URL + "&hostaddr=10.0.0.7", Negotiation.AUTO, False),
        ("postgresql://u:p@db.example.com/app", Negotiation.AUTO, False),
        ("postgresql://u:p@db.example.com/app?sslnegotiation=direct", Negotiation.DIRECT, True),
    ],
    ids=["neon-host", "postgres", "direct", "neon-host-by-address", "other-host", "other-direct"],
)
def test_tls_starts_direct_where_the_url_or_a_neon_host_says(
    url: str, negotiation: Negotiation, direct: bool
) -> None:
    """Neon's edge takes direct TLS, so its hosts get it unless the URL says otherwise (or
    pins an address, behind which may be anything); other servers only when the URL asks."""
    target = build_target("b", branch(url))
    assert target.negotiation is negotiation
    assert target.tries_direct_tls is direct


def test_unusable_sslnegotiation_is_refused_naming_the_branch() -> None:
    with pytest.raises(
        TargetError, match='branch "b": sslnegotiation must be "postgres" or "direct"'
    ):
        build_target("b", branch(URL + "&sslnegotiation=fast"))
    with pytest.raises(TargetError, match="sslnegotiation=direct needs TLS"):
        build_target("b", branch(URL + "&sslnegotiation=direct", tls="disable"))


def test_hostaddr_is_dialled_but_the_host_name_is_verified() -> None:
    """With hostaddr the TCP connection goes to that IP, while SNI and checks use the host."""
    target = build_target("b", branch(f"postgresql://u@{HOST}:6543/db?hostaddr=127.0.0.2"))
    assert target.connect_host == "127.0.0.2"
    assert target.host == HOST
    assert target.describe() == f"{HOST}:6543"


def test_without_hostaddr_the_host_is_dialled() -> None:
    """Without hostaddr the connection goes to the host name."""
    assert build_target("b", branch()).connect_host == HOST


def test_url_role_and_database_are_only_defaults() -> None:
    """The URL's user and dbname are defaults the client may override (not pinned)."""
    target = build_target("b", branch())
    assert not target.pin_user
    assert not target.pin_database


def test_table_user_and_database_pin_the_session() -> None:
    """`user`/`database` in the table replace the URL's and are pinned."""
    target = build_target("b", branch(user="app", database="appdb"))
    assert (target.user, target.database) == ("app", "appdb")
    assert target.pin_user
    assert target.pin_database


def test_pins_apply_without_user_or_database_in_the_url() -> None:
    """A pin works even when the URL names no role or database."""
    target = build_target("b", branch(f"postgresql://{HOST}", user="app"))
    assert target.user == "app"
    assert target.database is None
    assert target.pin_user
    assert not target.pin_database


def test_channel_binding_defaults_to_prefer_and_options_pass_through() -> None:
    """Unset channel_binding means prefer; options and application_name are carried along."""
    target = build_target(
        "b", branch(f"postgresql://u@{HOST}/db?options=endpoint%3Dep-x&application_name=svc")
    )
    assert target.channel_binding == "prefer"
    assert target.options == "endpoint=ep-x"
    assert target.application_name == "svc"


def test_target_text_never_shows_the_password() -> None:
    """repr and describe of a target (as logs and status print them) omit the password."""
    target = build_target("b", branch())
    assert PASSWORD not in repr(target)
    assert PASSWORD not in str(target)
    assert PASSWORD not in target.describe()
    assert target.describe() == f"{HOST}:5432"


def test_ipv6_hosts_are_bracketed_in_descriptions() -> None:
    """An IPv6 literal host reads unambiguously next to its port."""
    assert build_target("b", branch("postgresql://u@[::1]:6000/db")).describe() == "[::1]:6000"


def test_unusable_url_raises_target_error_naming_the_branch() -> None:
    """A URL that cannot be served is a TargetError (a ConnInfoError) naming the branch."""
    # Built directly, settings are not checked, as a caller holding unchecked ones might.
    unchecked = BranchSettings(
        url=Secret(f"postgresql://u:{PASSWORD}@h1,h2/db"), tls=TlsMode.VERIFY_FULL
    )
    with pytest.raises(TargetError) as caught:
        build_target("feat/x", unchecked)
    assert isinstance(caught.value, ConnInfoError)
    assert caught.value.branch == "feat/x"
    assert 'branch "feat/x"' in str(caught.value)
    assert "multiple hosts" in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql:///db", "no host"),
        ("host=/var/run/postgresql", "Unix-domain"),
        (f"postgresql://{HOST}/db?hostaddr=ep-x.neon.tech", "numeric IP"),
    ],
)
def test_urls_neonlocal_cannot_serve_are_refused(url: str, reason: str) -> None:
    """No host, a Unix socket, or a non-numeric hostaddr cannot make a target."""
    unchecked = BranchSettings(url=Secret(url), tls=TlsMode.VERIFY_FULL)
    with pytest.raises(TargetError, match=reason):
        build_target("b", unchecked)


def test_resolve_target_finds_a_configured_branch() -> None:
    """resolve_target builds the target of the named branch table."""
    settings = Settings(branches={"dev": branch(), "main": branch(f"postgresql://u@{HOST}/main")})
    target = resolve_target(settings, "main")
    assert isinstance(target, Target)
    assert (target.branch, target.database) == ("main", "main")


def test_unknown_branch_lists_known_names_and_suggests_one() -> None:
    """An unknown name lists the configured branches and suggests the closest."""
    settings = Settings(branches={"main": branch(), "dev-maria": branch()})
    with pytest.raises(UnknownBranch) as caught:
        resolve_target(settings, "dev-mara")
    assert caught.value.name == "dev-mara"
    assert caught.value.known == ["dev-maria", "main"]
    assert str(caught.value) == (
        'unknown branch "dev-mara"; known: dev-maria, main (did you mean "dev-maria"?)'
    )


def test_unknown_branch_without_a_close_match_only_lists() -> None:
    """With no similar name there is no suggestion."""
    error = UnknownBranch("zzz", ["main", "dev"])
    assert str(error) == 'unknown branch "zzz"; known: dev, main'


def test_unknown_branch_with_nothing_configured_says_so() -> None:
    """With no branches at all the message says none are configured."""
    with pytest.raises(UnknownBranch, match="no branches are configured"):
        resolve_target(Settings(), "main")
