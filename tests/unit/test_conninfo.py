"""libpq connection strings: what a pasted Neon URL or key=value string means."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neonlocal.conninfo import ConnInfo, ConnInfoError, parse_conninfo

NEON_URL = (
    "postgresql://neondb_owner:npg_S3cretPw@ep-cool-rain-123456.us-east-2.aws.neon.tech"
    "/neondb?sslmode=require&channel_binding=require"
)
SECRET = "npg_S3cretPw"


def test_neon_connection_string_gives_every_part() -> None:
    """The string `neon connection-string` prints yields host, role, password and database."""
    info = parse_conninfo(NEON_URL)
    assert info.host == "ep-cool-rain-123456.us-east-2.aws.neon.tech"
    assert info.port == 5432
    assert info.user == "neondb_owner"
    assert info.password == SECRET
    assert info.dbname == "neondb"
    assert info.sslmode == "require"
    assert info.channel_binding == "require"
    assert info.extra == {}


def test_postgres_scheme_is_the_same_as_postgresql() -> None:
    """Both URI schemes libpq accepts mean the same thing."""
    assert parse_conninfo(NEON_URL.replace("postgresql://", "postgres://", 1)) == parse_conninfo(
        NEON_URL
    )


def test_percent_encoded_parts_are_decoded() -> None:
    """A password with @ / : and non-ASCII characters survives percent-encoding."""
    info = parse_conninfo(
        "postgresql://r%C3%B6le:p%40ss%2Fw%3Ard@h.example:6543/my%20db"
        "?application_name=my%20app&options=-c%20search_path%3Dapp"
    )
    assert info.user == "röle"
    assert info.password == "p@ss/w:rd"
    assert info.port == 6543
    assert info.dbname == "my db"
    assert info.application_name == "my app"
    assert info.options == "-c search_path=app"


def test_plus_is_not_a_space() -> None:
    """Like libpq, "+" in a URI stays "+" (it is not form encoding)."""
    assert parse_conninfo("postgresql://u:a+b@h/db").password == "a+b"


def test_ipv6_host_in_brackets() -> None:
    """An IPv6 literal host is written in brackets and comes out without them."""
    info = parse_conninfo("postgresql://u@[::1]:6543/db")
    assert info.host == "::1"
    assert info.port == 6543


def test_query_parameters_override_the_authority() -> None:
    """host/port/user given as query parameters win over the ones before them."""
    info = parse_conninfo("postgresql://u@first:1111/db?host=second&port=2222&user=v")
    assert (info.host, info.port, info.user) == ("second", 2222, "v")


def test_hostaddr_and_sslrootcert_are_kept() -> None:
    """hostaddr and sslrootcert are read from the query string."""
    info = parse_conninfo(
        "postgresql://u@ep-a.us-east-2.aws.neon.tech/db?hostaddr=127.0.0.2&sslrootcert=%2Ftmp%2Fca.pem"
    )
    assert info.hostaddr == "127.0.0.2"
    assert info.sslrootcert == "/tmp/ca.pem"


def test_jdbc_style_ssl_true_means_require() -> None:
    """libpq's compatibility spelling ssl=true is sslmode=require."""
    assert parse_conninfo("postgresql://h/db?ssl=true").sslmode == "require"


def test_other_libpq_keywords_are_kept_in_extra() -> None:
    """Recognised keywords neonlocal does not act on are accepted and kept."""
    info = parse_conninfo(
        "postgresql://h/db?connect_timeout=10&sslnegotiation=direct&target_session_attrs=any"
    )
    assert info.extra == {
        "connect_timeout": "10",
        "sslnegotiation": "direct",
        "target_session_attrs": "any",
    }


def test_keyword_form_with_quotes_and_escapes() -> None:
    """The key=value form handles spaces around "=", quoted values and backslash escapes."""
    info = parse_conninfo(
        r"host=ep-a.neon.tech port = 6543 user=me password='it\'s a \\secret' dbname=a\ b"
    )
    assert info.host == "ep-a.neon.tech"
    assert info.port == 6543
    assert info.user == "me"
    assert info.password == "it's a \\secret"
    assert info.dbname == "a b"


def test_keyword_form_later_values_win_and_empty_means_default() -> None:
    """A repeated keyword overrides; an empty value is the same as leaving it out."""
    info = parse_conninfo("host=a host=b port=")
    assert info.host == "b"
    assert info.port == 5432


