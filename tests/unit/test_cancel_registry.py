"""The cancel registry: a client's key is the server's pid plus our secret, found whole."""

from __future__ import annotations

from dataclasses import dataclass

from neonlocal.proxy.cancel import SECRET_BYTES, CancelRegistry, CancelRoute
from neonlocal.targets import Target, TlsMode


@dataclass
class FakeSession:
    busy: bool = True


def _target(branch: str) -> Target:
    return Target(
        branch=branch,
        host=f"ep-{branch}.example",
        port=5432,
        hostaddr=None,
        user="u",
        password="p",
        database="d",
        pin_user=False,
        pin_database=False,
        options=None,
        tls=TlsMode.VERIFY_FULL,
        sslrootcert=None,
        channel_binding="prefer",
        application_name=None,
    )


MAIN = CancelRoute(_target("main"), 4242, b"server-secret-main")
DEV = CancelRoute(_target("dev"), 4242, b"server-secret-dev")


def test_the_client_gets_the_servers_pid_and_a_secret_of_ours() -> None:
    registry = CancelRegistry()
    pid, secret = registry.issue(FakeSession(), MAIN)
    assert pid == MAIN.process_id
    assert len(secret) == SECRET_BYTES
    assert secret != MAIN.secret
    assert registry.lookup(pid, secret) == MAIN


def test_two_servers_with_the_same_pid_get_distinct_keys() -> None:
    """Two branches' servers may hand out the same pid: each cancel reaches its own."""
    registry = CancelRegistry()
    main_key = registry.issue(FakeSession(), MAIN)
    dev_key = registry.issue(FakeSession(), DEV)
    assert main_key[0] == dev_key[0] == 4242
    assert main_key != dev_key
    assert registry.lookup(*main_key) == MAIN
    assert registry.lookup(*dev_key) == DEV
    registry.release(main_key)
    assert registry.lookup(*main_key) is None
    assert registry.lookup(*dev_key) == DEV
    assert len(registry) == 1


def test_the_pid_alone_cancels_nothing() -> None:
    registry = CancelRegistry()
    pid, secret = registry.issue(FakeSession(), MAIN)
    assert registry.lookup(pid, MAIN.secret) is None
    assert registry.lookup(pid, bytes(b ^ 0xFF for b in secret)) is None
    assert registry.lookup(pid + 1, secret) is None


def test_a_cancel_for_an_idle_session_is_dropped() -> None:
    registry = CancelRegistry()
    session = FakeSession(busy=False)
    key = registry.issue(session, MAIN)
    assert registry.lookup(*key) is None
    session.busy = True
    assert registry.lookup(*key) == MAIN
    assert registry.route_of(key) == MAIN


def test_a_long_server_secret_is_kept_whole() -> None:
    """PostgreSQL 18 (protocol 3.2) may send up to 256 secret bytes: forwarded as they are."""
    long_route = CancelRoute(_target("main"), 7, bytes(range(256)))
    registry = CancelRegistry()
    key = registry.issue(FakeSession(), long_route)
    assert registry.lookup(*key) == long_route
    assert registry.route_of(key) is not None
    assert registry.route_of(key).secret == bytes(range(256))  # type: ignore[union-attr]


def test_a_server_without_a_key_gives_a_key_that_cancels_nothing() -> None:
    registry = CancelRegistry()
    key = registry.issue(FakeSession(), None)
    assert key[0] > 0
    assert registry.lookup(*key) is None
    registry.release(key)
    assert len(registry) == 0
