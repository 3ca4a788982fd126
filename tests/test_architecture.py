"""The house's shape, checked: layering contracts, no import cycles, small modules, and
imports that stay light where the design says they must.

``lint-imports`` (import-linter, contracts in pyproject.toml) checks the layering; the
tests here check that it really fails on a violation, and what it cannot see: cycles
between single modules (function-level and TYPE_CHECKING imports included), module
sizes, and what importing a light module really loads at run time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400
SERVER_LIBRARIES = ("grpc", "ray", "pymongo", "minio")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
                          cwd=cwd, capture_output=True, text=True, timeout=240,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_layering_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout


def test_a_deliberate_violation_breaks_the_contracts(tmp_path):
    """In a scratch copy, the edge importing the actors makes ``lint-imports`` fail, and it
    names the contract: the check is real, not a formality."""
    shutil.copytree(ROOT / "fedray", tmp_path / "fedray",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    halves = tmp_path / "fedray" / "edge" / "halves.py"
    halves.write_text(halves.read_text() + "\nfrom fedray.actors.controller import policy  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout[-3000:]
    assert "The edge never imports the server side" in result.stdout
    assert "fedray.edge.halves -> fedray.actors.controller.policy" in result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(m for m in graph.modules if m == "fedray" or m.startswith("fedray."))
    edges = {m: sorted(n for n in graph.find_modules_directly_imported_by(m)
                       if n == "fedray" or n.startswith("fedray.")) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, []))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_is_in_an_import_cycle():
    """grimp reads every import statement: module level, inside functions, and under
    TYPE_CHECKING, so a cycle held open by a late import still counts."""
    graph = grimp.build_graph("fedray", cache_dir=None)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("fedray", "fedray.a", "fedray.b", "fedray.c"):
        graph.add_module(name)
    graph.add_import(importer="fedray.a", imported="fedray.b")
    graph.add_import(importer="fedray.b", imported="fedray.c")
    graph.add_import(importer="fedray.c", imported="fedray.a")
    assert _cycles(graph) == [["fedray.a", "fedray.b", "fedray.c"]]


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in (ROOT / "fedray").rglob("*.py") if "_pb2" not in p.name}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}


def _loaded(module: str) -> list[str]:
    code = (f"import sys, json; import {module}; "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=120).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("module", ["fedray", "fedray.strategies", "fedray.strategies.dp",
                                    "fedray.strategies.fedbuff", "fedray.strategies.secagg.client",
                                    "fedray.strategies.secagg.server", "fedray.config",
                                    "fedray.actors.controller.policy", "fedray.tracking.resume",
                                    "fedray.tracking.schema"])
def test_light_modules_load_no_server_library(module):
    assert not set(_loaded(module)) & set(SERVER_LIBRARIES), module


def test_the_edge_loads_grpc_but_no_server_library():
    loaded = set(_loaded("fedray.edge"))
    assert "grpc" in loaded
    assert not loaded & {"ray", "pymongo", "minio", "nx_27017"}
