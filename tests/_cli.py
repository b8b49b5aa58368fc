"""The ``slimsearch`` command run in the test's own process, for tests across the suite."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace


def cli(*args: str) -> SimpleNamespace:
    """``slimsearch ARGS...`` in this process: its exit code, stdout and stderr."""
    from slimsearch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(code=code, stdout=out.getvalue(), stderr=err.getvalue())
