"""Deployable artifacts from a recorded plan: ONNX, TorchScript and a verified manifest.

The exported model is rebuilt from the plan recorded in the job and the teacher,
not copied from a worker, so what ships is reproducible from the job's records;
the exported file's test score, run in onnxruntime, must match the record.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

from slimsearch._io import atomic_write
from slimsearch._package import callable_package
from slimsearch.exceptions import ConfigError, JobStateError
from slimsearch.jobs.early_stop import STEPS_METRIC, STOPPED_METRIC
from slimsearch.metric_names import TaskFamily
from slimsearch.search._types import CONSTRAINT_OPS, Constraint

ACCURACY_WINDOW = 0.01  # default choice: within 1 point of the teacher
# The default choice's window, as the gap to the teacher (TaskFamily.gap) of each family: 1 point of
# accuracy; 5% more perplexity.
CLOSE_TO_TEACHER = {TaskFamily.CLASSIFICATION: ACCURACY_WINDOW, TaskFamily.CAUSAL_LM: 0.05}
REBUILD_TOLERANCE = 0.005  # the exported file may differ from the recorded test score by at most 0.5 points


def _family(front: dict) -> TaskFamily:
    """The family of the job's task (front.json of jobs from before families: classification)."""
    return TaskFamily(front.get("family", TaskFamily.CLASSIFICATION.value))


def _read_job(job_dir: Path) -> tuple[dict, dict]:
    from slimsearch.jobs.folder import FRONT_FILE, STATE_FILE

    state_path, front_path = job_dir / STATE_FILE, job_dir / FRONT_FILE
    if not state_path.exists() or not front_path.exists():
        raise JobStateError(f"{job_dir}: not a finished job folder (needs {STATE_FILE} and {FRONT_FILE}); "
                            "run `slimsearch run` first")
    return json.loads(state_path.read_text()), json.loads(front_path.read_text())


def latency_objective(objectives: dict, metrics: dict) -> str:
    """The latency the default choice minimises: the first latency objective, else the measured
    latency at the task's larger batch (``latency_ms_b<N>@local`` among ``metrics``; a task timed at
    batch 1 only, a causal LM: ``latency_ms@local``)."""
    for name in objectives:
        if name.startswith("latency_ms"):
            return name
    return next((name for name in metrics if name.startswith("latency_ms_b") and name.endswith("@local")),
                "latency_ms@local")


def choose(front: dict, run_id: Optional[str] = None) -> tuple[dict, str]:
    """The candidate to export and the rule that chose it.

    With ``run_id``: that candidate. Otherwise the fastest front member whose
    validation metric is close to the teacher's (within 1 point of accuracy, or 5% of
    perplexity: :data:`CLOSE_TO_TEACHER`); if none is, the front member with the best metric.
    """
    metric = front["metric"]
    family = _family(front)
    if run_id:
        for c in front["candidates"]:
            if c["run_id"] == run_id:
                if c["metrics"].get(STOPPED_METRIC):
                    raise ConfigError(f"--run {run_id}: candidate {c['trial']} was stopped early (fine-tuned "
                                      f"{c['metrics'].get(STEPS_METRIC, 0):g} of {c['plan']['distill']['steps']} "
                                      "steps: it could not reach the front); allowed: a candidate fine-tuned to the "
                                      f"end, e.g. the front members {[f['run_id'] for f in front['front']]}")
                return c, f"--run {run_id}"
        known = [c["run_id"] for c in front["front"]]
        raise ConfigError(f"--run: no candidate of this job has run id {run_id!r}; front members: {known}")
    if not front["front"]:
        raise JobStateError("the job has no completed candidate to export")
    speed = latency_objective(front["objectives"], front["front"][0]["metrics"])
    window, gap = CLOSE_TO_TEACHER[family], family.gap_name(metric)
    close = [c for c in front["front"] if family.gap(c["metrics"][metric], front["teacher"][metric]) <= window]
    if close:
        best = min(close, key=lambda c: c["metrics"][speed])
        return best, f"fastest ({speed}) front member with {gap} <= {window:g}"
    pick = max if family.direction == "max" else min
    best = pick(front["front"], key=lambda c: c["metrics"][metric])
    return best, f"no front member with {gap} <= {window:g}; the front member with the best {metric}"


def parse_where(text: str, known: Sequence[str]) -> list[Constraint]:
    """``"accuracy>=0.97, size_bytes<20000"`` as constraints (the job file's grammar): comma-separated
    ``metric OP number``, with metric one of ``known``."""
    conditions = []
    for part in text.split(","):
        try:
            condition = Constraint.parse(part)
        except ConfigError:
            raise ConfigError(f"--where {text!r}: {part.strip()!r} is not 'metric OP number' "
                              f"(OP one of {list(CONSTRAINT_OPS)}; conditions separated by commas)") from None
        if condition.metric not in known:
            raise ConfigError(f"--where {text!r}: no metric {condition.metric!r}; the candidates have {sorted(known)}")
        conditions.append(condition)
    return conditions


