"""Pipelined upstream login: the SCRAM first message leaves with the startup packet.

Against real PostgreSQL computes: after one ordinary login the daemon knows the server's SASL
offer and sends its SASLInitialResponse without waiting for AuthenticationSASL; a server
whose offer changed costs one retry on a new connection, never a failed client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fixtures.daemon import LocalDaemon, branch_of_new_session, serving
from neonlocal.pgwire import codec


def _ready_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "session_ready" in line]


def _offer_key(daemon: LocalDaemon) -> tuple[str, int, str, str]:
    server = daemon.daemon.server
    assert server is not None
    (key,) = server.sasl_offers
    return key


async def test_the_second_login_to_a_branch_is_pipelined(
    daemon: LocalDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first session asks the server; the next sends SCRAM ahead and still binds."""
    assert await branch_of_new_session(daemon) == "main"
    assert await branch_of_new_session(daemon) == "main"
    first, second = _ready_lines(capsys.readouterr().out)
    assert "pipelined=False" in first
    assert "pipelined=True" in second
    assert "auth=SCRAM-SHA-256-PLUS" in second
    assert "channel_binding=True" in second


async def test_a_stale_offer_costs_a_retry_not_a_failed_client(
    daemon: LocalDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """If the server no longer offers what we bet on, the session still comes up."""
    await branch_of_new_session(daemon)
    server = daemon.daemon.server
    assert server is not None
    key = _offer_key(daemon)
    real_offer = server.sasl_offers[key]
    # As if the server had offered only plain SCRAM last time: our pipelined answer then
    # says "y" (could bind, not offered), which this server, offering PLUS, must refuse.
    server.sasl_offers[key] = (codec.SCRAM_SHA_256,)
    assert await branch_of_new_session(daemon) == "main"
    out = capsys.readouterr().out
    assert "auth_pipelining_refused" in out
    assert server.sasl_offers[key] == real_offer
    # ...and the corrected offer is used again by the next session.
    assert await branch_of_new_session(daemon) == "main"
    assert "pipelined=True" in _ready_lines(capsys.readouterr().out)[-1]


@pytest.fixture
async def unpipelined(workdir: Path, branch_urls: dict[str, str]) -> AsyncIterator[LocalDaemon]:
    async with serving(workdir, branch_urls, "[upstream]\npipeline_auth = false") as running:
        yield running


async def test_pipelining_can_be_switched_off(
    unpipelined: LocalDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """With [upstream] pipeline_auth = false every login waits for the server's offer."""
    for _ in range(3):
        assert await branch_of_new_session(unpipelined) == "main"
    lines = _ready_lines(capsys.readouterr().out)
    assert len(lines) == 3
    assert all("pipelined=False" in line for line in lines)
