"""The import direction of the packages: jobs -> index_builder -> shards, never back, and no circle.

Every module of index_builder/, shards/ and jobs/ is read with ast (nothing is imported), and
every import counts, at module level or inside a function: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast

import pytest

from helpers import REPO

PACKAGES = ("index_builder", "shards", "jobs")


def modules() -> dict[str, str]:
    """Dotted module name -> path relative to the repo, for every .py of the packages."""
    out = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            parts = p.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p.relative_to(REPO).as_posix()
    return out


MODULES = modules()


def imported(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project's modules an import statement in module `name` loads: the module named, each of
    `from X import a` that is itself a module, and the packages above them (their __init__ runs)."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:                             # relative: from the package of `name`
            pkg = name.split(".")[: len(name.split(".")) - node.level + (MODULES[name].endswith("__init__.py"))]
            base = ".".join(pkg + ([base] if base else []))
        targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    out = []
    for t in targets:
        parts = t.split(".")
        out += [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in MODULES and m != name]
    return out


def edges() -> dict[str, dict[str, int]]:
    """module -> {module it imports: the line of the first such import}."""
    g = {}
    for name, path in MODULES.items():
        tree = ast.parse((REPO / path).read_text(), filename=path)
        g[name] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in imported(name, node):
                    g[name].setdefault(t, node.lineno)
    return g


GRAPH = edges()


def where(a: str, b: str) -> str:
    return f"{MODULES[a]}:{GRAPH[a][b]} imports {b}"


def test_the_walk_sees_every_package():
    assert {m.split(".")[0] for m in MODULES} == set(PACKAGES)
    assert "shards.search.router" in MODULES and "index_builder.cli" in MODULES
    assert any(t.startswith("index_builder.") for t in GRAPH["jobs.build_index"])   # it finds imports at all


@pytest.mark.parametrize("low,high", [("shards", "index_builder"), ("shards", "jobs"), ("index_builder", "jobs")])
def test_imports_flow_one_way(low, high):
    """shards/ is the serving side and the storage both share: it never imports the builder or the jobs,
    and the builder never imports the jobs that run it."""
    bad = [where(a, b) for a in GRAPH if a.split(".")[0] == low for b in GRAPH[a] if b.split(".")[0] == high]
    assert not bad, "\n".join(bad)


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan's algorithm),
    as the modules in import order with the first repeated at the end."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return [circle(g, c) for c in comps]


def circle(g: dict[str, dict[str, int]], comp: set[str]) -> list[str]:
    """A shortest way from the component's first module back to itself, inside the component."""
    start = min(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v]):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w in comp and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start} in {sorted(comp)}")


def test_no_import_circle():
    found = cycles(GRAPH)
    msg = "\n\n".join(" -> ".join(c) + "\n" + "\n".join(f"  {where(a, b)}" for a, b in zip(c, c[1:], strict=False))
                      for c in found)
    assert not found, f"import circles:\n{msg}"


@pytest.mark.parametrize("g,want", [
    ({"a": {}, "b": {"a": 1}}, []),
    ({"a": {"b": 1}, "b": {"a": 1}}, [["a", "b", "a"]]),
    ({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}, [["a", "b", "c", "a"]]),
    ({"a": {"b": 1, "c": 1}, "b": {"c": 1}, "c": {"a": 1}}, [["a", "c", "a"]]),     # the shortest way round
    ({"a": {"b": 1}, "b": {"a": 1}, "c": {"d": 1}, "d": {"c": 1}}, [["a", "b", "a"], ["c", "d", "c"]]),
])
def test_cycles_finds_each_circle(g, want):
    assert sorted(cycles(g)) == want
