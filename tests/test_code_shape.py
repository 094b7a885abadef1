"""The code's shape, checked: imports run one way with no cycle, Prefect internals stay in one module,
modules and functions stay small enough to read. Every import counts, the ones inside functions too:
a lazy import still ties the two modules together."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from flows.prefect_compat import INTERNAL_MODULES

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lib", "flows", "deployments", "indostar_client", "devtools", "bench")
# Which packages each may import (itself included). Wheel packages never reach devtools or bench.
ALLOWED = {
    "lib": {"lib"},
    "flows": {"flows", "lib"},
    "indostar_client": {"indostar_client", "flows", "lib"},
    "deployments": {"deployments", "flows", "lib"},
    "devtools": {"devtools", "deployments", "indostar_client", "flows", "lib"},
    "bench": {"bench", "devtools", "deployments", "indostar_client", "flows", "lib"},
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
COMPAT = ROOT / "flows" / "prefect_compat.py"


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "migrations" not in p.parts)


@cache
def _modules() -> dict[str, Path]:
    out = {}
    for path in _python_files(*PACKAGES):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imported(path: Path) -> list[tuple[str, int]]:
    """Every module name ``path`` imports (``from a import b`` counts as ``a.b``), with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


def _first_party(name: str) -> str | None:
    modules = _modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in _modules().items():
        found = {_first_party(name) for name, _ in _imported(path)}
        graph[module] = {m for m in found if m and m != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_anywhere():
    """Among our modules (lib, flows, deployments, indostar_client, devtools, bench), lazy imports included."""
    assert _cycle(_graph()) is None


def test_packages_import_only_downwards():
    """lib is the bottom; the backend's client, the operator's CLI and dev tooling sit on it; the wheel's
    packages never import devtools or bench."""
    wrong = []
    for module, path in _modules().items():
        package = module.split(".")[0]
        for name, line in _imported(path):
            target = _first_party(name)
            if target and target.split(".")[0] not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert wrong == []


def test_prefect_internals_are_used_in_flows_prefect_compat_only():
    """Everything else, tests included (but the compat contract tests), imports Prefect's public API."""
    contract = ROOT / "tests" / "flows" / "test_prefect_compat.py"
    wrong = []
    for path in _python_files(*PACKAGES, "tests"):
        if path in (COMPAT, contract):
            continue
        for name, line in _imported(path):
            if name.startswith(INTERNAL_MODULES):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            elif name.startswith("prefect.") and any(part.startswith("_") for part in name.split(".")):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports private {name}")
    assert wrong == []


@pytest.mark.parametrize("folder", PACKAGES)
def test_modules_and_functions_stay_small(folder):
    """No module over 500 lines and no function over 60 outside tests and migrations."""
    too_long = []
    for path in _python_files(folder):
        text = path.read_text()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []
