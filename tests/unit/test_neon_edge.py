"""Neon's edge errors read by their text, and startup parameters that survive the edge."""

from __future__ import annotations

import pytest

from neonlocal.neon.edge import (
    Retry,
    dropped_by_edge,
    fold_into_options,
    is_neon_host,
    is_pooler_host,
    meaning_of,
)


@pytest.mark.parametrize(
    ("message", "sqlstate", "retry"),
    [
        ("password authentication failed for user 'app'", "28P01", Retry.AFTER_REFRESH),
        (
            "Too many connections to this endpoint. Please try again later.",
            "53300",
            Retry.TRANSIENT,
        ),
        ("Too many connections attempts", "53300", Retry.TRANSIENT),
        (
            "Failed to acquire permit to connect to the database. Too many database connection "
            "attempts are currently ongoing.",
            "53300",
            Retry.TRANSIENT,
        ),
        ("sorry, too many clients already", "53300", Retry.NEVER),
        ('database "shop" does not exist', "3D000", Retry.NEVER),
        ("Couldn't connect to compute node", "08001", Retry.TRANSIENT),
        ("Couldn't connect to compute node: connection refused", "08001", Retry.TRANSIENT),
        ("Control plane request failed: endpoint is disabled", "08001", Retry.NEVER),
        (
            "Control plane request failed: endpoint is temporarily unavailable. Check your "
            "quotas and/or contact our support.",
            "57P03",
            Retry.NEVER,
        ),
        ("Your project has exceeded the compute time quota.", "57P03", Retry.NEVER),
    ],
)
def test_an_edge_error_gets_the_sqlstate_postgresql_would_send(
    message: str, sqlstate: str, retry: Retry
) -> None:
    """Everything the edge sends is XX000; drivers and pools decide by PostgreSQL's codes."""
    meaning = meaning_of("XX000", message)
    assert meaning is not None
    assert (meaning.sqlstate, meaning.retry) == (sqlstate, retry)


def test_a_real_sqlstate_is_never_reinterpreted() -> None:
    """A server that sent its own code (bare PostgreSQL) meant it."""
    assert meaning_of("28P01", "password authentication failed for user 'app'") is None
    assert meaning_of("53300", "Too many connections to this endpoint.") is None


def test_an_unknown_edge_text_passes_through() -> None:
    assert meaning_of("XX000", "something new the edge says") is None


def test_settings_the_edge_would_drop_move_into_options() -> None:
    """TimeZone and search_path reach the compute as -c settings, escaped as libpq does."""
    folded = fold_into_options(
        {
            "user": "app",
            "database": "neondb",
            "application_name": "psql",
            "options": "-c statement_timeout=5s",
            "TimeZone": "Europe/Paris",
            "search_path": "my schema,pub\\lic",
            "_pq_.protocol_option": "1",
        }
    )
    assert folded == {
        "user": "app",
        "database": "neondb",
        "application_name": "psql",
        "options": "-c statement_timeout=5s -c TimeZone=Europe/Paris "
        "-c search_path=my\\ schema,pub\\\\lic",
        "_pq_.protocol_option": "1",
    }


def test_parameters_the_edge_forwards_are_left_alone() -> None:
    params = {"user": "app", "database": "neondb", "application_name": "x"}
    assert fold_into_options(params) == params
    assert dropped_by_edge({**params, "DateStyle": "ISO", "TimeZone": "UTC"}) == [
        "DateStyle",
        "TimeZone",
    ]


@pytest.mark.parametrize(
    ("host", "neon", "pooler"),
    [
        ("ep-cool-rain-123456.us-east-2.aws.neon.tech", True, False),
        ("ep-cool-rain-123456-pooler.us-east-2.aws.neon.tech.", True, True),
        ("db.example.com", False, False),
        ("ep-x-pooler.example.com", False, False),
        ("127.0.0.1", False, False),
    ],
)
def test_neon_hosts_are_told_by_name(host: str, neon: bool, pooler: bool) -> None:
    assert (is_neon_host(host), is_pooler_host(host)) == (neon, pooler)
