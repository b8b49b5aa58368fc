"""The benchmarks use only slimsearch's public names, at the paths the code has now (issue 18).

A private name (a module path component or an imported name starting with ``_``) may move
or vanish without a deprecation; an old module path forwards with a DeprecationWarning for
one release only. Either would break a benchmark unnoticed, since the suite does not run them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import slimsearch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
PACKAGE = Path(slimsearch.__file__).resolve().parent


def _imports(source: str) -> list[tuple[int, str, list[str]]]:
    """Every import in ``source``, also those inside functions: (line, module path, imported names)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or ""), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
    return sorted(found)


def private_imports(source: str) -> list[str]:
    """``line: import`` for each import of a private module path or name (``__future__`` aside)."""
    bad = []
    for line, module, names in _imports(source):
        if module == "__future__":
            continue
        if any(part.startswith("_") for part in module.split(".") if part) or any(n.startswith("_") for n in names):
            bad.append(f"{line}: {module}" + (f" import {', '.join(names)}" if names else ""))
    return bad


def test_private_imports_finds_private_modules_and_names():
    source = ("from __future__ import annotations\n"
              "import slimsearch._io\n"
              "def f():\n"
              "    from slimsearch.search._types import EVALUATE_ATTR\n"
              "    from slimsearch.compress.quant.layers import _QuantMixin, apply\n"
              "    from slimsearch.search import EVALUATE_ATTR, Constraint\n"
              "    import slimsearch.jobs.worker\n")
    assert private_imports(source) == [
        "2: slimsearch._io",
        "4: slimsearch.search._types import EVALUATE_ATTR",
        "5: slimsearch.compress.quant.layers import _QuantMixin, apply",
    ]


def test_there_are_benchmarks():
    assert BENCHMARKS, f"no benchmarks/*.py under {ROOT}"


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_only_public_names(path):
    bad = private_imports(path.read_text())
    assert not bad, (f"{path.relative_to(ROOT)} imports private names (re-export them from the package's "
                     f"__init__ with __all__ instead): {bad}")


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_modules_that_exist(path):
    """Each slimsearch module a benchmark imports is in the source tree, not an old path that forwards."""
    missing = []
    for line, module, _ in _imports(path.read_text()):
        parts = module.split(".")
        if parts[0] != "slimsearch":
            continue
        where = PACKAGE.joinpath(*parts[1:])
        if not (where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()):
            missing.append(f"{line}: {module}")
    assert not missing, f"{path.relative_to(ROOT)} imports modules that are not (or no longer) in slimsearch: {missing}"
