"""The CLI's shape: one module per command group, none importing another in a cycle (not
even inside a function), and nothing below the CLI importing it: it is the top layer."""

from __future__ import annotations

import ast
from pathlib import Path

import fedray

PACKAGE = Path(fedray.__file__).parent
MAX_LINES = 400


def _imports(path: Path) -> set[str]:
    """Every fedray module ``path`` imports, at any depth (functions, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("fedray.")}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def test_nothing_below_the_cli_imports_it():
    offenders = {_module(p): sorted(i for i in _imports(p) if i.startswith("fedray.cli"))
                 for p in PACKAGE.rglob("*.py")
                 if "cli" not in p.relative_to(PACKAGE).parts[:1] and p.name != "__main__.py"}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_the_cli_modules_import_one_another_without_a_cycle():
    modules = {_module(p): p for p in (PACKAGE / "cli").glob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, (*path, module))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())
    assert "fedray.cli.main" not in set().union(*graph.values())  # the group is the top


def test_the_cli_modules_are_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "cli").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
