"""A job's folder: the names of the files in it, its state file (job.json), and making it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimsearch._io import atomic_write
from slimsearch.exceptions import ConfigError, JobStateError
from slimsearch.jobs.spec import JobSpec



STATE_FILE = "job.json"
FRONT_FILE = "front.json"
FRONT_HTML = "front.html"
MODELS_DIR = "models"  # the ONNX graphs of candidates that may still join the front
RESUME_MAY_CHANGE = ("budget", "workers", "threads_per_worker", "time_limit_s")  # of a job's search settings


def model_file(out: Path, plan) -> Path:
    """Where a worker leaves the deployable ONNX graph of ``plan``'s model in job folder ``out``.

    Named by a hash of the plan, which the worker and the driver both know (the trial
    number is the driver's alone). Workers must share the job folder's filesystem: one
    machine, or a shared mount on a cluster; elsewhere no model is kept and the front
    runs have none logged.
    """
    import hashlib

    return Path(out) / MODELS_DIR / (hashlib.sha256(plan.to_json().encode()).hexdigest()[:20] + ".onnx")


def write_json(path: Path, data: Any) -> None:
    from slimsearch.storage.urls import redact

    text = json.dumps(data, indent=2, sort_keys=True)
    # With a database password in it (job.json keeps the URLs it reopens): readable by its owner only.
    atomic_write(path, text, mode=0o600 if redact(text) != text else 0o666)


def job_state(spec: JobSpec, out: Path, resume: bool) -> dict:
    """The state of the job being resumed in ``out`` ({} for a new job), after checking that
    ``out`` holds one to resume (or none, for a new job). Reads only: called before the task
    loads, so a wrong folder is said at once."""
    state_path = out / STATE_FILE
    if resume:
        if not state_path.exists():
            raise JobStateError(f"{out}: no job to resume here (no {STATE_FILE}); run without --resume to start one")
        state = json.loads(state_path.read_text())
        stored = JobSpec.from_json(json.dumps(state["spec"]))
        mine, theirs = spec.model_dump(), stored.model_dump()
        for d in (mine, theirs):
            for key in RESUME_MAY_CHANGE:
                d["search"].pop(key, None)
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs[k])
            *most, last = ["search." + k for k in RESUME_MAY_CHANGE]
            raise ConfigError(f"{out}: the job file differs from the job being resumed in {diff}; "
                              f"only {', '.join(most)} and {last} may change on --resume")
        return state
    if state_path.exists():
        raise JobStateError(f"{out}: already holds a job; pass --resume to continue it or choose another --out")
    return {}


def make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there ({exc.strerror})") from None
