"""The selected branch in the config file: read it, rewrite it in place, watch for changes.

``switch_branch`` touches only the top-level ``branch`` key and leaves every other byte
as the user wrote it; it does not judge the name (the CLI checks it first). The file is
replaced atomically, so the daemon never reads half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tempfile
import threading
import tomllib
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import watchfiles

from neonlocal.settings import ConfigError, toml_syntax_error

__all__ = ["read_selected", "switch_branch", "watch_file"]

_KEY = "branch"
# How often the watcher thread wakes to check for changes and for its stop signal. An idle
# daemon runs all day on laptops: 10 wakeups a second rather than 100, at the price of
# noticing a hand edit up to 0.1 s later (`neonlocal use` does not wait for the watcher).
WATCH_STEP_MS = 100


def read_selected(path: Path) -> str | None:
    """The file's ``branch`` value; None when the file or the key is absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    text = _decode(path, data)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise toml_syntax_error(path, exc) from None
    value = document.get(_KEY)
    if value is not None and not isinstance(value, str):
        raise ConfigError(path, None, f"{_KEY}: expected a branch name (a string)")
    return value


def switch_branch(path: Path, name: str) -> None:
    """Set the top-level ``branch = name`` in ``path``, keeping everything else as is.

    Creates the file (0600, in a 0700 directory) when it does not exist. A symlinked
    config is updated at its target, so dotfile setups keep their link.
    """
    target = path.resolve() if path.is_symlink() else path
    try:
        original = target.read_bytes()
    except FileNotFoundError:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(target, f"{_KEY} = {_toml_string(name)}\n".encode(), None)
        return
    text = _decode(path, original)
    updated = _with_branch(path, text, name)
    atomic_write(target, updated.encode("utf-8"), target.stat())


def _with_branch(path: Path, text: str, name: str) -> str:
    # Imported here, not by every daemon: it only writes the file when following git.
    import tomlkit
    import tomlkit.exceptions
    from tomlkit.items import AoT, Table

    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError(path, exc.line, f"invalid TOML: {exc}") from None
    if _KEY in document:
        if isinstance(document[_KEY], Table | AoT):
            # Replacing a table would silently delete what the user wrote in it.
            raise ConfigError(path, None, f"{_KEY}: is a table; expected a branch name")
        document[_KEY] = name
        return document.as_string()
    document.add(_KEY, name)
    return _match_newlines(text, document.as_string())


def _toml_string(text: str) -> str:
    import tomlkit

    return tomlkit.string(text).as_string()


def _match_newlines(before: str, after: str) -> str:
    """Give the text tomlkit inserted the file's own line ending (CRLF files stay CRLF)."""
    if "\r\n" not in before:
        return after
    head = 0
    while head < len(before) and before[head] == after[head]:
        head += 1
    tail = 0
    while tail < len(before) - head and before[-1 - tail] == after[-1 - tail]:
        tail += 1
    inserted = after[head : len(after) - tail].replace("\r\n", "\n").replace("\n", "\r\n")
    return after[:head] + inserted + after[len(after) - tail :]


def atomic_write(path: Path, data: bytes, previous: os.stat_result | None) -> None:
    """Write via a temp file in the same directory and rename it over ``path``.

    The new file keeps ``previous``'s permission bits (and owner, as root); a new file is
    0600, as mkstemp makes it.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if previous is not None:
                os.fchmod(handle.fileno(), stat.S_IMODE(previous.st_mode))
                if os.geteuid() == 0:
                    os.fchown(handle.fileno(), previous.st_uid, previous.st_gid)
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems cannot fsync a directory.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, None, "is not valid UTF-8 text") from None


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
