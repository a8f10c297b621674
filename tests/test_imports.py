"""The import graph of epg_fast has no cycle: a module never needs, directly or through
others, a module that needs it. Every import counts, at the top of a file or inside a
function (a lazy import hides a cycle from the interpreter, not from the reader).

The graph is read from the source with ast, so the test imports nothing. An import of a
package (`from epg_fast.data import x`) is an edge to the package's __init__, unless x is a
submodule; the implicit import of a module's parent packages is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "epg_fast"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The epg_fast modules that `name` (at `path`) imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known.keys()
            found |= subs or {target}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]], within: tuple[str, ...] = ("",)) -> list[list[str]]:
    """One cycle per strongly connected component with a cycle, restricted to the modules
    whose name starts with one of `within` (Tarjan's algorithm)."""
    nodes = [n for n in edges if n.startswith(within)]
    sub = {n: sorted(m for m in edges[n] if m in nodes) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(n: str) -> None:
        index[n] = low[n] = len(index)
        stack.append(n)
        for m in sub[n]:
            if m not in index:
                visit(m)
                low[n] = min(low[n], low[m])
            elif m in stack:
                low[n] = min(low[n], index[m])
        if low[n] == index[n]:
            component = []
            while True:
                m = stack.pop()
                component.append(m)
                if m == n:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in nodes:
        if n not in index:
            visit(n)
    return found


def test_the_graph_sees_every_kind_of_import():
    edges = graph()
    assert "epg_fast.data.plan" in edges["epg_fast.data.loader"]  # from epg_fast.data.plan import ...
    assert "epg_fast.data.dali" in edges["epg_fast.data.loader"]  # the lazy import inside build_loader
    assert "epg_fast.data.loader" in edges["epg_fast.data"]  # a package's __init__
    assert "epg_fast.config" in edges["epg_fast.data.loader"]


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a"}}) == []
    assert cycles({"x.a": {"x.b", "y"}, "x.b": {"x.a"}, "y": {"x.a"}}, ("x.",)) == [["x.a", "x.b"]]


def test_no_import_cycle_in_epg_fast():
    assert cycles(graph()) == []
