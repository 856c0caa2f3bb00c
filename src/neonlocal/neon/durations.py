"""Durations as users type them for ``--expires-in``: ``30m``, ``12h``, ``7d``, ``1d12h``."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_PART = re.compile(r"(\d+)\s*([smhdw])")
_WHOLE = re.compile(r"(?:\d+\s*[smhdw]\s*)+")


class InvalidDuration(ValueError):
    """The text is not a duration we understand."""

    def __init__(self, text: str, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"invalid duration '{text}'{why}: use a number and a unit s, m, h, d or w, "
            "e.g. 30m, 12h, 7d or 1d12h"
        )


def parse_duration(text: str) -> timedelta:
    """``"7d"`` -> 7 days. Units combine (``"1h30m"``); the total must be positive."""
    compact = text.strip().lower()
    if not _WHOLE.fullmatch(compact):
        raise InvalidDuration(text)
    total = timedelta()
    for amount, unit in _PART.findall(compact):
        try:
            total += timedelta(**{_UNITS[unit]: int(amount)})
        except OverflowError:
            raise InvalidDuration(text, "too long") from None
    if total <= timedelta():
        raise InvalidDuration(text, "must be longer than zero")
    return total
