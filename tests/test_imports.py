"""The package's modules import one way: no module reaches itself through other dimat modules.

Every import counts, including the ones inside functions (lazy imports still make a circle of dependencies). A
package importing its own submodules, or a submodule importing its package's names, is not a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import dimat

ROOT = Path(dimat.__file__).parent


def _module_names() -> Dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _resolve(name: str, mods: Dict[str, Path]) -> str:
    while name and name not in mods:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name


def _related(a: str, b: str) -> bool:
    return b.startswith(a + ".") or a.startswith(b + ".")


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the dimat modules it imports anywhere in its source (package/submodule edges left out)."""
    mods = _module_names()
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets: List[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("dimat"):
                targets = [_resolve(f"{node.module}.{a.name}", mods) or _resolve(node.module, mods) for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [_resolve(a.name, mods) for a in node.names if a.name.startswith("dimat")]
            edges[m].update(t for t in targets if t and t != m and not _related(m, t))
    return edges


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_detector_finds_a_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]


def test_the_graph_sees_lazy_imports():
    # dimat.commands.run imports dimat.runner inside its function; the graph must still hold that edge
    assert "dimat.runner" in import_graph()["dimat.commands.run"]
