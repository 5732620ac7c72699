"""The house keeps its layers: no import cycle between saekit's modules, and the stages never reach in-model training.

Imports are read from the source (every `import` / `from ... import`, inside functions
too, so a deferred import cannot hide a cycle).  A module is a file: `saekit.store.reader`,
`saekit.dictionaries` (its `__init__.py`); `from saekit.x import y` depends on `saekit.x.y`
when that is a module, else on `saekit.x`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import saekit

ROOT = Path(saekit.__file__).parent
STAGES = ("saekit.harvest", "saekit.train", "saekit.splice", "saekit.store", "saekit.dictionaries", "saekit.metrics")


def module_files() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:  # `import saekit.x.y as z` style names: the longest module prefix
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_stages_never_import_inmodel():
    graph = import_graph()
    stage_modules = [m for m in graph if any(m == s or m.startswith(s + ".") for s in STAGES)]
    assert "saekit.train" in stage_modules and "saekit.store.reader" in stage_modules
    bad = {m: sorted(r for r in reachable(graph, m) if r.startswith("saekit.inmodel")) for m in stage_modules}
    assert {m: r for m, r in bad.items() if r} == {}


def test_the_checks_can_fail():
    """The detectors themselves: a planted cycle and a planted stage → inmodel edge are found."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycles(g) == [["a", "b", "c"]]
    g = import_graph()
    g["saekit.metrics"] = g["saekit.metrics"] | {"saekit.inmodel.e2e"}
    assert "saekit.inmodel.e2e" in reachable(g, "saekit.splice")
