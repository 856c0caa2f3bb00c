"""The selected branch in the file: rewritten in place, atomically, and watched."""

from __future__ import annotations

import asyncio
import os
import stat
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from neonlocal.config.errors import ConfigError
from neonlocal.config.file import read_selected, switch_branch
from neonlocal.filewatch import watch_file

ORIGINAL = """\
# My neonlocal setup — keep this comment.
branch   =   'dev-maria'   # the one I use today
log_level = "info"

[listen]
port = 5432    # default

# Branches
[branches.dev-maria]
url = "postgresql://u@ep-a.us-east-2.aws.neon.tech/db"

[branches."feat/x"]
url = "postgresql://u@ep-b.us-east-2.aws.neon.tech/db"
"""


def test_switch_rewrites_only_the_branch_value(tmp_path: Path) -> None:
    """Switching changes the branch value and leaves every other byte alone.

    The value may keep its quote style or get another (tomlkit versions differ); what a
    user sees is that only the value changed: same key, spacing and comment around it.
    """
    path = tmp_path / "config.toml"
    path.write_text(ORIGINAL)
    switch_branch(path, "feat/x")
    before, after = ORIGINAL.splitlines(keepends=True), path.read_text().splitlines(keepends=True)
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert len(changed) == 1
    old_line, new_line = changed[0]
    assert old_line == "branch   =   'dev-maria'   # the one I use today\n"
    assert new_line in (
        "branch   =   'feat/x'   # the one I use today\n",
        'branch   =   "feat/x"   # the one I use today\n',
    )
    assert read_selected(path) == "feat/x"


def test_switch_adds_the_key_before_the_first_table(tmp_path: Path) -> None:
    """Without a branch key, one is added at the top level and nothing else changes."""
    original = ORIGINAL.replace("branch   =   'dev-maria'   # the one I use today\n", "")
    path = tmp_path / "config.toml"
    path.write_text(original)
    switch_branch(path, "dev-maria")
    text = path.read_text()
    assert tomllib.loads(text)["branch"] == "dev-maria"
    assert text.index('branch = "dev-maria"') < text.index("[listen]")
    assert text.replace('branch = "dev-maria"\n', "", 1) == original


def test_switch_adds_the_key_to_a_file_of_only_tables(tmp_path: Path) -> None:
    """A file that starts with a table gets the key above it, still valid TOML."""
    path = tmp_path / "config.toml"
    path.write_text("[listen]\nport = 6543\n")
    switch_branch(path, "main")
    assert tomllib.loads(path.read_text()) == {"branch": "main", "listen": {"port": 6543}}


def test_switch_keeps_windows_line_endings(tmp_path: Path) -> None:
    """A CRLF file stays CRLF, including an added line."""
    path = tmp_path / "config.toml"
    original = b'log_level = "info"\r\n\r\n[listen]\r\nport = 1\r\n'
    path.write_bytes(original)
    switch_branch(path, "a")
    data = path.read_bytes()
    assert data.count(b"\n") == data.count(b"\r\n")
    assert data.replace(b'branch = "a"\r\n', b"", 1) == original
    switch_branch(path, "b")
    assert path.read_bytes() == data.replace(b'"a"', b'"b"')


@pytest.mark.parametrize("name", ["feat/x", "release.v2", 'we"ird\\name', "naïve-ünïcode"])
def test_any_name_round_trips(tmp_path: Path, name: str) -> None:
    """Names with slashes, dots, quotes and non-ASCII characters are written correctly."""
    path = tmp_path / "config.toml"
    path.write_text(ORIGINAL)
    switch_branch(path, name)
    assert read_selected(path) == name


def test_switch_creates_a_private_file(tmp_path: Path) -> None:
    """A missing file is created (0600, directory 0700) holding just the selection."""
    path = tmp_path / "neonlocal" / "config.toml"
    switch_branch(path, "main")
    assert path.read_text() == 'branch = "main"\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_switch_keeps_permissions_and_replaces_atomically(tmp_path: Path) -> None:
    """The file keeps its mode, gets a new inode (rename), and no temp file is left."""
    path = tmp_path / "config.toml"
    path.write_text(ORIGINAL)
    path.chmod(0o640)
    inode = path.stat().st_ino
    switch_branch(path, "feat/x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_switch_as_root_keeps_the_files_owner(tmp_path: Path) -> None:
    """Run as root (sudo), switching leaves the file owned by its user, not by root."""
    if os.geteuid() != 0:
        pytest.skip("only root can create a file owned by someone else")
    path = tmp_path / "config.toml"
    path.write_text(ORIGINAL)
    os.chown(path, 65534, 65534)
    switch_branch(path, "feat/x")
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)


