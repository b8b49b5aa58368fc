"""Importing slimsearch.hardware_profiles must not import torch."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_pull_in_torch():
    code = "import sys, slimsearch.hardware_profiles; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
