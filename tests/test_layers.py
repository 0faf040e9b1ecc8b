"""The package's import graph, read from the source: no cycles, and no module imports from
a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ldvae"

# Lowest first. A module may import its own layer and those before it.
LAYERS = ["util", "nn", "cpu", "data", "train", "query", "model", "factors", "workflow", "cli"]
# Modules outside a layer folder: their layer.
TOP_LEVEL = {"ldvae._version": "util", "ldvae.model": "model", "ldvae.distributed": "cli"}
# The package's face: it re-exports from every layer and installs the aliases of earlier paths.
OUTSIDE = {"ldvae", "ldvae._compat"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every ldvae module that ``name`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import ldvae.data.contract as c` names a module; an attribute's owner
                t = t.rpartition(".")[0]
            if t.startswith("ldvae"):
                out.add(t)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def layer_of(name: str) -> str | None:
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_has_a_layer():
    assert sorted(n for n in _graph() if n not in OUTSIDE and layer_of(n) is None) == []


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for name, targets in _graph().items():
        if name in OUTSIDE:
            continue
        for t in targets:
            if t in OUTSIDE or LAYERS.index(layer_of(t)) > LAYERS.index(layer_of(name)):
                upward.append(f"{name} ({layer_of(name)}) imports {t} ({layer_of(t) or 'the package'})")
    assert upward == []


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_the_graph_reader_sees_imports_at_every_depth():
    # the checks above are only as good as the reader: a function-level relative import counts
    graph = _graph()
    assert "ldvae.data.contract" in graph["ldvae.model.facade"]
    assert all(t.startswith("ldvae") for targets in graph.values() for t in targets)


def test_earlier_module_paths_and_subpackages_are_attributes_after_import_ldvae():
    import subprocess
    import sys

    code = ("import ldvae; assert ldvae.stream is ldvae.data.backed; ldvae.stream.read_backed; "
            "assert ldvae.interpret is ldvae.factors.interpret; ldvae.query.posterior")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