def test_empty_strings_give_defaults() -> None:
    """An empty connection string is valid and means all defaults."""
    assert parse_conninfo("") == ConnInfo()
    assert parse_conninfo("postgresql://") == ConnInfo()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:pw@h1,h2/db", "multiple hosts"),
        ("postgresql://u:pw@h1:5432,h2:5433/db", "multiple hosts"),
        ("host=h1,h2 password=pw", "multiple hosts"),
        (
            "postgresql://u:pw@h/db?sslmode=require&color=blue",
            'invalid URI query parameter "color"',
        ),
        ("host=h colour=blue password=pw", 'invalid connection option "colour"'),
        ("postgresql://u:pw@h:port/db", "invalid port number"),
        ("postgresql://u:pw@h:70000/db", "invalid port number"),
        ("host=h port=0 password=pw", "invalid port number"),
        ("postgresql://u:p%zzw@h/db", "percent-encoded"),
        ("postgresql://u:p%00w@h/db", "%00"),
        ("postgresql://u:pw@[::1/db", '"]"'),
        ("postgresql://u:pw@[]/db", "IPv6"),
        ("postgresql://u:pw@h/db?sslmode", '"="'),
        ("postgresql://u:pw@h/db?a=b=c", '"="'),
        ("host=h password='unterminated", "unterminated"),
        ("host=h password", '"="'),
        ("postgresql://u:pw@h/db?sslmode=sometimes", "sslmode"),
        ("postgresql://u:pw@h/db?channel_binding=maybe", "channel_binding"),
        ("host=h\0 password=pw", "NUL"),
    ],
)
def test_bad_strings_are_refused_with_a_reason(text: str, expected: str) -> None:
    """Strings libpq refuses (and multi-host strings) raise ConnInfoError saying why."""
    with pytest.raises(ConnInfoError) as caught:
        parse_conninfo(text)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        # An unescaped "/" in the password makes libpq read it as host:port.
        f"postgresql://neondb_owner:{SECRET}/x@ep-a.neon.tech/db",
        # A single slash: not a URI, so the whole thing is a malformed keyword.
        f"postgresql:/neondb_owner:{SECRET}@ep-a.neon.tech/db",
        f"postgresql://u@h/db?{SECRET}",
        f"postgresql://u@h/db?password={SECRET}&sslmode={SECRET}",
        f"postgresql://u:{SECRET}@h/db?sslmode=require&{SECRET}=1",
        f"postgresql://u:{SECRET}%zz@h/db",
        f"host=h password={SECRET} {SECRET}",
        f"host=h port={SECRET}",
        f"host=h password='{SECRET}",
    ],
)
def test_error_messages_never_contain_the_password(text: str) -> None:
    """Whatever is wrong with a string, the message does not repeat the secret in it."""
    with pytest.raises(ConnInfoError) as caught:
        parse_conninfo(text)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)


def test_a_lowercase_password_misplaced_as_a_keyword_is_not_shown() -> None:
    """Keyword-looking tokens are named in errors, except when they are the password."""
    with pytest.raises(ConnInfoError) as caught:
        parse_conninfo("postgresql://u:opensesame@h/db?opensesame=1")
    assert "opensesame" not in str(caught.value)


def test_repr_hides_the_password() -> None:
    """Printing a ConnInfo (logs, tracebacks) shows that a password exists, not what it is."""
    info = parse_conninfo(NEON_URL + "&sslpassword=keypass")
    text = repr(info)
    assert SECRET not in text
    assert "keypass" not in text
    assert "password='***'" in text
    assert "ep-cool-rain-123456" in text


def test_redacted_url_hides_secrets_and_keeps_the_rest() -> None:
    """redacted() is a loggable URL that parses back to the same thing minus secrets."""
    info = parse_conninfo(NEON_URL + "&hostaddr=127.0.0.2&options=endpoint%3Dep-x&sslpassword=k")
    redacted = info.redacted()
    assert SECRET not in redacted
    assert "sslpassword=***" in redacted
    again = parse_conninfo(redacted)
    assert again == dataclasses.replace(
        info, password="***", extra={**info.extra, "sslpassword": "***"}
    )


def test_redacted_url_brackets_ipv6_and_encodes_names() -> None:
    """IPv6 hosts and odd characters in names still give a valid URL."""
    info = parse_conninfo("host=::1 user='a b' dbname=x/y")
    assert info.redacted() == "postgresql://a%20b@[::1]:5432/x%2Fy"
    assert parse_conninfo(info.redacted()) == info


@given(st.text())
def test_arbitrary_text_parses_or_raises_conninfoerror(text: str) -> None:
    """No input makes the parser fail with anything but ConnInfoError."""
    with contextlib.suppress(ConnInfoError):
        parse_conninfo(text)


@given(st.sampled_from(["postgresql://", "postgres://"]), st.text())
def test_arbitrary_uris_parse_or_raise_conninfoerror(scheme: str, rest: str) -> None:
    """URI parsing in particular never fails with anything but ConnInfoError."""
    with contextlib.suppress(ConnInfoError):
        parse_conninfo(scheme + rest)


@given(
    st.text(alphabet="ABCDEFGHJKMNPQRSTUVWXYZ0123456789", min_size=10, max_size=20),
    st.text(),
)
def test_the_password_never_reaches_an_error_message(password: str, rest: str) -> None:
    """Whatever follows the credentials, a failure message does not contain the password."""
    try:
        parse_conninfo(f"postgresql://u:{password}@{rest}")
    except ConnInfoError as exc:
        message = str(exc)
    else:
        return
    assert password not in message


def test_a_mistyped_scheme_is_named_and_the_password_is_not() -> None:
    with pytest.raises(ConnInfoError) as caught:
        parse_conninfo("postgresq://owner:npg_secret@ep-x.us-east-2.aws.neon.tech/neondb")
    assert str(caught.value) == (
        'the URL scheme "postgresq" is not one libpq knows: use postgresql:// or postgres://'
    )
    assert "npg_secret" not in str(caught.value)
