"""Running a pgwire state machine over a connection: the one loop every exchange uses.

Each machine in ``neonlocal.pgwire`` (the startup phase, local authentication, the upstream
login, the reset of a reused session) has the same shape: ``receive(data)`` takes what the
peer sent and returns what to act on, until ``done``. ``drive`` reads, feeds and acts; the
machine decides, the caller owns the sockets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

Output = TypeVar("Output", covariant=True)
Step = TypeVar("Step")


class Machine(Protocol[Output]):
    def receive(self, data: bytes) -> Output: ...

    @property
    def done(self) -> bool: ...


class LocalAuth(Machine[bytes], Protocol):
    """A local authentication: ``start()`` asks the client, ``receive`` answers it until
    ``done``, ``take_rest()`` is what the client sent after (pgwire/frontend.py)."""

    def start(self) -> bytes: ...

    def take_rest(self) -> bytes: ...


async def drive(
    machine: Machine[Step],
    read: Callable[[], Awaitable[bytes]],
    act: Callable[[Step], Awaitable[None] | None],
) -> None:
    """Feed ``machine`` what ``read`` returns and hand each output to ``act`` (awaiting it
    when it is a coroutine), until the machine is done."""
    while not machine.done:
        acted = act(machine.receive(await read()))
        if acted is not None:
            await acted