def alias_for(metric: str) -> str:
    """The Model Registry alias of the model chosen by minimising ``metric``: ``best-<profile>`` for a
    per-device metric (``latency_ms@raspberry-pi-4`` -> ``best-raspberry-pi-4``), else ``best-<metric>``."""
    tail = metric.split("@", 1)[1] if "@" in metric else metric
    return "best-" + re.sub(r"[^A-Za-z0-9_-]+", "-", tail).strip("-").lower()


def select(front: dict, *, where: Optional[str] = None, minimize: Optional[str] = None) -> tuple[dict, str, str]:
    """The candidate meeting every ``where`` condition with the lowest ``minimize`` (default: the
    job's speed metric), the rule in words and the metric minimised. Refuses a ``where`` that no
    candidate meets, naming the closest candidate."""
    candidates = front["candidates"]
    if not candidates:
        raise JobStateError("the job has no completed candidate to export")
    known = sorted({k for c in candidates for k in c["metrics"]})
    target = minimize or latency_objective(front["objectives"], candidates[0]["metrics"])
    if target not in known:
        raise ConfigError(f"--minimize: no metric {target!r}; the candidates have {known}")
    conditions = parse_where(where, known) if where else []
    meeting = [c for c in candidates if all(k.holds(c["metrics"]) for k in conditions)
               and c["metrics"].get(target) is not None]
    if not meeting:
        closest = min(candidates, key=lambda c: sum(k.shortfall(c["metrics"]) for k in conditions))
        shown = ", ".join(f"{k.metric}={closest['metrics'].get(k.metric, float('nan')):.4g}" for k in conditions)
        raise ConfigError(f"--where {where!r}: no candidate meets it; closest: trial {closest['trial']} "
                          f"(run {closest['run_id']}) with {shown}")
    best = min(meeting, key=lambda c: (c["metrics"][target], c["trial"]))
    rule = f"lowest {target}" + (f" where {', '.join(map(str, conditions))}" if conditions else "")
    return best, rule, target


