"""Protected branches: which protection a branch has, and what its sessions log in with."""

from __future__ import annotations

import pytest

from neonlocal.config.values import BranchSettings, Secret, Settings
from neonlocal.protect import (
    Protection,
    guarded,
    protection_of,
    read_only_parameters,
    read_only_status,
)
from neonlocal.proxy.context import SessionRefused
from neonlocal.proxy.plan import plan_login
from neonlocal.targets import Target, build_target

NEON_URL = "postgresql://owner:pw@ep-x.us-east-2.aws.neon.tech/neondb"
OTHER_URL = "postgresql://owner:pw@db.example.com/neondb"


def settings(**protect: object) -> Settings:
    return Settings(
        branches={
            name: BranchSettings(url=Secret(NEON_URL), protect=value)  # type: ignore[arg-type]
            for name, value in protect.items()
        }
    )


def target(url: str = NEON_URL) -> Target:
    return build_target("main", BranchSettings(url=Secret(url)))


def test_the_table_decides_and_neon_s_flag_counts_only_when_the_table_says_nothing() -> None:
    config = settings(main=True, staging="confirm", dev=False, other=None)
    assert protection_of("main", config) is Protection.READ_ONLY
    assert protection_of("staging", config) is Protection.CONFIRM
    assert protection_of("dev", config, neon_protected=True) is Protection.NONE
    assert protection_of("other", config, neon_protected=True) is Protection.READ_ONLY
    assert protection_of("unlisted", config, neon_protected=True) is Protection.READ_ONLY
    assert protection_of("unlisted", config) is Protection.NONE


def test_a_read_only_branch_is_writable_only_where_writes_were_allowed() -> None:
    locked = guarded(target(), Protection.READ_ONLY, writes_allowed=False)
    opened = guarded(target(), Protection.READ_ONLY, writes_allowed=True)
    confirm = guarded(target(), Protection.CONFIRM, writes_allowed=False)
    assert (locked.read_only, opened.read_only, confirm.read_only) == (True, False, False)
    assert read_only_status(locked) == {"neonlocal.read_only": "on"}
    assert read_only_status(opened) == read_only_status(confirm) == {"neonlocal.read_only": "off"}
    assert read_only_status(target()) == {}
    assert read_only_parameters(locked) == {"default_transaction_read_only": "on"}
    assert read_only_parameters(opened) == {}


def test_a_neon_host_gets_read_only_in_options_and_another_as_a_startup_setting() -> None:
    """The edge drops unknown startup settings, so for Neon's hosts it travels in options;
    a client's own setting cannot turn it off."""
    client = {"user": "owner", "default_transaction_read_only": "off"}
    neon = plan_login(guarded(target(), Protection.READ_ONLY, writes_allowed=False), client)
    other = plan_login(
        guarded(target(OTHER_URL), Protection.READ_ONLY, writes_allowed=False), client
    )
    assert "default_transaction_read_only" not in neon.parameters
    assert neon.parameters["options"].endswith("-c default_transaction_read_only=on")
    assert other.parameters["default_transaction_read_only"] == "on"


def test_an_unprotected_target_logs_in_as_before() -> None:
    plan = plan_login(target(), {"user": "owner"})
    assert "options" not in plan.parameters


def test_a_read_only_branch_behind_a_pooler_host_is_refused_not_served_writable() -> None:
    pooled = target("postgresql://owner:pw@ep-x-pooler.us-east-2.aws.neon.tech/neondb")
    with pytest.raises(SessionRefused) as refused:
        plan_login(guarded(pooled, Protection.READ_ONLY, writes_allowed=False), {"user": "o"})
    assert refused.value.sqlstate == "0A000"
    assert "-pooler" in refused.value.message
    allowed = guarded(pooled, Protection.READ_ONLY, writes_allowed=True)
    assert plan_login(allowed, {"user": "o"}).user == "o"
