"""Deployable artifacts from a recorded plan: ONNX, TorchScript and a verified manifest.

The exported model is rebuilt from the plan recorded in the job and the teacher,
not copied from a worker, so what ships is reproducible from the job's records;
the exported file's test score, run in onnxruntime, must match the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Optional

from slimsearch.exceptions import ConfigError, JobStateError

ACCURACY_WINDOW = 0.01  # default choice: within 1 point of the teacher
REBUILD_TOLERANCE = 0.005  # the exported file may differ from the recorded test score by at most 0.5 points


def _read_job(job_dir: Path) -> tuple[dict, dict]:
    from slimsearch.search.job_runner import FRONT_FILE, STATE_FILE

    state_path, front_path = job_dir / STATE_FILE, job_dir / FRONT_FILE
    if not state_path.exists() or not front_path.exists():
        raise JobStateError(f"{job_dir}: not a finished job folder (needs {STATE_FILE} and {FRONT_FILE}); "
                            "run `slimsearch run` first")
    return json.loads(state_path.read_text()), json.loads(front_path.read_text())


def latency_objective(objectives: dict, metrics: dict) -> str:
    """The latency the default choice minimises: the first latency objective, else the measured
    latency at the task's larger batch (``latency_ms_b<N>@local`` among ``metrics``)."""
    for name in objectives:
        if name.startswith("latency_ms"):
            return name
    return next(name for name in metrics if name.startswith("latency_ms_b") and name.endswith("@local"))


