"""plan_login: which role, database and parameters a client's session logs in upstream with."""

from __future__ import annotations

import pytest

from neonlocal.config.values import BranchSettings, Secret
from neonlocal.pgwire.scram import ChannelBindingPolicy
from neonlocal.proxy.context import SessionRefused
from neonlocal.proxy.plan import plan_login, strip_routing_options
from neonlocal.targets import Target, build_target

URL = "postgresql://owner:pw@ep-x.us-east-2.aws.neon.tech/neondb"


def target(url: str = URL, **settings: str) -> Target:
    return build_target("main", BranchSettings(url=Secret(url), **settings))  # type: ignore[arg-type]


def test_the_client_chooses_role_and_database_unless_the_branch_pins_them() -> None:
    plan = plan_login(target(), {"user": "alice", "database": "app"})
    assert (plan.user, plan.database) == ("alice", "app")
    pinned = plan_login(
        target(user="owner", database="neondb"), {"user": "alice", "database": "app"}
    )
    assert (pinned.user, pinned.database) == ("owner", "neondb")


def test_we_log_in_ourselves_only_as_the_role_whose_password_we_hold() -> None:
    own = plan_login(target(), {"user": "owner"})
    assert own.credentials is not None
    assert own.credentials.user == "owner"
    assert own.credentials.channel_binding is ChannelBindingPolicy.PREFER
    assert own.database == "neondb"  # the URL's database when the client names none
    assert plan_login(target(), {"user": "alice"}).credentials is None


def test_neon_routing_options_are_dropped_and_the_rest_forwarded_in_order() -> None:
    """To a Neon host: routing options go (SNI routes), and a setting the edge would drop
    (here "x") travels in options after the URL's own, so it still takes effect."""
    url = URL + "?options=endpoint%3Dep-x%20-c%20search_path%3Dapp&application_name=urlapp"
    plan = plan_login(target(url), {"user": "owner", "options": "-c endpoint=ep-x", "x": "1"})
    assert plan.parameters == {
        "user": "owner",
        "database": "neondb",
        "options": "-c search_path=app -c x=1",
        "application_name": "urlapp",
    }
    assert plan.ignored_by_pooler == ()


def test_another_host_gets_the_parameters_and_routing_options_as_they_are() -> None:
    """A custom domain or an IP in front of Neon can only be routed by endpoint= in options."""
    url = "postgresql://owner:pw@db.example.com/neondb?options=endpoint%3Dep-x"
    plan = plan_login(target(url), {"user": "owner", "TimeZone": "UTC"})
    assert plan.parameters == {
        "user": "owner",
        "database": "neondb",
        "TimeZone": "UTC",
        "options": "endpoint=ep-x",
    }
    assert plan.credentials is not None
    assert plan.credentials.neon_endpoint is None


def test_a_pooled_host_gets_the_parameters_as_a_direct_pooled_connection_would() -> None:
    url = "postgresql://owner:pw@ep-x-pooler.us-east-2.aws.neon.tech/neondb"
    plan = plan_login(target(url), {"user": "owner", "TimeZone": "UTC", "search_path": "a"})
    assert plan.parameters["TimeZone"] == "UTC"
    assert "options" not in plan.parameters
    assert plan.ignored_by_pooler == ("TimeZone", "search_path")
    assert plan.credentials is not None
    assert plan.credentials.neon_endpoint == "ep-x-pooler"


def test_a_dangling_c_is_removed_with_its_routing_option() -> None:
    assert strip_routing_options("-c endpoint=ep-x") == ""
    assert strip_routing_options("-c endpoint=ep-x -c work_mem=4MB") == "-c work_mem=4MB"
    assert strip_routing_options("project=p --search_path=a") == "--search_path=a"


def test_a_startup_packet_over_the_edges_limit_is_refused_with_a_reason() -> None:
    """Neon's edge hangs up without a word on more than 10,000 bytes; we say why instead."""
    with pytest.raises(SessionRefused) as refused:
        plan_login(target(), {"user": "owner", "search_path": "x" * 10_000})
    assert refused.value.sqlstate == "08P01"
    assert "at most 10000" in refused.value.message
    plan_login(target("postgresql://owner:pw@db.example.com/db"), {"user": "o", "x": "y" * 10_000})


def test_libpqs_default_role_becomes_the_urls_role_only_when_the_kernel_says_so() -> None:
    """`psql -d neondb` as OS user maria asks for role maria: on our Unix socket (os_user
    known) that is a default, not a choice; over TCP (os_user None) it is the client's."""
    on_socket = plan_login(target(), {"user": "maria"}, os_user="maria")
    assert on_socket.user == "owner"
    assert on_socket.credentials is not None
    chosen = plan_login(target(), {"user": "alice"}, os_user="maria")
    assert (chosen.user, chosen.credentials) == ("alice", None)
    over_tcp = plan_login(target(), {"user": "maria"})
    assert (over_tcp.user, over_tcp.credentials) == ("maria", None)
    no_password = plan_login(
        target("postgresql://owner@ep-x.us-east-2.aws.neon.tech/db"),
        {"user": "maria"},
        os_user="maria",
    )
    assert no_password.user == "maria"
