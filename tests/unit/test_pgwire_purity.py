"""The pgwire package stays sans-IO: no asyncio, socket or ssl, so it can be tested and reused.

scramp itself imports ssl (and through it socket) for its SSLSocket channel-binding helpers,
so the modules that reach scramp (scram, frontend, login) cannot be checked with the real
scramp in sys.modules. They are checked twice instead: statically, on the import statements of
our own source (``ast``), and at runtime with scramp replaced by an inert stub.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import neonlocal.pgwire

PACKAGE_DIR = Path(neonlocal.pgwire.__file__).parent
MODULES = sorted(
    f"neonlocal.pgwire.{info.name}" for info in pkgutil.iter_modules([str(PACKAGE_DIR)])
)
FORBIDDEN = frozenset({"asyncio", "socket", "ssl", "selectors", "select"})
# Importing these pulls in scramp (directly or through neonlocal.pgwire.scram).
REACHES_SCRAMP = frozenset(
    {"neonlocal.pgwire.scram", "neonlocal.pgwire.frontend", "neonlocal.pgwire.login"}
)

_PROBE = """
import importlib, json, sys, types
if {stub_scramp!r}:
    scramp = types.ModuleType("scramp")
    scramp.__path__ = []
    core = types.ModuleType("scramp.core")
    core.CBindData = type("CBindData", (), {{}})
    scramp.core = core
    for name in ("ScramClient", "ScramMechanism", "ScramException"):
        setattr(scramp, name, type(name, (Exception,), {{}}))
    sys.modules["scramp"] = scramp
    sys.modules["scramp.core"] = core
before = set(sys.modules)
importlib.import_module({module!r})
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _newly_imported(module: str, *, stub_scramp: bool) -> set[str]:
    """Top-level names of the modules that importing `module` adds, in a fresh interpreter."""
    code = _PROBE.format(module=module, stub_scramp=stub_scramp)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return {name.split(".")[0] for name in json.loads(result.stdout)}


def _imports_of(path: Path) -> set[str]:
    """Top-level names of the absolute imports written in one source file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_is_checked() -> None:
    """The module list is discovered, so a new pgwire module cannot slip past these checks."""
    assert {"neonlocal.pgwire.codec", "neonlocal.pgwire.framing"} <= set(MODULES)
    assert set(MODULES) >= REACHES_SCRAMP


@pytest.mark.parametrize("module", MODULES)
def test_source_imports_no_io_modules(module: str) -> None:
    """No pgwire source file imports asyncio, socket, ssl or select(ors)."""
    path = PACKAGE_DIR / f"{module.rsplit('.', 1)[1]}.py"
    assert not _imports_of(path) & FORBIDDEN


@pytest.mark.parametrize("module", MODULES)
def test_only_scram_module_imports_scramp(module: str) -> None:
    """scramp (which drags in ssl) stays confined to pgwire.scram."""
    path = PACKAGE_DIR / f"{module.rsplit('.', 1)[1]}.py"
    assert ("scramp" in _imports_of(path)) == (module == "neonlocal.pgwire.scram")


@pytest.mark.parametrize("module", sorted(set(MODULES) - REACHES_SCRAMP))
def test_importing_pure_module_loads_no_io_modules(module: str) -> None:
    """Importing codec, framing, errors, sqlstate loads no asyncio/socket/ssl at all."""
    assert not _newly_imported(module, stub_scramp=False) & FORBIDDEN


@pytest.mark.parametrize("module", sorted(REACHES_SCRAMP))
def test_importing_scramp_users_loads_no_io_modules_of_their_own(module: str) -> None:
    """With scramp stubbed out, scram/frontend/login themselves load no asyncio/socket/ssl."""
    assert not _newly_imported(module, stub_scramp=True) & FORBIDDEN


@pytest.mark.parametrize("module", sorted(REACHES_SCRAMP))
def test_importing_scramp_users_never_loads_asyncio(module: str) -> None:
    """Even with the real scramp, no event loop machinery is imported."""
    assert "asyncio" not in _newly_imported(module, stub_scramp=False)
