"""The daemon's messages to systemd, checked on a real NOTIFY_SOCKET datagram socket."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from neonlocal.sdnotify import Notifier


@dataclass(frozen=True)
class Receiver:
    """The service manager's end: a bound datagram socket and the NOTIFY_SOCKET naming it."""

    sock: socket.socket
    notify_socket: str

    def messages(self) -> list[dict[str, str]]:
        """Every datagram received so far, each parsed into its assignments."""
        received: list[dict[str, str]] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return received
            received.append(_parse(data))

    def one(self) -> dict[str, str]:
        got = self.messages()
        assert len(got) == 1, got
        return got[0]


def _parse(data: bytes) -> dict[str, str]:
    text = data.decode()
    assert text.endswith("\n"), text
    return dict(line.split("=", 1) for line in text.splitlines())


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # AF_UNIX paths are limited to 108 bytes, which pytest's tmp_path can exceed.
    directory = tempfile.mkdtemp(prefix="nl-notify-", dir="/tmp")
    try:
        if request.param == "path":
            path = str(Path(directory) / "notify")
            sock.bind(path)
            notify_socket = path
        else:
            name = f"neonlocal-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            notify_socket = "@" + name
        sock.setblocking(False)
        yield Receiver(sock, notify_socket)
    finally:
        sock.close()
        shutil.rmtree(directory)


def test_ready_reaches_the_service_manager_with_its_status(receiver: Receiver) -> None:
    """READY=1 and the STATUS line arrive together in one datagram."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.notify_socket})

    assert notifier.enabled
    assert notifier.ready("serving dev-maria") is True

    assert receiver.one() == {"READY": "1", "STATUS": "serving dev-maria"}


def test_status_stopping_and_watchdog_each_send_their_assignment(receiver: Receiver) -> None:
    """status(), stopping() and watchdog() each send one datagram with their assignment."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.notify_socket})

    assert notifier.status("serving main")
    assert notifier.stopping()
    assert notifier.watchdog()

    assert receiver.messages() == [{"STATUS": "serving main"}, {"STOPPING": "1"}, {"WATCHDOG": "1"}]


def test_reloading_carries_the_monotonic_timestamp_systemd_requires(receiver: Receiver) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC taken from CLOCK_MONOTONIC at send time."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.notify_socket})

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading("reloading config")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    message = receiver.one()
    assert message["RELOADING"] == "1"
    assert message["STATUS"] == "reloading config"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_a_newline_in_a_status_cannot_smuggle_another_assignment(receiver: Receiver) -> None:
    """A branch name with a newline stays inside STATUS instead of becoming STOPPING=1."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.notify_socket})

    notifier.status("serving evil\nSTOPPING=1")

    assert receiver.one() == {"STATUS": "serving evil STOPPING=1"}


@pytest.mark.skipif(not hasattr(socket, "SO_PASSCRED"), reason="SO_PASSCRED is Linux-only")
def test_notifications_come_from_the_daemon_process_itself(receiver: Receiver) -> None:
    """The kernel-attached sender PID is ours, so NotifyAccess=main accepts the messages."""
    receiver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.notify_socket})

    notifier.ready()

    _, ancillary, _, _ = receiver.sock.recvmsg(4096, socket.CMSG_SPACE(12))
    credentials = [data for level, kind, data in ancillary if kind == socket.SCM_CREDENTIALS]
    assert credentials, ancillary
    pid, _uid, _gid = struct.unpack("3i", credentials[0])
    assert pid == os.getpid()


def test_without_notify_socket_every_call_is_a_quiet_no_op() -> None:
    """Outside systemd nothing is sent and nothing fails."""
    notifier = Notifier.from_env({})

    assert not notifier.enabled
    assert [
        notifier.ready("x"),
        notifier.status("x"),
        notifier.reloading(),
        notifier.stopping(),
        notifier.watchdog(),
    ] == [False] * 5


@pytest.mark.parametrize("value", ["relative/notify", "@", "vsock:2:1234", ""])
def test_unusable_notify_socket_values_disable_notifications(value: str) -> None:
    """Addresses systemd itself would reject leave the notifier disabled."""
    assert not Notifier.from_env({"NOTIFY_SOCKET": value}).enabled


def test_a_vanished_service_manager_does_not_take_the_daemon_down(tmp_path: Path) -> None:
    """Sending to a socket nobody listens on returns False instead of raising."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})

    assert notifier.enabled
    assert notifier.ready("serving main") is False
    assert notifier.watchdog() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "{pid}"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_meant_for_this_process(
    env: dict[str, str], expected: float | None
) -> None:
    """Ping every WATCHDOG_USEC/2; a timeout addressed to another PID is not ours."""
    pid = os.getpid()
    filled = {key: value.format(pid=pid, other=pid + 1) for key, value in env.items()}

    assert Notifier.from_env(filled).watchdog_interval() == expected
