"""Socket activation: a process started with LISTEN_FDS serves on the sockets it was given.

The activated process is real: a launcher puts the pre-bound sockets at descriptors 3, 4, ...
and sets LISTEN_PID to its own PID before exec'ing the program, as systemd does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from neonlocal.sockets import SocketActivationError, inherited_sockets

# Runs in the activated process: adopt the sockets, report what it got, then serve one
# connection on the first socket by sending its PID.
_PROGRAM = r"""
import fcntl, json, os, select, socket, sys
from neonlocal.sockets import SocketActivationError, inherited_named_sockets

spec = json.loads(sys.argv[1])
try:
    adopted = inherited_named_sockets(os.environ, unset_environment=spec["unset"])
except SocketActivationError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
    sys.exit(0)
report = {
    "sockets": [
        {
            "name": s.name,
            "fd": s.sock.fileno(),
            "family": s.sock.family.name,
            "blocking": s.sock.getblocking(),
            "cloexec": bool(fcntl.fcntl(s.sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        }
        for s in adopted
    ],
    "env": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")},
}
print(json.dumps(report), flush=True)
if adopted:
    listener = adopted[0].sock
    select.select([listener], [], [], 10)
    conn, _ = listener.accept()
    conn.sendall(str(os.getpid()).encode())
    conn.close()
"""

# Like systemd after fork: move the passed descriptors to 3, 4, ..., name this process in
# LISTEN_PID and exec the program, which keeps the PID.
_LAUNCHER = r"""
import fcntl, json, os, sys

spec = json.loads(sys.argv[1])
parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in spec["fds"]]
for offset, fd in enumerate(parked):
    os.dup2(fd, 3 + offset)
    os.close(fd)
pid = os.getpid() + (1 if spec["pid"] == "other" else 0)
os.environ.update(LISTEN_PID=str(pid), LISTEN_FDS=str(len(parked)))
if spec["names"] is not None:
    os.environ["LISTEN_FDNAMES"] = spec["names"]
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], sys.argv[1]])
"""


def _activate(
    passed: list[Any],
    *,
    names: str | None = None,
    pid: str = "self",
    unset: bool = True,
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start the program socket-activated with `passed` objects' descriptors; its report."""
    fds = [item.fileno() for item in passed]
    spec: dict[str, Any] = {"fds": fds, "names": names, "pid": pid, "unset": unset}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    process = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, json.dumps(spec), _PROGRAM],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, "the activated process exited without reporting"
    return process, json.loads(line)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


@pytest.fixture
def unix_listener() -> Iterator[socket.socket]:
    directory = tempfile.mkdtemp(prefix="nl-sock-", dir="/tmp")
    path = Path(directory) / "control"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    yield sock
    sock.close()
    path.unlink()
    os.rmdir(directory)


def test_activated_process_serves_a_connection_made_before_it_started(
    listener: socket.socket,
) -> None:
    """A client that connected while the daemon was not yet running is served by it."""
    client = socket.create_connection(listener.getsockname(), timeout=10)
    process, report = _activate([listener])

    reply = client.recv(64)
    client.close()
    assert process.wait(timeout=10) == 0
    assert int(reply) == process.pid
    assert report["sockets"] == [
        {"name": "unknown", "fd": 3, "family": "AF_INET", "blocking": False, "cloexec": True}
    ]


def test_activation_variables_are_gone_afterwards_so_children_do_not_take_the_sockets(
    listener: socket.socket,
) -> None:
    """LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from the environment."""
    client = socket.create_connection(listener.getsockname(), timeout=10)
    process, report = _activate([listener], names="postgres")
    client.close()
    process.wait(timeout=10)

    assert report["env"] == {}


def test_activation_variables_can_be_kept(listener: socket.socket) -> None:
    """With unset_environment=False the variables stay for the caller to pass on."""
    client = socket.create_connection(listener.getsockname(), timeout=10)
    process, report = _activate([listener], names="postgres", unset=False)
    client.close()
    process.wait(timeout=10)

    assert report["env"] == {
        "LISTEN_PID": str(process.pid),
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "postgres",
    }


def test_several_sockets_arrive_in_order_with_their_names_and_families(
    listener: socket.socket, unix_listener: socket.socket
) -> None:
    """Each inherited socket keeps the name the unit gave it and its real address family."""
    client = socket.create_connection(listener.getsockname(), timeout=10)
    process, report = _activate([listener, unix_listener], names="postgres:control")
    client.close()
    process.wait(timeout=10)

    assert [(s["name"], s["fd"], s["family"]) for s in report["sockets"]] == [
        ("postgres", 3, "AF_INET"),
        ("control", 4, "AF_UNIX"),
    ]


def test_sockets_meant_for_another_process_are_left_alone(listener: socket.socket) -> None:
    """With LISTEN_PID naming another process nothing is adopted, and the variables go."""
    process, report = _activate([listener], pid="other")
    process.wait(timeout=10)

    assert report == {"sockets": [], "env": {}}


def test_a_descriptor_that_is_not_a_socket_is_reported() -> None:
    """A pipe where a socket should be gives a clear error naming the descriptor."""
    read_end, write_end = os.pipe()
    with os.fdopen(read_end) as pipe, os.fdopen(write_end, "w"):
        process, report = _activate([pipe])
    process.wait(timeout=10)

    assert report == {
        "error": "inherited descriptor 3 is not a usable socket: Socket operation on non-socket"
    }


def test_not_activated_means_no_sockets() -> None:
    """Without the LISTEN_* variables the daemon binds its own sockets."""
    assert inherited_sockets({}) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a number"),
        ({"LISTEN_FDS": "0"}, "LISTEN_FDS='0' must be positive"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "me"}, "LISTEN_PID='me' is not a number"),
        (
            {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "postgres"},
            "LISTEN_FDNAMES names 1 sockets but LISTEN_FDS is 2",
        ),
    ],
)
def test_malformed_activation_variables_are_an_error_and_still_removed(
    env: dict[str, str], message: str
) -> None:
    """Garbage from the service manager is reported, not guessed at, and cleared."""
    full = {"LISTEN_PID": str(os.getpid()), "HOME": "/home/x"} | env

    with pytest.raises(SocketActivationError) as caught:
        inherited_sockets(full)

    assert str(caught.value) == message
    assert full == {"HOME": "/home/x"}