def test_switch_through_a_symlink_updates_the_target(tmp_path: Path) -> None:
    """A symlinked config (dotfiles) stays a symlink; its target gets the new value."""
    real = tmp_path / "dotfiles" / "neonlocal.toml"
    real.parent.mkdir()
    real.write_text(ORIGINAL)
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    switch_branch(link, "feat/x")
    assert link.is_symlink()
    assert read_selected(real) == "feat/x"


def test_switch_refuses_a_branch_table_and_changes_nothing(tmp_path: Path) -> None:
    """A [branch] table is not overwritten (that would delete what is in it)."""
    path = tmp_path / "config.toml"
    original = "[branch]\nname = 'x'\n"
    path.write_text(original)
    with pytest.raises(ConfigError):
        switch_branch(path, "main")
    assert path.read_text() == original


def test_switch_refuses_broken_toml_and_changes_nothing(tmp_path: Path) -> None:
    """A file that does not parse is reported at its line and left untouched."""
    path = tmp_path / "config.toml"
    original = 'branch = "a"\n[listen\nport = 1\n'
    path.write_text(original)
    with pytest.raises(ConfigError) as caught:
        switch_branch(path, "main")
    assert caught.value.line == 2
    assert path.read_text() == original


def test_read_selected_without_file_or_key_is_none(tmp_path: Path) -> None:
    """No file, or a file without the key, means no selection."""
    assert read_selected(tmp_path / "absent.toml") is None
    path = tmp_path / "config.toml"
    path.write_text("[listen]\nport = 1\n")
    assert read_selected(path) is None


def test_read_selected_reports_bad_files(tmp_path: Path) -> None:
    """Broken TOML and a non-string branch are ConfigErrors, with a line where known."""
    path = tmp_path / "config.toml"
    path.write_text('log_level = "x"\nbranch = \n')
    with pytest.raises(ConfigError) as caught:
        read_selected(path)
    assert caught.value.line == 2
    path.write_text("branch = 3\n")
    with pytest.raises(ConfigError, match="branch"):
        read_selected(path)


# --- watching ---------------------------------------------------------------------------

NOTICE = 1.0  # a change must be noticed within this many seconds


