"""What an API client is made with - its URL, retry policy and branch annotation - without
the client itself.

These are needed wherever the API might be called (the resolver, the CLI); the client and
its HTTP stack (httpx) only once it is. A daemon serving static branch URLs never loads them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType

DEFAULT_API_URL = "https://console.neon.tech/api/v2"
DEFAULT_ANNOTATION: Mapping[str, str] = MappingProxyType({"created-by": "neonlocal"})


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up on one call."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0
    # Seconds for all attempts of one call, waiting included; a Retry-After beyond it gives up.
    budget: float = 20.0

    def backoff(self, attempt: int) -> float:
        """Delay after the ``attempt``-th failure: doubling, capped, with half of it jittered."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        # Jitter spreads out clients that failed together; it protects nothing secret.
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with whole seconds, the precision Neon asks for in ``expires_at``."""
    if moment.tzinfo is None:
        raise ValueError("expires_at needs a timezone-aware datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
