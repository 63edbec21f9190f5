"""The project's modules import each other without circles.

Every import counts: at module level, inside a function (a lazy import) and under
``TYPE_CHECKING``, since each of them ties the two modules' designs together the same way.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.harness import ROOT

PACKAGES = ("llmmesh", "router", "worker", "cache_service", "bench")
#: Generated stubs import each other by protoc's rules, not ours.
GENERATED = "llmmesh.v1"


def project_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root`` by dotted name (a package by its name)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if name != GENERATED and not name.startswith(GENERATED + "."):
                modules[name] = path
    return modules


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """For each module, the project modules it imports: ``from a.b import c`` imports ``a.b.c``
    when that is a module, else ``a.b``; a name outside the project is left out."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(t for a in node.names if (t := resolve(a.name)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                for alias in node.names:
                    target = (
                        resolve(f"{base}.{alias.name}")
                        if f"{base}.{alias.name}" in modules
                        else resolve(base)
                    )
                    if target:
                        targets.add(target)
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


class TestImportGraph:
    """The import graph of llmmesh, router, worker, cache_service and bench."""

    def test_has_no_circles(self) -> None:
        """No two modules import each other, directly or through others."""
        graph = import_graph(project_modules(ROOT, PACKAGES))
        assert len(graph) > 40  # the walk found the project
        assert cycles(graph) == []

    def test_finds_a_circle_through_a_lazy_or_type_only_import(self, tmp_path: Path) -> None:
        """The checker itself sees circles closed by a function-level or TYPE_CHECKING import."""
        package = tmp_path / "pkg"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "a.py").write_text("from pkg import b\n")
        (package / "b.py").write_text("def f():\n    from pkg.c import x\n")
        (package / "c.py").write_text(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nx = 1\n"
        )
        (package / "d.py").write_text("import pkg.a\n")
        graph = import_graph(project_modules(tmp_path, ["pkg"]))
        assert graph["pkg.d"] == {"pkg.a"}
        assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