def choose(front: dict, run_id: Optional[str] = None) -> tuple[dict, str]:
    """The candidate to export and the rule that chose it.

    With ``run_id``: that candidate. Otherwise the fastest front member whose
    validation metric is within 1 point of the teacher's; if none is, the most
    accurate front member.
    """
    metric = front["metric"]
    if run_id:
        for c in front["candidates"]:
            if c["run_id"] == run_id:
                return c, f"--run {run_id}"
        known = [c["run_id"] for c in front["front"]]
        raise ConfigError(f"--run: no candidate of this job has run id {run_id!r}; front members: {known}")
    if not front["front"]:
        raise JobStateError("the job has no completed candidate to export")
    speed = latency_objective(front["objectives"], front["front"][0]["metrics"])
    floor = front["teacher"][metric] - ACCURACY_WINDOW
    close = [c for c in front["front"] if c["metrics"][metric] >= floor]
    if close:
        best = min(close, key=lambda c: c["metrics"][speed])
        return best, f"fastest ({speed}) front member with {metric} >= teacher - {ACCURACY_WINDOW:g}"
    best = max(front["front"], key=lambda c: c["metrics"][metric])
    return best, f"no front member within {ACCURACY_WINDOW:g} of the teacher's {metric}; most accurate front member"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("slimsearch", "torch", "onnx", "onnxruntime", "optuna", "mlflow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


FORMATS = ("onnx", "torchscript", "packed")
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt", "packed": "model.slim"}


def _write_format(fmt: str, model, task, out: Path) -> tuple[Path, float]:
    """Write one deployable file and return it with its test score, measured by loading that file."""
    import torch

    from slimsearch.evaluators import score
    from slimsearch.evaluators.deploy import deployable_onnx_bytes, load_packed, save_packed
    from slimsearch.evaluators.onnx_graph import ort_predict, ort_session

    path = out / FILE_NAMES[fmt]
    if fmt == "onnx":
        # W8A8 models ship as an int8 QDQ graph (integer kernels in onnxruntime); others as float + QDQ.
        path.write_bytes(deployable_onnx_bytes(model, task.example_input))
        return path, task.metric(ort_predict(ort_session(str(path)), task.test.x), task.test.y)
    if fmt == "torchscript":
        with torch.no_grad():
            torch.jit.trace(model, task.example_input).save(str(path))
        return path, score(torch.jit.load(str(path)), task.test, task)
    # packed: low-bit weights really packed (a size gain on CPUs, not a speed gain); no pickle
    save_packed(model, path)
    return path, score(load_packed(path, task.teacher), task.test, task)


def export_job(job_dir: Path, out: Path, *, run_id: Optional[str] = None,
               formats: tuple[str, ...] = ("onnx", "torchscript")) -> dict:
    """Rebuild a front member, verify each file written, and write them with ``manifest.json``.

    Every file is loaded back and scored on the test split; export refuses (and
    removes what it wrote) when a score differs from the record by more than
    ``REBUILD_TOLERANCE``.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format: {bad[0] if bad else 'nothing'!r} is not a format; allowed: {list(FORMATS)}")
    import torch

    from slimsearch.evaluators import apply_plan, score
    from slimsearch.evaluators.evaluate import measure_local
    from slimsearch.evaluators.pack import packed_size
    from slimsearch.job import JobSpec
    from slimsearch.spaces import CompressionPlan
    from slimsearch.tasks import load_task

    job_dir = Path(job_dir).resolve()
    state, front = _read_job(job_dir)
    candidate, rule = choose(front, run_id)
    spec = JobSpec.from_json(json.dumps(state["spec"]))
    task = load_task(spec.task, seed=spec.search.seed, path=spec.task_path)
    if state.get("teacher_sha256") and task.teacher_sha256 != state["teacher_sha256"]:
        raise JobStateError(f"{job_dir}: the teacher of task {spec.task!r} changed since the search "
                            f"(sha256 {task.teacher_sha256[:12]} != {state['teacher_sha256'][:12]}); "
                            "results would not match the record")
    plan = CompressionPlan.from_dict(candidate["plan"])
    model = apply_plan(task, plan)
    metric = front["metric"]
    rebuilt_val = score(model, task.val, task)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recorded = candidate["metrics"].get(f"{metric}_test")
    written: list[Path] = []
    scores: dict[str, float] = {}
    try:
        for fmt in formats:
            path, test_score = _write_format(fmt, model, task, out)
            written.append(path)
            scores[fmt] = test_score
            if recorded is not None and abs(test_score - recorded) > REBUILD_TOLERANCE:
                raise JobStateError(f"the exported {fmt} file of trial {candidate['trial']} scores test "
                                    f"{metric}={test_score:.4f}, the record says {recorded:.4f} "
                                    f"(tolerance {REBUILD_TOLERANCE}); nothing exported")
    except BaseException:
        for path in written:  # all or nothing: no half-exported folder
            path.unlink(missing_ok=True)
        raise
    manifest_path = out / "manifest.json"
    latency_model = measure_local(model, task)
    latency_teacher = measure_local(task.teacher, task)
    manifest = {
        "job": front["job"],
        "metric": metric,
        "trial": candidate["trial"],
        "run_id": candidate["run_id"],
        "selection": rule,
        "plan": candidate["plan"],
        "plan_text": candidate["describe"],
        "metrics": candidate["metrics"],
        "provenance": candidate["provenance"],
        f"validation_{metric}_rebuilt": rebuilt_val,
        f"test_{metric}_recorded": recorded,
        f"test_{metric}_teacher": front["teacher"].get(f"{metric}_test"),
        "latency_at_export_measured_ms": {
            "note": "onnxruntime on this machine's CPU, measured back to back at export time",
            "model": latency_model,
            "teacher": latency_teacher,
        },
        "input": {"name": task.preprocessing.input_name, "shape": list(task.preprocessing.input_shape),
                  "dtype": task.preprocessing.input_dtype, "batch_dimension": "dynamic"},
        "preprocessing": task.preprocessing.to_dict(),
        "teacher_sha256": task.teacher_sha256,
        "versions": _versions(),
        "formats": list(formats),
        f"test_{metric}_by_format": scores,
        "packed_bytes": packed_size(model),
        "files": {p.name: _sha256(p) for p in written},
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, manifest_path)
    return manifest
