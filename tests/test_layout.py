"""The package layout holds: no import circle between kolora's modules (imports inside functions count), no
private name taken from another module, and every registered stage declared in its own package's spec.py.
The layer order itself is import-linter's contract in pyproject.toml (`lint-imports`, run by make lint/test)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

from kolora.pipeline.registry import STAGES

SRC = Path(__file__).resolve().parents[1] / "src"


def _cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One import cycle among the modules, or None (depth-first search, colouring modules as it goes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph.modules):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_circle_between_modules():
    graph = grimp.build_graph("kolora", include_external_packages=False)
    # a package's __init__ imports nothing of kolora: each subpackage is only a namespace with a docstring
    inits = [m for m in graph.modules if graph.find_modules_directly_imported_by(m) and
             (SRC / m.replace(".", "/") / "__init__.py").is_file()]
    assert not inits, f"package __init__ modules import other modules: {inits}"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_cycle_is_found_when_there_is_one():
    """The check above can fail: a graph with a loop is reported."""
    graph = grimp.ImportGraph()
    for m in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(m)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    assert _cycle(graph) is None
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycle(graph) == ["a.x", "a.y", "a.z", "a.x"]


def _private_imports() -> list[str]:
    """`from kolora.x import _name`, and `module._name` where `module` is a kolora module imported by name."""
    found = []
    for path in sorted((SRC / "kolora").rglob("*.py")):
        tree = ast.parse(path.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kolora"):
                found += [f"{path.relative_to(SRC)}: from {node.module} import {a.name}"
                          for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                modules |= {a.asname or a.name for a in node.names
                            if (SRC / (f"{node.module}.{a.name}".replace(".", "/") + ".py")).is_file()}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(SRC)}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_imported_from_another_module():
    assert not _private_imports()


def test_each_stage_is_declared_in_its_own_package():
    for s in STAGES:
        module, _, function = s.entry.partition(":")
        package = module.split(".")[1]
        spec = SRC / "kolora" / package / "spec.py"
        assert spec.is_file() and f'"{s.name}"' in spec.read_text(), (s.name, spec)
        assert (SRC / (module.replace(".", "/") + ".py")).is_file(), s.entry
        assert f"def {function}(ctx" in (SRC / (module.replace(".", "/") + ".py")).read_text(), s.entry