def safe_out(out: Path, names: Sequence[str]) -> Path:
    """The resolved export folder, refusing an ``out`` that climbs with ``..`` and any file to be
    written there that resolves (through a symlink) outside it."""
    given = Path(out).expanduser()
    if ".." in given.parts:
        raise ConfigError(f"--out {str(out)!r}: '..' is not allowed in the export folder; name the folder itself")
    folder = given.resolve()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {str(out)!r}: is a file, not a folder")
    for name in names:
        target = (folder / name).resolve()
        if target.parent != folder:
            raise ConfigError(f"--out {str(out)!r}: {name} there resolves to {target}, outside the export folder "
                              "(a symlink?); remove it or choose another --out")
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(path: Path, root: Path) -> dict[str, str]:
    """SHA-256 of ``path``, or of every file in folder ``path``, by name relative to ``root``."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(root)): _sha256(p) for p in files}


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
    from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes
    from slimsearch.deploy.packed_file import load_packed, save_packed
    from slimsearch.deploy.onnx_graph import ort_predict, ort_session

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
               formats: Optional[tuple[str, ...]] = None, where: Optional[str] = None,
               minimize: Optional[str] = None, register: bool = True) -> dict:
    """Rebuild a front member, verify each file written, and write them with ``manifest.json``.

    The candidate is ``run_id``, else the one meeting ``where`` with the lowest
    ``minimize`` (when either is given), else the default choice of :func:`choose`.
    ``formats`` default to ONNX and TorchScript files, for a causal LM to a GenAI folder and a
    Hugging Face folder (:mod:`slimsearch.export_llm`). Every file is loaded back and scored on
    the test split; export refuses (and removes what it wrote) when a score differs from the
    record by more than ``REBUILD_TOLERANCE`` (a perplexity: ``LM_TOLERANCE`` of it). With
    ``register`` and an ONNX file, the model is registered in the job's MLflow Model Registry
    under an alias (``manifest["registry"]``).
    """
    from slimsearch.export_llm import LLM_FILE_NAMES, LLM_FORMATS

    job_dir = Path(job_dir).resolve()
    state, front = _read_job(job_dir)
    causal = _family(front) is TaskFamily.CAUSAL_LM
    allowed, names = (LLM_FORMATS, LLM_FILE_NAMES) if causal else (FORMATS, FILE_NAMES)
    formats = formats if formats is not None else (LLM_FORMATS if causal else ("onnx", "torchscript"))
    bad = [f for f in formats if f not in allowed]
    if bad or not formats:
        kind = "a causal-LM job's" if causal else "a format"
        raise ConfigError(f"--format: {bad[0] if bad else 'nothing'!r} is not {kind}; allowed: {list(allowed)}")
    if run_id and (where or minimize):
        raise ConfigError("--run names the candidate itself; it cannot be combined with --where or --minimize")
    out = safe_out(out, [names[f] for f in formats] + ["manifest.json"])
    from slimsearch.evaluators import score
    from slimsearch.jobs.spec import JobSpec
    from slimsearch.spaces import CompressionPlan
    from slimsearch.tasks import load_task

    target = None
    if where or minimize:
        candidate, rule, target = select(front, where=where, minimize=minimize)
    else:
        candidate, rule = choose(front, run_id)
        if not run_id:
            target = latency_objective(front["objectives"], candidate["metrics"])
    spec = JobSpec.from_json(json.dumps(state["spec"]))
    task = load_task(spec.task, seed=spec.search.seed, path=spec.task_path, text=spec.task_text)
    if state.get("teacher_sha256") and task.teacher_sha256 != state["teacher_sha256"]:
        raise JobStateError(f"{job_dir}: the teacher of task {spec.task!r} changed since the search "
                            f"(sha256 {task.teacher_sha256[:12]} != {state['teacher_sha256'][:12]}); "
                            "results would not match the record")
    plan = CompressionPlan.from_dict(candidate["plan"])
    threads = _worker_threads(state, candidate["trial"])
    model = _rebuild(task, plan, threads)
    metric = front["metric"]
    rebuilt_val = score(model, task.val, task)
    out.mkdir(parents=True, exist_ok=True)
    recorded = candidate["metrics"].get(f"{metric}_test")
    written: list[Path] = []
    scores: dict[str, float] = {}
    extra: dict = {}
    try:
        if causal:
            from slimsearch.export_llm import check_llm_score, codes_sha256, write_llm_format
            from slimsearch.tasks._registry import causal_lm_source
            from slimsearch.tasks.causal_lm import load_tokenizer

            tokenizer = load_tokenizer(causal_lm_source(spec.task))
            extra = {"codes_sha256": codes_sha256(model), "packed_bytes": candidate["metrics"].get("size_bytes")}
        for fmt in formats:
            if causal:
                path, test_score = write_llm_format(fmt, model, task, tokenizer, out)
                written.append(path)
                check_llm_score(fmt, candidate["trial"], test_score, recorded)
            else:
                path, test_score = _write_format(fmt, model, task, out)
                written.append(path)
                if recorded is not None and abs(test_score - recorded) > REBUILD_TOLERANCE:
                    raise JobStateError(f"the exported {fmt} file of trial {candidate['trial']} scores test "
                                        f"{metric}={test_score:.4f}, the record says {recorded:.4f} "
                                        f"(tolerance {REBUILD_TOLERANCE}); nothing exported")
            scores[fmt] = test_score
        if not causal:
            from slimsearch.deploy.pack import packed_size

            extra = {"packed_bytes": packed_size(model)}
    except BaseException:
        for path in written:  # all or nothing: no half-exported folder
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
    manifest_path = out / "manifest.json"
    latency = export_latency(model, task, state["teacher"], candidate["metrics"], threads,
                             kinds=state.get("reference_kinds", {}))
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
        "rebuilt_with_threads": threads,
        f"test_{metric}_recorded": recorded,
        f"test_{metric}_teacher": front["teacher"].get(f"{metric}_test"),
        "latency_at_export_measured_ms": latency,
        "input": {"name": task.preprocessing.input_name, "shape": list(task.preprocessing.input_shape),
                  "dtype": task.preprocessing.input_dtype, "batch_dimension": "dynamic"},
        "preprocessing": task.preprocessing.to_dict(),
        "teacher_sha256": task.teacher_sha256,
        "versions": _versions(),
        "formats": list(formats),
        f"test_{metric}_by_format": scores,
        **extra,
        "files": {name: digest for p in written for name, digest in _digests(p, out).items()},
    }
    if register and "onnx" in formats and candidate.get("run_id"):
        alias = alias_for(target) if target else f"run-{candidate['run_id'][:8]}"
        manifest["registry"] = register_onnx(state["tracking_uri"], front["job"], out / FILE_NAMES["onnx"],
                                             candidate["run_id"], alias)
    atomic_write(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
    _record_export(job_dir, out, manifest)
    return manifest


def export_latency(model, task, teacher: dict, recorded: dict, threads: Optional[int],
                   kinds: Optional[dict] = None) -> dict:
    """The exported model's local latencies, measured as the search measured them: timed in
    alternating rounds with the teacher deployed as the model's kind of graph, with the worker's
    thread count, and scaled to that reference's latencies recorded at the job's start (``teacher``,
    and the other kinds' ``kinds``: the job state's ``reference_kinds``), so that they compare with the
    search's figures ``recorded`` (``search_over_export`` gives the ratios). The teacher's
    latencies now, unpaired, are recorded beside them."""
    from slimsearch._threads import torch_threads
    from slimsearch.evaluators.candidate import local_reference, measure_local
    from slimsearch.evaluators.graph_kinds import graph_kind
    from slimsearch.metric_names import local_latency_metrics

    quiet = {name: teacher.get(name) for name in local_latency_metrics(task.latency_batch)}
    causal = task.family is TaskFamily.CAUSAL_LM
    with torch_threads(threads):  # onnxruntime sessions take torch's thread count, as in the worker
        reference = None if causal else local_reference(task, {**quiet, **(kinds or {})})
        model_ms = measure_local(model, task, reference=reference)
        teacher_ms = measure_local(task.teacher, task)
    note = ("the deployed graph's decode on this machine's CPU at export time (onnxruntime-genai, a fresh process, "
            "unpaired), as the search measured its candidates" if causal else
            "onnxruntime on this machine's CPU at export time, timed in alternating rounds with the "
            f"teacher deployed as the model's kind of graph ({graph_kind(model)}; median of per-round ratios) "
            "times that reference's latency recorded at the job's start, as the search measured its candidates; "
            "raw: latency_ms_raw*@local")
    return {"note": note,
            "model": model_ms, "teacher": teacher_ms, "teacher_at_job_start": quiet,
            "search_over_export": {name: recorded[name] / model_ms[name] for name in quiet
                                   if recorded.get(name) and model_ms.get(name)}}


def _worker_threads(state: dict, trial: int) -> Optional[int]:
    """torch's thread count in the worker that trained ``trial`` (job.json's ``threads``); None if
    the job predates that record."""
    starts = [(first, n) for first, n in state.get("threads", []) if first <= trial]
    return max(starts)[1] if starts else None


def _rebuild(task, plan, threads: Optional[int]):
    """``apply_plan`` with torch's thread count set as the worker's: with another count, training
    sums floats in another order and the rebuilt model drifts (0.4 points of MNIST test accuracy
    seen with 2 threads instead of the worker's 1)."""
    from slimsearch._threads import torch_threads
    from slimsearch.compress import apply_plan

    with torch_threads(threads):
        return apply_plan(task, plan)


def model_name(job: str) -> str:
    """The Model Registry name of a job's exported models."""
    return "slimsearch-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", job)


