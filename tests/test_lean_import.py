"""Importing slimsearch (and its thin entry points) must not import the heavy frameworks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "mlflow", "optuna")


@pytest.mark.parametrize("module", [
    "slimsearch", "slimsearch.cli", "slimsearch.search", "slimsearch.spaces", "slimsearch.storage",
    "slimsearch.dashboards", "slimsearch.tasks",
])
def test_import_pulls_in_no_heavy_framework(module):
    code = (f"import json, sys, {module}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(result.stdout) == []