class Watcher:
    """Runs watch_file in a task and queues the times it yields."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stop = asyncio.Event()
        self.seen: asyncio.Queue[float] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for _ in watch_file(self.path, self.stop):
            self.seen.put_nowait(asyncio.get_running_loop().time())

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())
        # The first yield says the watch is in place.
        await asyncio.wait_for(self.seen.get(), NOTICE)

    async def change_seen(self) -> bool:
        try:
            await asyncio.wait_for(self.seen.get(), NOTICE)
        except TimeoutError:
            return False
        # One burst of writes may be reported more than once; drain the rest of it.
        await asyncio.sleep(0.1)
        while not self.seen.empty():
            self.seen.get_nowait()
        return True

    async def quiet_for(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return self.seen.empty()


@pytest.fixture
async def watcher(tmp_path: Path) -> AsyncIterator[Watcher]:
    path = tmp_path / "config.toml"
    path.write_text(ORIGINAL)
    watch = Watcher(path)
    await watch.start()
    yield watch
    watch.stop.set()
    assert watch.task is not None
    await asyncio.wait_for(watch.task, NOTICE)


async def test_hand_edit_is_noticed(watcher: Watcher) -> None:
    """Appending to the file in place (as a simple editor does) yields promptly."""
    with watcher.path.open("a") as handle:
        handle.write("# edited\n")
    assert await watcher.change_seen()


async def test_switch_branch_is_noticed(watcher: Watcher) -> None:
    """An atomic replace by switch_branch (new inode) yields promptly."""
    switch_branch(watcher.path, "feat/x")
    assert await watcher.change_seen()
    switch_branch(watcher.path, "dev-maria")
    assert await watcher.change_seen()


async def test_editor_style_save_is_noticed(watcher: Watcher) -> None:
    """Writing a temp file and renaming it over the config (vim, VS Code) yields."""
    temp = watcher.path.with_name(".config.toml.swp")
    temp.write_text(ORIGINAL.replace("dev-maria'", "feat/x'", 1))
    assert await watcher.quiet_for(0.2)  # the temp file alone is not our file
    os.replace(temp, watcher.path)
    assert await watcher.change_seen()


async def test_deletion_and_recreation_are_noticed(watcher: Watcher) -> None:
    """Removing the file yields, and so does creating it again."""
    watcher.path.unlink()
    assert await watcher.change_seen()
    watcher.path.write_text(ORIGINAL)
    assert await watcher.change_seen()


async def test_sibling_files_are_ignored(watcher: Watcher) -> None:
    """Changes to other files in the directory do not yield; the watch is still live after."""
    sibling = watcher.path.with_name("notes.txt")
    sibling.write_text("a")
    with sibling.open("a") as handle:
        handle.write("b")
    watcher.path.with_name("config.toml.bak").write_text(ORIGINAL)
    assert await watcher.quiet_for(0.3)
    switch_branch(watcher.path, "feat/x")
    assert await watcher.change_seen()


async def test_a_symlinked_config_is_watched_at_its_target(tmp_path: Path) -> None:
    """Editing the real file behind a symlinked config yields."""
    real_dir = tmp_path / "dotfiles"
    real_dir.mkdir()
    real = real_dir / "neonlocal.toml"
    real.write_text(ORIGINAL)
    link_dir = tmp_path / "conf"
    link_dir.mkdir()
    (link_dir / "config.toml").symlink_to(real)
    watch = Watcher(link_dir / "config.toml")
    await watch.start()
    try:
        switch_branch(real, "feat/x")
        assert await watch.change_seen()
    finally:
        watch.stop.set()
        assert watch.task is not None
        await asyncio.wait_for(watch.task, NOTICE)


async def test_a_change_right_after_the_first_yield_is_not_missed(tmp_path: Path) -> None:
    """The first yield means the watch is live: a write straight after it is reported."""
    path = tmp_path / "config.toml"
    path.write_text(ORIGINAL)
    stop = asyncio.Event()
    changes = watch_file(path, stop)
    try:
        # Awaited directly (no wait_for task): the loop runs nothing else between the
        # yield and the write below.
        await anext(changes)
        switch_branch(path, "feat/x")
        await asyncio.wait_for(anext(changes), NOTICE)
    finally:
        await changes.aclose()


async def test_stop_ends_the_watch(tmp_path: Path) -> None:
    """Setting the stop event ends iteration promptly, even with no changes."""
    path = tmp_path / "config.toml"
    path.write_text(ORIGINAL)
    stop = asyncio.Event()
    in_place = asyncio.Event()
    seen = 0

    async def consume() -> None:
        nonlocal seen
        async for _ in watch_file(path, stop):
            seen += 1
            in_place.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(in_place.wait(), NOTICE)
    stop.set()
    await asyncio.wait_for(task, NOTICE)
    assert seen == 1  # only the "watch is in place" yield


async def test_breaking_out_of_the_loop_releases_the_watch(tmp_path: Path) -> None:
    """A consumer that stops iterating early does not leave the watch running."""
    path = tmp_path / "config.toml"
    path.write_text(ORIGINAL)
    stop = asyncio.Event()
    changes = watch_file(path, stop)
    await asyncio.wait_for(anext(changes), NOTICE)
    await asyncio.wait_for(changes.aclose(), NOTICE)
    assert not stop.is_set()  # closing our watch does not stop the caller's other work


async def test_cancelling_the_consumer_ends_the_watch(tmp_path: Path) -> None:
    """A daemon cancelling its watcher task on shutdown gets a prompt, clean end."""
    watch = Watcher(tmp_path / "config.toml")
    await watch.start()
    assert watch.task is not None
    watch.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(watch.task, NOTICE)


async def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    """Watching a file in a directory that does not exist raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        await anext(watch_file(tmp_path / "nope" / "config.toml", asyncio.Event()))
