"""Moments in branch names: `main@-1h`, `main@<RFC 3339>`, `main@<LSN>`, and what is not one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from neonlocal.moments import InvalidMoment, Moment, parse_moment

NOW = datetime(2026, 12, 5, 12, 30, 15, 123456, tzinfo=UTC)


def test_a_time_ago_is_counted_back_from_now_in_whole_seconds() -> None:
    moment = parse_moment("main@-1h30m", NOW)
    assert moment == Moment("main", timestamp=datetime(2026, 12, 5, 11, 0, 15, tzinfo=UTC))
    assert moment.branch_name == "main@2026-12-05T11:00:15Z"


def test_an_rfc3339_time_in_any_zone_becomes_utc() -> None:
    moment = parse_moment("main@2026-12-01T11:00:00+01:00", NOW)
    assert moment is not None
    assert moment.timestamp == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert moment.branch_name == "main@2026-12-01T10:00:00Z"


def test_an_lsn_is_kept_in_postgresql_s_spelling() -> None:
    assert parse_moment("release/v2@0/1de2850", NOW) == Moment("release/v2", lsn="0/1DE2850")


@pytest.mark.parametrize("name", ["main", "dev@laptop", "@-1h", "main@", "team@example"])
def test_names_that_are_not_moments_are_plain_branch_names(name: str) -> None:
    assert parse_moment(name, NOW) is None


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("main@-1x", "invalid duration"),
        ("main@2026-13-01T00:00:00Z", 'after "@" comes a moment'),
        ("main@2026-12-01T10:00:00", 'after "@" comes a moment'),  # no zone: ambiguous
        (f"main@{(NOW + timedelta(days=1)):%Y-%m-%dT%H:%M:%SZ}", "is in the future"),
    ],
)
def test_a_moment_that_cannot_be_one_says_why(name: str, says: str) -> None:
    with pytest.raises(InvalidMoment) as caught:
        parse_moment(name, NOW)
    assert says in str(caught.value)
