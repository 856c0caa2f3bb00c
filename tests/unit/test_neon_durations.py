"""`--expires-in` durations."""

from __future__ import annotations

from datetime import timedelta

import pytest

from neonlocal.neon import InvalidDuration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("90s", timedelta(seconds=90)),
        ("1d12h", timedelta(days=1, hours=12)),
        (" 1h 30m ", timedelta(hours=1, minutes=30)),
        ("7D", timedelta(days=7)),
    ],
)
def test_durations_in_the_usual_units_are_understood(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "1.5h", "-1d", "7 days", "h1", "1h-"])
def test_anything_else_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(InvalidDuration) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert f"'{text}'" in message
    assert "e.g. 30m, 12h, 7d" in message


def test_a_zero_duration_is_refused() -> None:
    with pytest.raises(InvalidDuration, match="longer than zero"):
        parse_duration("0m")


def test_an_absurdly_long_duration_is_refused_not_crashing() -> None:
    with pytest.raises(InvalidDuration, match="too long"):
        parse_duration("99999999999d")


def test_invalid_durations_are_value_errors() -> None:
    """Callers that only know ValueError (click's converters) still catch it."""
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("soon")
