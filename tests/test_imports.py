"""The package's import graph has no circles (issue 25), and importing mtakd stays cheap.

The graph is read from the source with ``ast``: every import at any depth (function-local ones too, since they
run when the function does), relative imports resolved, ``from X import name`` counting as an import of the
submodule ``X.name`` when that is a module (else of ``X``), and importing a submodule counting as importing its
parent packages' ``__init__`` (except the importer's own packages, which are already being imported). Imports
under ``if TYPE_CHECKING:`` count too: a dependency for the type checker is still a dependency of the design.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mtakd"


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package __init__)}`` for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _imported(tree: ast.AST, module: str, is_pkg: bool, modules) -> set[str]:
    """The names of the modules ``module``'s code imports (before adding parent packages)."""
    found: set[str] = set()

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` within the package."""
    modules = _modules()
    graph = {}
    for name, (path, is_pkg) in modules.items():
        own = set(_parents(name))
        deps = set()
        for target in _imported(ast.parse(path.read_text(), str(path)), name, is_pkg, modules):
            if target in modules:
                deps.add(target)
                deps.update(p for p in _parents(target) if p in modules and p not in own)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module, as one circle through it (a → … → a)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the package's graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_circle(graph, set(c)) for c in components]


def _circle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return sorted(component)  # not reached: a strongly connected component has a circle through every module


def test_the_graph_reader_sees_local_relative_and_from_imports():
    graph = import_graph()
    assert "mtakd.errors" in graph["mtakd.config"]  # top-level relative import
    assert "mtakd.objectives" in graph["mtakd.config"]  # function-local import (a registry check)
    assert "mtakd.objectives.fused" in graph["mtakd.config"]  # `from .objectives.fused import config_problem`
    assert "mtakd.mta" in graph["mtakd.config"]  # importing mtakd.mta.layers runs mtakd/mta/__init__.py
    assert "mtakd.mta.loss" in graph["mtakd.mta"]  # `from .loss import ...` in a package __init__
    assert "mtakd.config" not in graph["mtakd.mta.layers"]  # its annotations name MTAConfig without importing it
    assert not graph["mtakd.errors"]  # a leaf


def test_cycle_finder_names_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_circles_in_the_package():
    found = cycles(import_graph())
    assert not found, "import circles in mtakd/: " + "; ".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("modules", ["mtakd", "mtakd, mtakd.cli, mtakd.config, mtakd.errors, mtakd.run, mtakd.distill"])
def test_importing_mtakd_does_not_import_torch(modules):
    """``import mtakd`` (and the CLI entry point, the config and the run's modules) do no torch work at import."""
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
