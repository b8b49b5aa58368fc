"""The ``slimsearch`` command run in the test's own process, for tests across the suite."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace


def cli(*args: str) -> SimpleNamespace:
    """``slimsearch ARGS...`` in this process: its exit code, stdout and stderr."""
    from slimsearch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(code=code, stdout=out.getvalue(), stderr=err.getvalue())


def write_job(folder: Path, data: dict, name: str = "job.yaml") -> Path:
    """The job mapping ``data`` as a YAML job file in ``folder``."""
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def local_job(folder: Path, data: dict) -> SimpleNamespace:
    """``slimsearch run`` of job ``data`` into ``folder/out`` on the local executor, which must succeed:
    the job file, the folder and the command's result."""
    job, out = write_job(folder, data), folder / "out"
    result = cli("run", str(job), "--out", str(out), "--executor", "local", "--no-progress")
    assert result.code == 0, result.stderr
    return SimpleNamespace(job=job, out=out, result=result)
