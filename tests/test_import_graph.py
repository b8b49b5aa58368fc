"""Imports point one way (DESIGN.md, "Layout"): the graph of ``src/slimsearch``'s imports, built
from the AST (every import: module level, in functions, under TYPE_CHECKING), has no cycle
and no edge from a layer to one above it. Modules stay small: none over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "slimsearch"
MAX_LINES = 500

# Lowest first. A module belongs to the first entry that is its name or a package above it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("slimsearch.exceptions", "slimsearch._io", "slimsearch._threads", "slimsearch._compat", "slimsearch._package",
     "slimsearch.metric_names", "slimsearch._device"),
    ("slimsearch.spaces",),
    ("slimsearch.hardware_profiles",),
    ("slimsearch.structures",),
    ("slimsearch.tasks",),
    ("slimsearch.compress",),
    ("slimsearch.deploy",),
    ("slimsearch.evaluators",),
    ("slimsearch.ray_runtime", "slimsearch.search"),
    ("slimsearch.storage", "slimsearch.dashboards"),
    ("slimsearch.jobs",),
    ("slimsearch.cluster", "slimsearch.export", "slimsearch.export_llm", "slimsearch.launch"),
    ("slimsearch.cli", "slimsearch"),
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (a ``from package import module`` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                found.add(target)
    return found


def _layer(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_import_graph.py: add it to LAYERS")
    return best[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_is_in_a_layer():
    for module in _graph():
        _layer(module)


def test_no_module_imports_a_layer_above_its_own():
    back = sorted(f"{src} -> {dst}" for src, targets in _graph().items() for dst in targets
                  if _layer(dst) > _layer(src) and not (src == "slimsearch" or dst == "slimsearch"))
    assert not back, "imports that point up the layers:\n" + "\n".join(back)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_is_over_500_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines (at most {MAX_LINES}: one concept a module)"


def test_the_checks_fail_on_a_back_edge_and_a_cycle(tmp_path, monkeypatch):
    """The graph is read from the code: a back-edge and a cycle written into a copy are found."""
    import shutil

    copy = tmp_path / "src" / "slimsearch"
    shutil.copytree(PACKAGE, copy)
    (copy / "spaces" / "zz_back.py").write_text("from slimsearch.jobs import query\n")
    (copy / "jobs" / "zz_a.py").write_text("from slimsearch.jobs import zz_b\n")
    (copy / "jobs" / "zz_b.py").write_text("def f():\n    from slimsearch.jobs import zz_a\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path / "src")
    monkeypatch.setitem(globals(), "PACKAGE", copy)
    with pytest.raises(AssertionError, match="slimsearch.spaces.zz_back -> slimsearch.jobs.query"):
        test_no_module_imports_a_layer_above_its_own()
    with pytest.raises(AssertionError, match="slimsearch.jobs.zz_a <-> slimsearch.jobs.zz_b"):
        test_the_import_graph_has_no_cycle()


def test_no_package_exports_a_name_that_one_of_its_modules_has():
    """Importing a submodule sets it as its package's attribute: a function of the same name
    exported by the package would be replaced by the module (``compress.finalize``)."""
    clashes = []
    for init in PACKAGE.rglob("__init__.py"):
        modules = {p.stem for p in init.parent.glob("*.py")} | {p.name for p in init.parent.iterdir() if p.is_dir()}
        for node in ast.parse(init.read_text(encoding="utf-8")).body:
            package = ".".join(init.parent.relative_to(SRC).parts)
            names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                     [a.asname or a.name for a in node.names if node.module != package]  # not the module itself
                     if isinstance(node, ast.ImportFrom) else [])
            clashes += [f"{init.parent.relative_to(SRC)}: {n}" for n in names if n in modules and n != "__init__"]
    assert not clashes, "names that are also a module of the package:\n" + "\n".join(clashes)
