"""The package imports one way: the import graph, read from the source, has no cycle and no upward edge.

Every ``import`` statement counts, the ones inside functions included (a function-level import is fine for
start-up time, never to hide a cycle). Importing ``a.b.c`` from outside package ``a.b`` also runs
``a.b/__init__.py``, so it is an edge to that package too. The layers, bottom to top, are ``LAYERS``; a module
may import its own layer and the layers below it. ARCHITECTURE.md explains the order.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"sparsedict": ROOT / "src" / "sparsedict", "sparsedict.kernels": ROOT / "kernels"}

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # plumbing every stage uses; imports nothing of ours above it
    ("base", ("sparsedict._version", "sparsedict.config", "sparsedict.util", "sparsedict.distributed", "sparsedict.metrics",
              "sparsedict.lm", "sparsedict.corpus", "sparsedict.data", "sparsedict.registry")),
    ("kernels", ("sparsedict.kernels",)),
    ("cache", ("sparsedict.cache",)),
    ("formats", ("sparsedict.formats",)),
    ("hub", ("sparsedict.hub",)),
    ("dictionaries", ("sparsedict.dictionaries",)),
    ("train", ("sparsedict.train",)),
    ("eval", ("sparsedict.eval",)),
    ("inspect", ("sparsedict.inspect",)),
    # commands and end-to-end pipelines: may import anything
    ("top", ("sparsedict", "sparsedict.__main__", "sparsedict.cli", "sparsedict.pipeline", "sparsedict.sweep",
             "sparsedict.convert")),
]  # fmt: skip


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its ``__init__.py``)."""
    found = {}
    for prefix, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports (module level and inside functions)."""
    package = name if _is_package(name, mods) else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in mods else base)
    edges = set()
    for target in targets:
        while target and target not in mods:  # `import a.b.c` where c is an attribute: the module a.b
            target = target.rpartition(".")[0]
        if not target or target == name:
            continue
        edges.add(target)
        parent = target.rpartition(".")[0]
        while parent and parent != "sparsedict":  # importing a.b.c from outside a.b runs a.b/__init__
            if not (name == parent or name.startswith(parent + ".")):
                edges.add(parent)
            parent = parent.rpartition(".")[0]
    return edges


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, mods) for name, path in mods.items()}


def layer_of(name: str) -> int:
    best, level = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > len(best):
                best, level = p, i
    if level is None:
        raise AssertionError(
            f"{name} is in no layer: add it to LAYERS in {__file__} (and to ARCHITECTURE.md)"
        )
    return level


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_cycle():
    found = cycles(graph())
    assert not found, "import cycles (each line one strongly connected set of modules):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_imports_point_down_the_layers():
    g = graph()
    names = [n for n, _ in LAYERS]
    upward = [
        f"{a} ({names[layer_of(a)]}) imports {b} ({names[layer_of(b)]})"
        for a in sorted(g)
        for b in sorted(g[a])
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports against the layer order " + " < ".join(names) + ":\n" + "\n".join(upward)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function and a relative import both make edges."""
    pkg = tmp_path / "sparsedict"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from . import b\n")
    (pkg / "a" / "b.py").write_text("def f():\n    from sparsedict.c import g\n")
    (pkg / "c.py").write_text("import sparsedict.a.b\n")
    mods = {
        "sparsedict": pkg / "__init__.py",
        "sparsedict.a": pkg / "a" / "__init__.py",
        "sparsedict.a.b": pkg / "a" / "b.py",
        "sparsedict.c": pkg / "c.py",
    }
    g = {n: imports(n, p, mods) for n, p in mods.items()}
    assert g["sparsedict.a"] == {"sparsedict.a.b"}
    assert g["sparsedict.a.b"] == {"sparsedict.c"}
    assert g["sparsedict.c"] == {"sparsedict.a.b", "sparsedict.a"}
    assert cycles(g) == [["sparsedict.a", "sparsedict.a.b", "sparsedict.c"]]
