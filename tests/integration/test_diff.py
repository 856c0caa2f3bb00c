"""`neonlocal diff`: schema differences through the Neon API's compare_schema (the stand-in)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from neon_standin import NeonStandIn, neon_api
from neonlocal.cli import main

__all__ = ["neon_api"]  # the stand-in fixture, used by name below

SPEC = Path(__file__).parents[1] / "data" / "neon-api" / "openapi-v2.yaml"
MAIN_SCHEMA = "CREATE TABLE public.users (\n    id bigint NOT NULL\n);\n"
DEV_SCHEMA = MAIN_SCHEMA + "\nCREATE TABLE public.invoices (\n    id bigint NOT NULL\n);\n"


@pytest.fixture
def project(neon_api: NeonStandIn) -> Iterator[NeonStandIn]:
    """main with a users table; dev-maria (a child of main) adds invoices; dev-same adds none."""
    neon_api.set_schema("main", MAIN_SCHEMA)
    neon_api.add_branch("dev-maria")
    neon_api.set_schema("dev-maria", DEV_SCHEMA)
    neon_api.add_branch("dev-same")
    return neon_api


def write_config(tmp_path: Path, standin: NeonStandIn | None, branch: str = "dev-maria") -> Path:
    lines = [f'branch = "{branch}"', ""]
    if standin is not None:
        lines += [
            "[neon]",
            f'project_id = "{standin.project_id}"',
            f'api_url = "{standin.base_url}"',
        ]
    else:
        lines += [
            f"[branches.{branch}]",
            'url = "postgresql://u:pw@ep-x-1.us-east-2.aws.neon.tech/db?sslmode=require"',
        ]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def run(tmp_path: Path, config: Path, *args: str, **env: str) -> Result:
    environ = {
        "NEON_API_KEY": env.pop("key", "neon-standin-test-key-5f2c9a"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "NO_COLOR": None,
        **env,
    }
    for name in os.environ:
        if name.startswith("NEONLOCAL_"):
            environ[name] = None  # type: ignore[assignment]
    return CliRunner().invoke(main, ["--config", str(config), "diff", *args], env=environ)


def test_diff_of_the_selected_branch_against_its_parent_prints_it_and_exits_1(
    tmp_path: Path, project: NeonStandIn
) -> None:
    result = run(tmp_path, write_config(tmp_path, project))

    assert result.exit_code == 1, result.stderr
    assert "+CREATE TABLE public.invoices (" in result.stdout.splitlines()
    assert result.stdout.splitlines()[:2] == ["--- a/neondb", "+++ b/neondb"]
    assert "\x1b[" not in result.stdout  # not a terminal: plain text
    asked = project.requests_to("compare_schema")[-1]
    assert asked.path.endswith(f"/branches/{project.branch('dev-maria').id}/compare_schema")
    assert asked.query == {"base_branch_id": project.branch("main").id, "db_name": "neondb"}


def test_diff_of_equal_schemas_prints_nothing_and_exits_0(
    tmp_path: Path, project: NeonStandIn
) -> None:
    result = run(tmp_path, write_config(tmp_path, project), "main", "dev-same")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "dev-same has the same schema as main (database neondb)" in result.stderr


def test_diff_with_base_and_branch_named_compares_those_two(
    tmp_path: Path, project: NeonStandIn
) -> None:
    result = run(tmp_path, write_config(tmp_path, project), "dev-maria", "main")

    assert result.exit_code == 1
    assert "-CREATE TABLE public.invoices (" in result.stdout.splitlines()
    asked = project.requests_to("compare_schema")[-1]
    assert asked.query["base_branch_id"] == project.branch("dev-maria").id


def test_diff_with_one_name_compares_the_selected_branch_against_it(
    tmp_path: Path, project: NeonStandIn
) -> None:
    result = run(tmp_path, write_config(tmp_path, project, branch="dev-same"), "dev-maria")

    assert result.exit_code == 1
    assert "-CREATE TABLE public.invoices (" in result.stdout.splitlines()


def test_diff_is_coloured_when_asked_and_plain_with_no_color(
    tmp_path: Path, project: NeonStandIn
) -> None:
    config = write_config(tmp_path, project)
    coloured = run(tmp_path, config, "--color", "always")
    plain = run(tmp_path, config, "--color", "never")

    assert "\x1b[32m+CREATE TABLE public.invoices (\x1b[0m" in coloured.stdout
    assert "\x1b[" not in plain.stdout
    assert plain.exit_code == coloured.exit_code == 1


def test_diff_of_the_default_branch_without_a_base_says_to_name_one(
    tmp_path: Path, project: NeonStandIn
) -> None:
    result = run(tmp_path, write_config(tmp_path, project, branch="main"))

    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "neonlocal: branch main has no parent; name one to compare it with "
        "(neonlocal diff BASE main)"
    )


def test_diff_with_static_urls_only_says_it_needs_the_api(tmp_path: Path) -> None:
    result = run(tmp_path, write_config(tmp_path, None))

    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "neonlocal: diff compares schemas through the Neon API: set [neon] project_id "
        "(or run `neonlocal init`)"
    )


def test_diff_of_an_unknown_branch_or_database_exits_2_with_one_line(
    tmp_path: Path, project: NeonStandIn
) -> None:
    config = write_config(tmp_path, project)
    unknown = run(tmp_path, config, "main", "dev-mario")
    no_db = run(tmp_path, config, "--database", "nope")

    assert unknown.exit_code == 2
    assert "dev-mario" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert no_db.exit_code == 2
    assert "'nope' not found" in no_db.stderr


def test_compare_schema_requests_and_answers_have_the_spec_shapes(
    tmp_path: Path, project: NeonStandIn
) -> None:
    run(tmp_path, write_config(tmp_path, project))
    spec: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    operation = spec["paths"]["/projects/{project_id}/branches/{branch_id}/compare_schema"]["get"]
    allowed = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
    answer = spec["components"]["schemas"]["BranchSchemaCompareResponse"]["properties"]

    for request in project.requests_to("compare_schema"):
        assert set(request.query) <= allowed
        assert request.method == "GET"
    assert set(answer) == {"diff"}
