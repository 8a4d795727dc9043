"""The package layering, read from the source (every import statement, at module level or inside a function):

    common  <-  modeling  <-  data_pipeline, evaluation  <-  trainer  <-  launch

No module imports one that (directly or through others) imports it back, no module imports another's private
name, and nothing the data pipeline runs can reach the trainer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "modeling", "data_pipeline", "evaluation", "trainer", "launch")
# what each package may import (besides itself)
ALLOWED = {
    "common": set(),
    "modeling": {"common"},
    "data_pipeline": {"common", "modeling", "evaluation"},
    "evaluation": {"common", "modeling", "data_pipeline"},
    "trainer": {"common", "modeling", "data_pipeline", "evaluation"},
    "launch": {"common", "modeling", "data_pipeline", "evaluation", "trainer"},
}
# deprecated names kept for one release; they only re-export
SHIMS = {"trainer.evaluate", "trainer.evaluation", "trainer.reranker"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:  # `from pkg import module` names a module, not an attribute
                sub = f"{base}.{a.name}"
                out.append((sub, [], node.lineno) if sub in known else (base, [a.name], node.lineno))
    return out


def graph() -> dict[str, dict[str, list[str]]]:
    mods = modules()
    g: dict[str, dict[str, list[str]]] = {}
    for name, path in mods.items():
        edges = g.setdefault(name, {})
        for target, names, line in imports(name, path, set(mods)):
            assert target in mods, f"{path}:{line}: imports {target}, which is not a module of this project"
            if target != name:
                edges.setdefault(target, []).extend(names)
    return g


def test_packages_import_only_the_layers_below_them():
    bad = [f"{m} imports {t}" for m, edges in graph().items() for t in edges
           if m not in SHIMS and t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, bad


def test_no_import_cycles():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{m} takes {n} from {t}" for m, edges in graph().items() for t, names in edges.items() for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


@pytest.mark.parametrize("package", ["data_pipeline", "modeling", "common"])
def test_nothing_the_package_runs_can_reach_the_trainer(package):
    g = graph()
    seen, todo = set(), [m for m in g if m.split(".")[0] == package]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += list(g[m])
    assert not {m for m in seen if m.split(".")[0] in ("trainer", "launch")}


def test_the_graph_sees_function_level_and_relative_imports():
    """The checks above would pass vacuously if the reader missed imports: it must see these two."""
    g = graph()
    assert "evaluation.reranker" in g["data_pipeline.teacher"]  # inside a function
    assert "modeling.distributed" in g["modeling.chunking"]  # `from . import distributed`
