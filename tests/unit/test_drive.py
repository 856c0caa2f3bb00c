"""drive(): the one loop that runs every pgwire machine over a connection."""

from __future__ import annotations

from neonlocal.pgwire import codec
from neonlocal.pgwire.reset import ResetExchange, ResetResult
from neonlocal.proxy.drive import drive


class Countdown:
    """Done after ``steps`` reads; each output is the bytes it was given, upper-cased."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def receive(self, data: bytes) -> bytes:
        self.steps -= 1
        return data.upper()

    @property
    def done(self) -> bool:
        return self.steps == 0


async def test_drive_reads_until_done_and_hands_each_output_on() -> None:
    chunks = iter([b"a", b"b", b"c", b"never read"])
    acted: list[bytes] = []

    async def read() -> bytes:
        return next(chunks)

    await drive(Countdown(3), read, acted.append)
    assert acted == [b"A", b"B", b"C"]
    assert next(chunks) == b"never read"


async def test_drive_awaits_an_act_that_is_a_coroutine() -> None:
    acted: list[bytes] = []

    async def read() -> bytes:
        return b"x"

    async def act(output: bytes) -> None:
        acted.append(output)

    await drive(Countdown(2), read, act)
    assert acted == [b"X", b"X"]


async def test_drive_runs_a_reset_to_its_result() -> None:
    """DISCARD ALL answered in two reads: CommandComplete, then ReadyForQuery idle."""
    answer = [
        codec.message(b"C", b"DISCARD ALL\0"),
        codec.ready_for_query(codec.IDLE),
    ]
    reset = ResetExchange()

    async def read() -> bytes:
        return answer.pop(0)

    results: list[ResetResult] = []
    await drive(reset, read, results.append)
    assert results == [ResetResult.PENDING, ResetResult.CLEAN]
    assert reset.done