def register_onnx(tracking_uri: str, job: str, onnx_path: Path, run_id: str, alias: str) -> dict:
    """Log ``onnx_path`` as an MLflow model (ONNX flavour) under the candidate's run, register it as a new
    version of :func:`model_name` and point ``alias`` at it; ``models:/<name>@<alias>`` then loads it."""
    import logging

    import mlflow

    from slimsearch.storage.tracking import global_tracking_uri, log_onnx_model

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    name = model_name(job)
    info = log_onnx_model(tracking_uri, run_id, onnx_path)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="slimsearch exports of job " + job)
    with global_tracking_uri(tracking_uri):
        version = str(client.create_model_version(name, info.model_uri, run_id=run_id, model_id=info.model_id,
                                                  tags={"slimsearch.alias": alias}).version)
    client.set_registered_model_alias(name, alias, version)
    from slimsearch.storage import redact

    return {"tracking_uri": redact(tracking_uri), "name": name, "version": version, "alias": alias,
            "uri": f"models:/{name}@{alias}"}


def _record_export(job_dir: Path, out: Path, manifest: dict) -> None:
    from slimsearch.storage.registry import Registry, safely

    registry = Registry()
    reg = manifest.get("registry") or {}

    def record():
        job = registry.find_by_out(job_dir)
        if job is not None:
            registry.record_export(job.id, out=out, formats=manifest["formats"], run_id=manifest["run_id"],
                                   trial=manifest["trial"], model_name=reg.get("name"),
                                   model_version=reg.get("version"), alias=reg.get("alias"))

    safely(record)


def export(job: str | Path, out: str | Path, *, run_id: Optional[str] = None, where: Optional[str] = None,
           minimize: Optional[str] = None, formats: Optional[tuple[str, ...]] = None,
           register: bool = True) -> dict:
    """Export a candidate of ``job`` (a registry id, a job name or a job folder) into folder ``out``
    (as ``slimsearch export``); returns the manifest. This module called is this function:
    ``slimsearch.export(job, out, ...)``."""
    from slimsearch.jobs.query import resolve_job

    return export_job(resolve_job(job).folder, Path(out), run_id=run_id, formats=formats, where=where,
                      minimize=minimize, register=register)


callable_package(__name__, export)
