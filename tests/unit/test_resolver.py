"""Branch names to Targets: static tables win, the API fills in the rest, answers are kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from neon_standin import NeonStandIn, neon_api
from neonlocal.config.schema import ConfigError, check_selected_branch, load_settings
from neonlocal.config.values import TlsMode
from neonlocal.neon import BranchNotFound, NeonApi, ProjectNotFound, RetryPolicy
from neonlocal.resolver import (
    BranchNotConfigured,
    TargetResolver,
    create_branch,
    delete_branch_within,
)

__all__ = ["neon_api"]  # the stand-in fixture, used by name below

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, budget=5.0)
DEV_HOST = "ep-dev-300003.us-east-2.aws.neon.tech"
STATIC_URL = "postgresql://alice:npg_static@ep-static-1.us-east-2.aws.neon.tech/app?sslmode=require"

MakeResolver = Callable[..., TargetResolver]


@pytest.fixture
async def make_resolver(neon_api: NeonStandIn, tmp_path: Path) -> AsyncIterator[MakeResolver]:
    """make_resolver(extra_toml, project=True): a resolver on a config file in tmp_path."""
    made: list[TargetResolver] = []
    neon_api.add_branch("dev", host=DEV_HOST, password="pw-dev", database="shop")

    def make(extra: str = "", *, project: bool = True) -> TargetResolver:
        path = tmp_path / "config.toml"
        neon = f'[neon]\nproject_id = "{neon_api.project_id}"\napi_url = "{neon_api.base_url}"\n'
        path.write_text((neon if project else "") + extra)
        env = {"NEON_API_KEY": neon_api.api_key}
        resolver = TargetResolver(load_settings(path, env), env, retry=FAST)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        await resolver.aclose()


async def test_a_static_table_wins_over_the_api_for_its_name(
    neon_api: NeonStandIn, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver(f'[branches.dev]\nurl = "{STATIC_URL}"\n')
    found = await resolver.resolve("dev")
    assert found.target.host == "ep-static-1.us-east-2.aws.neon.tech"
    assert found.neon is None
    assert neon_api.requests == []


async def test_an_api_branch_becomes_a_verified_target_on_port_5432(
    make_resolver: MakeResolver, tmp_path: Path
) -> None:
    resolver = make_resolver(
        f'sslrootcert = "certs/ca.pem"\n\n[network.resolve]\n"{DEV_HOST.upper()}" = "127.0.0.9"\n'
    )
    found = await resolver.resolve("dev")
    target = found.target
    assert (target.branch, target.host, target.port) == ("dev", DEV_HOST, 5432)
    assert target.hostaddr == "127.0.0.9"  # host names match whatever their case
    assert target.tls is TlsMode.VERIFY_FULL
    assert target.sslrootcert == str(tmp_path / "certs" / "ca.pem")
    assert (target.user, target.password, target.database) == ("neondb_owner", "pw-dev", "shop")
    assert target.channel_binding == "require"
    assert not target.pin_user
    assert not target.pin_database
    assert "pw-dev" not in repr(found)


async def test_without_sslrootcert_the_system_trust_store_is_used(
    make_resolver: MakeResolver,
) -> None:
    target = (await make_resolver().resolve("dev")).target
    assert target.sslrootcert is None
    assert target.hostaddr is None


async def test_a_name_is_asked_about_once_then_answered_from_memory(
    neon_api: NeonStandIn, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver()
    first = await resolver.resolve("dev")
    asked = len(neon_api.requests)
    again = await resolver.resolve("dev")
    assert again.target == first.target
    assert again.from_cache
    assert not first.from_cache
    assert len(neon_api.requests) == asked
    await resolver.resolve("dev", fresh=True)
    assert len(neon_api.requests_to("reveal_password")) == 2


async def test_the_api_being_down_does_not_lose_what_was_resolved(
    neon_api: NeonStandIn, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver()
    first = await resolver.resolve("dev")
    neon_api.inject("*", 503, times=None)
    assert (await resolver.resolve("dev")).target == first.target


async def test_pooled_per_branch_overrides_the_project_setting(
    make_resolver: MakeResolver,
) -> None:
    resolver = make_resolver(
        "pooled = true\n\n[branches.main]\npooled = false\n\n"
        '[branches.dev]\nuser = "neondb_owner"\n'
    )
    dev = (await resolver.resolve("dev")).target
    main = (await resolver.resolve("main")).target
    assert dev.host == "ep-dev-300003-pooler.us-east-2.aws.neon.tech"
    assert "-pooler" not in main.host
    assert dev.pin_user
    assert not dev.pin_database


async def test_an_unknown_name_without_a_project_says_how_to_find_it(
    make_resolver: MakeResolver,
) -> None:
    resolver = make_resolver(f'[branches.main]\nurl = "{STATIC_URL}"\n', project=False)
    with pytest.raises(BranchNotConfigured) as caught:
        await resolver.resolve("dev")
    assert 'unknown branch "dev"; known: main' in str(caught.value)
    assert "[neon] project_id" in str(caught.value)


async def test_an_unknown_name_in_the_project_lists_close_matches(
    make_resolver: MakeResolver,
) -> None:
    with pytest.raises(BranchNotFound, match="did you mean 'dev'"):
        await make_resolver().resolve("dve")


async def test_refresh_fetches_the_new_password_after_a_change(
    neon_api: NeonStandIn, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver()
    stale = (await resolver.resolve("dev")).target
    neon_api.set_password("dev", "neondb_owner", "pw-after-reset")
    fresh = await resolver.refresh("dev", stale)
    assert fresh is not None
    assert fresh.password == "pw-after-reset"
    assert (await resolver.resolve("dev")).target == fresh


async def test_refresh_offers_nothing_when_the_password_did_not_change(
    make_resolver: MakeResolver,
) -> None:
    resolver = make_resolver()
    stale = (await resolver.resolve("dev")).target
    assert await resolver.refresh("dev", stale) is None


async def test_sessions_refused_together_share_one_refresh(
    neon_api: NeonStandIn, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver()
    stale = (await resolver.resolve("dev")).target
    neon_api.set_password("dev", "neondb_owner", "pw-rotated")
    neon_api.clear_requests()
    fresh = await asyncio.gather(*(resolver.refresh("dev", stale) for _ in range(5)))
    assert {t.password for t in fresh if t is not None} == {"pw-rotated"}
    assert None not in fresh
    assert len(neon_api.requests_to("reveal_password")) == 1


async def test_static_branches_are_never_refreshed(
    neon_api: NeonStandIn, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver(f'[branches.dev]\nurl = "{STATIC_URL}"\n')
    stale = (await resolver.resolve("dev")).target
    assert await resolver.refresh("dev", stale) is None
    assert neon_api.requests == []


async def test_refresh_errors_reach_the_caller(
    neon_api: NeonStandIn, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver()
    stale = (await resolver.resolve("dev")).target
    neon_api.inject("list_branches", 404, times=None)
    neon_api.inject("get_project", 404, times=None)
    with pytest.raises(ProjectNotFound):
        await resolver.refresh("dev", stale)


async def test_create_branch_marks_it_as_ours_and_waits_until_it_is_ready(
    neon_api: NeonStandIn,
) -> None:
    neon_api.add_branch("dev", password="pw")
    async with NeonApi(neon_api.api_key, neon_api.base_url, retry=FAST) as api:
        branch = await create_branch(
            api, neon_api.project_id, "feature-1", parent="dev", expires_in=timedelta(hours=2)
        )
    body = neon_api.requests_to("create_branch")[0].body
    assert body["endpoints"] == [{"type": "read_write"}]
    assert body["annotation_value"] == {"created-by": "neonlocal"}
    assert body["branch"]["parent_id"] == neon_api.branch("dev").id
    expires = datetime.fromisoformat(body["branch"]["expires_at"])
    assert timedelta(minutes=119) < expires - datetime.now(UTC) <= timedelta(hours=2)
    assert branch.name == "feature-1"
    polled = [r for r in neon_api.requests_to("get_operation") if r.status == 200]
    assert polled, "the operations were waited for"
    assert all(op.status(float("inf")) == "finished" for op in neon_api.operations())


async def test_delete_within_a_budget_retries_until_the_branch_is_gone(
    neon_api: NeonStandIn,
) -> None:
    doomed = neon_api.add_branch("doomed")
    neon_api.inject("delete_branch", 500, times=5)
    async with NeonApi(neon_api.api_key, neon_api.base_url, retry=FAST) as api:
        assert await delete_branch_within(api, neon_api.project_id, doomed.id, budget=10.0)
    assert not neon_api.has_branch("doomed")


async def test_delete_within_a_budget_gives_up_at_once_on_a_protected_branch(
    neon_api: NeonStandIn,
) -> None:
    kept = neon_api.add_branch("kept", protected=True)
    async with NeonApi(neon_api.api_key, neon_api.base_url, retry=FAST) as api:
        assert not await delete_branch_within(api, neon_api.project_id, kept.id, budget=10.0)
    assert neon_api.has_branch("kept")
    assert neon_api.requests_to("delete_branch") == []


def test_pooled_beside_a_url_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[branches.dev]\nurl = "{STATIC_URL}"\npooled = true\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert caught.value.line == 1
    assert "write the -pooler host into the url" in caught.value.message


def test_network_resolve_takes_addresses_not_host_names(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[network.resolve]\n"{DEV_HOST}" = "localhost"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert caught.value.line == 2
    assert "expected an IP address" in caught.value.message


def test_a_table_without_url_is_fine_once_a_project_is_configured(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('branch = "staging"\n\n[branches.staging]\npooled = true\n')
    with pytest.raises(ConfigError, match=r"branches\.staging\.url: Field required"):
        load_settings(path, {})
    path.write_text(
        'branch = "staging"\n[neon]\nproject_id = "p-1"\n[branches.staging]\npooled = true\n'
    )
    settings = load_settings(path, {})
    check_selected_branch(settings)
    assert settings.branches["staging"].url is None
