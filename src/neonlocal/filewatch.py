"""Watching the config file for changes (the daemon's reload, git follow's HEAD).

Apart from the file edits in ``selection``: `neonlocal use` edits the file and should not
load watchfiles or asyncio to do it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import watchfiles

__all__ = ["WATCH_STEP_MS", "watch_file"]

# How often the watcher thread wakes to check for changes and for its stop signal. An idle
# daemon runs all day on laptops: 10 wakeups a second rather than 100, at the price of
# noticing a hand edit up to 0.1 s later (`neonlocal use` does not wait for the watcher).
WATCH_STEP_MS = 100


async def watch_file(
    path: Path, stop: asyncio.Event, debounce_ms: int = 30
) -> AsyncGenerator[None, None]:
    """Yield whenever ``path`` may have changed, until ``stop`` is set.

    Yields once as soon as the watch is in place (the file may have changed between the
    caller's last read and then), and after that for each burst of changes: edits,
    creation, deletion, and replacement by rename. The directory is watched, not the
    file, because an atomic rename puts a new inode at the same name.

    The watch runs watchfiles' blocking ``watch`` in a thread of its own rather than
    ``awatch``, which would load anyio's asyncio backend into the daemon for good (about
    1.7 MiB resident) to do the same.
    """
    if stop.is_set():
        return
    directories, watched = _watch_plan(path)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[object] = asyncio.Queue()

    def post(event: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, event)

    def only_our_file(_change: Any, changed: str) -> bool:
        return _canonical(changed) in watched

    halt = _Halt(on_first_check=lambda: post(_IN_PLACE))

    def run() -> None:
        try:
            for _changes in watchfiles.watch(
                *directories,
                watch_filter=only_our_file,
                debounce=debounce_ms,
                step=WATCH_STEP_MS,
                stop_event=halt,
                recursive=False,
                raise_interrupt=False,
            ):
                post(_CHANGED)
        except Exception as exc:  # the watch failed to start, or broke: raised below
            post(exc)
        post(_ENDED)

    threading.Thread(target=run, name="neonlocal-watch", daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    ended = False
    event: asyncio.Future[object] | None = None
    try:
        while True:
            event = asyncio.ensure_future(events.get())
            await asyncio.wait({event, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                return
            happened = event.result()
            if isinstance(happened, Exception):
                raise happened
            if happened is _ENDED:
                ended = True
                return
            yield None
    finally:
        halt.set()
        stopped.cancel()
        if event is not None and not event.done():
            event.cancel()  # it would take the end-of-watch event from the queue below
        # The thread sees the halt within one step; wait for it, so no watch outlives us.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WATCH_STEP_MS / 1000 * 20):
                while not ended:
                    ended = await events.get() is _ENDED


_IN_PLACE, _CHANGED, _ENDED = object(), object(), object()


class _Halt:
    """The watcher thread's stop signal (watchfiles asks ``is_set()`` once per step).

    watchfiles asks only once its watch exists, so the first question also says that the
    watch is in place.
    """

    def __init__(self, on_first_check: Callable[[], None]) -> None:
        self._stop = threading.Event()
        self._first_check: Callable[[], None] | None = on_first_check

    def is_set(self) -> bool:
        if self._first_check is not None:
            first_check, self._first_check = self._first_check, None
            first_check()
        return self._stop.is_set()

    def set(self) -> None:
        self._stop.set()


def _watch_plan(path: Path) -> tuple[list[str], set[str]]:
    """The directories to watch and the file names in them that matter.

    The path itself and, for a symlink, its target: both are where edits can land.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot watch {path}: directory {directory} does not exist")
    names = {_canonical(os.path.abspath(path))}
    if os.path.islink(path):
        names.add(os.path.realpath(path))
    return sorted({os.path.dirname(name) for name in names}), names


def _canonical(name: str) -> str:
    # The directory part resolved, the file name kept: macOS reports events under
    # /private/var for a watch on /var, and the file itself may be a symlink.
    return os.path.join(os.path.realpath(os.path.dirname(name)), os.path.basename(name))
