"""Running a job: task, space, study, Ray trials, MLflow runs, front and plot.

This is the glue between the values of DESIGN.md's one-way flow; each step is a
call into the module that owns it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from slimsearch.exceptions import ConfigError, JobStateError
from slimsearch.job import BASE_METRICS, LOCAL_ENERGY_METRIC, PROFILE_METRICS, JobSpec, local_latency_metrics
from slimsearch.search._limits import memory_limit
from slimsearch.jobs.early_stop import CONSTRAINT as STOP_CONSTRAINT
from slimsearch.jobs.early_stop import STOPPED_METRIC

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


@dataclass(frozen=True)
class JobResult:
    out: Path
    front: list[dict]
    candidates: list[dict]
    teacher: dict
    objectives: dict[str, str]
    teacher_provenance: dict[str, str]  # cost metric -> "measured" or "modelled", as a candidate's "provenance"
    # why this run stopped short of the budget ("stopped after 0 of 2 candidates: ..."); "" when it did not
    stopped: str = ""


def layer_names(model) -> list[str]:
    """Names of the Conv2d/Linear layers of ``model``: the layers a plan sets bits for."""
    from torch import nn

    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def build_space(spec: JobSpec, task):
    from slimsearch.structures.channels import ChannelStructure
    from slimsearch.spaces import SearchSpace

    if task.hidden_states is None and any(w > 0 for w in spec.space.distill_hidden_weight):
        raise ConfigError(f"space.distill_hidden_weight: task {spec.task!r} exposes no hidden states to match; "
                          "allowed: [0]")
    structure = task.structure or ChannelStructure()
    return SearchSpace.build(spec.space, layer_names(task.teacher), structure.groups(task.teacher, task.example_input),
                             droppable=structure.droppable(task.teacher), seed=spec.search.seed,
                             power_modes=spec.power_mode_choices())


@functools.lru_cache(maxsize=2)
def _cached_task(name: str, seed: int, path: Optional[str] = None):
    # Per-process cache: a reused Ray worker loads the task (and its data) once, not per trial.
    from slimsearch.tasks import load_task

    return load_task(name, seed=seed, path=path)


def evaluate_params(params: dict, *, job_json: str, space, teacher_score: float,
                    out: Optional[str] = None, devices=None):
    """Worker side: params -> plan -> compressed model -> Metrics (values and their provenance).

    With the job folder ``out``, the model's ONNX graph is left at :func:`model_file`;
    ``devices`` (profile -> meter on a device node) is passed to ``evaluate``.
    """
    from slimsearch.evaluators import evaluate

    spec = JobSpec.from_json(job_json)
    task = _cached_task(spec.task, spec.search.seed, spec.task_path)
    plan = space.plan_from_params(params)
    onnx_out = None
    if out is not None and os.path.isdir(Path(out) / MODELS_DIR):
        onnx_out = str(model_file(Path(out), plan))
    stopper = None
    if spec.search.early_stopping and out is not None:
        from slimsearch.jobs.early_stop import EarlyStop

        stopper = EarlyStop(Path(out), task, plan, spec.profile_refs)
    with memory_limit(spec.search.memory_limit_mb):  # after the task loads: its data and teacher are not counted
        metrics = evaluate(task, plan, spec.profile_refs, teacher_score=teacher_score, onnx_out=onnx_out,
                           devices=devices, on_chunk=stopper, chunk_every=None if stopper is None else stopper.every)
    if stopper is None:
        return metrics
    from slimsearch.evaluators.metrics import Metrics

    return Metrics(values={**metrics.values, **stopper.finish()}, provenance=metrics.provenance)


def estimate_params(params: dict, *, task, space, profiles) -> dict[str, Optional[float]]:
    """Driver side, before training: the plan's exact size and modelled device costs (see
    :func:`slimsearch.evaluators.estimate.estimate`), for screening and the ``auto`` sampler."""
    from slimsearch.evaluators.estimate import estimate

    return dict(estimate(task, space.plan_from_params(params), profiles).values)


def _write_json(path: Path, data: Any) -> None:
    from slimsearch.storage.urls import redact

    text = json.dumps(data, indent=2, sort_keys=True)
    # With a database password in it (job.json keeps the URLs it reopens): readable by its owner only.
    mode = 0o600 if redact(text) != text else 0o666
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _job_state(spec: JobSpec, out: Path, resume: bool) -> dict:
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


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there ({exc.strerror})") from None


def run_job(spec: JobSpec, out: Path, *, resume: bool = False, executor: str = "ray",
            progress: bool = True, log=print, source: str = "<job>", devices=None,
            ray_in_background: bool = False) -> JobResult:
    """Run (or resume) a job into folder ``out`` and return its front.

    ``source`` names the job file in error messages. ``devices`` maps a profile name to a
    meter on a Ray node that is that device (:func:`slimsearch.cluster.device_meters`, with
    Ray already joined to the cluster): the teacher's and every candidate's
    ``latency_ms@<profile>`` are then measured there, and labelled so.
    ``ray_in_background``: start Ray in a thread while the job sets itself up (the
    ``slimsearch`` command, one job per process); off, Ray starts in the calling thread
    when the search begins (a process that runs several jobs: Ray restarted from threads
    in one process is not safe, ray-project/ray#31145).
    """
    from slimsearch.evaluators import model_metrics, score
    from slimsearch.evaluators.metrics import absent_reasons, provenance_map
    from slimsearch.hardware_profiles._energy import EnergyDomain, energy_meter
    from slimsearch.ray_runtime import RayStart
    from slimsearch.search._study import open_study, recover_interrupted, records
    from slimsearch.search._types import Constraint
    from slimsearch.search.driver import default_threads, failure_cap, run_trials
    from slimsearch.search.samplers import make_sampler, seeded_at_first_trial
    from slimsearch.storage import default_storage_url, default_tracking_uri, redact
    from slimsearch.storage.urls import claim_folder, claim_sqlite
    from slimsearch.storage.tracking import Tracker, mlflow_key

    out = Path(out).resolve()
    objectives = {k: v.value for k, v in spec.objectives.items()}
    cores = os.cpu_count() or 1
    workers = spec.search.workers
    threads = spec.search.threads_per_worker or default_threads(workers)

    import torch

    torch.set_num_threads(threads)
    state = _job_state(spec, out, resume)
    log(f"[slimsearch] task {spec.task}: loading data and teacher (trained once, then cached)")
    try:  # what the job file names must fit the task; say so before anything is written
        task = _cached_task(spec.task, spec.search.seed, spec.task_path)
        reported = {task.metric_name, f"{task.metric_name}_drop", *task.extra_metrics}
        costs = {*BASE_METRICS, *local_latency_metrics(task.latency_batch)}
        costs |= {f"{m}@{p}" for p in spec.profile_names for m in PROFILE_METRICS}
        meter = energy_meter(EnergyDomain.CPU)
        if meter is not None:
            costs.add(LOCAL_ENERGY_METRIC)
        elif LOCAL_ENERGY_METRIC in objectives:
            raise ConfigError(f"objectives: {LOCAL_ENERGY_METRIC!r} is measured only where the machine exposes "
                              "readable energy counters (Linux powercap/RAPL), and this one exposes none; "
                              f"modelled energy is energy_mj@<profile> for {spec.profile_names}")
        unknown = sorted(set(objectives) - reported - costs)
        if unknown:
            raise ConfigError(f"objectives: task {spec.task} does not report {unknown[0]!r}; "
                              f"it reports {sorted(reported)}")
        space = build_space(spec, task)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if not resume:
        _make_folder(out)
    if state.get("teacher_sha256") and state["teacher_sha256"] != task.teacher_sha256:  # "" = not recorded
        raise JobStateError(f"{out}: the teacher of task {spec.task!r} changed since the job started; "
                            "its results would not be comparable: start a new job")
    teacher = state.get("teacher")  # a resumed job keeps the teacher figures it started with
    if teacher is None:
        measured = model_metrics(task.teacher, task, spec.profile_refs, power_modes=spec.teacher_power_modes(),
                                 devices=devices)
        teacher, state["teacher_provenance"] = dict(measured.values), provenance_map(measured.values,
                                                                                      measured.provenance)
        teacher[f"{task.metric_name}_test"] = score(task.teacher, task.test, task)
    teacher_score = teacher[task.metric_name]

    # Ray starts in the background while the study and the MLflow run are set up (a resumed job
    # starts it only once it knows candidates remain). Not before the teacher is measured:
    # Ray's start-up processes would share the CPU with its latency timing.
    early = ray_in_background and executor == "ray" and not resume
    ray_start = RayStart(workers * threads, background=True) if early else None
    locks: list = []
    try:
        storage_url = spec.storage or default_storage_url(out)
        tracking_uri = spec.tracking_uri or default_tracking_uri(out)
        # A candidate stopped early was not fine-tuned to the end: a constraint keeps it off the front.
        constraint_texts = [*spec.constraints, *([STOP_CONSTRAINT] if spec.search.early_stopping else [])]
        constraints = [Constraint.parse(c) for c in constraint_texts]
        estimate_fn = functools.partial(estimate_params, task=task, space=space, profiles=spec.profile_refs)
        sampler_args = {"budget": spec.search.budget, "estimate": estimate_fn, "constraints": constraint_texts,
                        "space": dict(space.choices)}
        locks.append(claim_sqlite(storage_url, f"{source}: storage" if spec.storage else f"--out {out}"))
        locks.append(claim_folder(out))
        # Seeded at this driver's first trial: a resumed driver, or one sharing the study with
        # others, does not propose the plans already asked again.
        study = open_study(storage_url, spec.name, objectives, seeded_at_first_trial(
            lambda seed: make_sampler(spec.search.sampler.value, seed=seed, **sampler_args), spec.search.seed))
        if resume:
            requeued = recover_interrupted(study, owner=str(out))
            if requeued:
                log(f"[slimsearch] {requeued} trial(s) interrupted by the last stop will run again")
        done = sum(1 for r in records(study) if r.state.value == "complete")
        remaining = max(0, spec.search.budget - done)

        tracker = Tracker(tracking_uri, spec.name, artifact_root=out / "mlartifacts")
        params = {"job": redact(spec.to_json()), "task": spec.task, "budget": spec.search.budget, "sampler": spec.search.sampler.value,
                  "workers": workers, "storage": redact(storage_url),
                  "local_energy_meter": meter.source if meter is not None else
                  "none (no readable RAPL counters: energy_mj@local not recorded)",
                  "measured_on_device_nodes": ", ".join(sorted(devices or {})) or "none"}
        parent = tracker.start_parent(spec.name, params, parent_id=state.get("parent_run_id"))
        default_modes = _power_modes_used(spec, {})
        if not resume:
            teacher_tags = {f"teacher.{k}": v for k, v in _power_modes_used(spec, spec.teacher_power_modes()).items()}
            teacher_tags.update({f"absent.teacher.{mlflow_key(k)}": why for k, why in absent_reasons(teacher).items()})
            teacher_tags.update({f"teacher.provenance.{mlflow_key(k)}": v
                                 for k, v in provenance_map(teacher, state.get("teacher_provenance")).items()})
            tracker.log_parent_metrics({f"teacher.{k}": v for k, v in teacher.items()}, tags=teacher_tags)
        state = {"spec": json.loads(spec.to_json()), "parent_run_id": parent, "study_name": spec.name,
                 "storage": storage_url, "tracking_uri": tracking_uri, "teacher": teacher,
                 # torch's thread count changes float rounding in training: export rebuilds a trial with
                 # the count its worker had (an entry per start: [first trial number it ran, threads])
                 "threads": [*state.get("threads", []), [len(study.trials), threads]],
                 "teacher_sha256": task.teacher_sha256, "created": state.get("created", time.time()),
                 "teacher_provenance": provenance_map(teacher, state.get("teacher_provenance"))}
        _write_json(out / STATE_FILE, state)
        job_id = _register(spec, out, state, tracker, log)
    except BaseException:
        if ray_start is not None:
            ray_start.stop()
        _release(locks)
        raise

    log(f"[slimsearch] {done} of {spec.search.budget} candidates done; running {remaining} "
        f"on {workers} worker(s) x {threads} thread(s)")
    if meter is not None and workers > 1:
        log(f"[slimsearch] {LOCAL_ENERGY_METRIC} counts the whole CPU package ({meter.source}); with {workers} "
            "workers it includes the other trials running meanwhile")
    bar = _progress(spec.search.budget, done, progress)
    complete = [r for r in records(study) if r.state.value == "complete"]

    candidate_log = _CandidateLog(tracker, space, default_modes, log)
    stops = None
    if spec.search.early_stopping:
        from slimsearch.jobs.early_stop import FrontSnapshot

        stops = FrontSnapshot(out, space.plan_from_params, metric=task.metric_name, teacher=teacher_score,
                              objectives=objectives, constraints=spec.constraints,
                              margin=spec.search.early_stopping_margin, complete=complete,
                              front=[r for r in complete if r.number in _front_numbers(complete, objectives)])

    def on_trial(record) -> None:
        plan = space.plan_from_params(record.params)
        logged = candidate_log(record)
        if record.state.value == "complete":
            complete.append(record)
            if logged:
                _log_hypervolume(tracker, complete, objectives, teacher, log)
        front = _front_numbers(complete, objectives)
        if stops is not None and record.state.value == "complete":
            stopped = stops.add(record, [r for r in complete if r.number in front])
            if stopped:
                log(f"[slimsearch] candidate {record.number} {stopped}")
        if record.number not in front:  # dominated (or failed) now means dominated for good
            model_file(out, plan).unlink(missing_ok=True)
        for r in complete:
            if r.number not in front:
                model_file(out, space.plan_from_params(r.params)).unlink(missing_ok=True)
        if bar is not None:
            bar.set_postfix_str(f"front {len(front)}, last {record.state.value}")
            bar.update(1 if record.state.value == "complete" else 0)

    (out / MODELS_DIR).mkdir(exist_ok=True)
    job_fn = functools.partial(evaluate_params, job_json=redact(spec.to_json()), space=space, teacher_score=teacher_score,
                               out=str(out), devices=devices or None)
    status, stopped = "FAILED", ""
    try:
        if remaining and executor == "ray":
            ray_start = ray_start or RayStart(workers * threads, background=ray_in_background)
            if ray_start.ready() and workers * threads > cores:  # started here, on this machine's cores
                log(f"[slimsearch] {workers} worker(s) x {threads} threads on {cores} cores: candidates share "
                    "cores, so each runs slower and its measured latencies vary more")
        ran = run_trials(study, dict(space.choices), job_fn, objectives, n_trials=remaining, executor=executor,
                         workers=workers, threads_per_worker=threads, listener=on_trial,
                         ray_storage=str(out / "ray"), constraints=constraints,
                         estimate=estimate_fn if _estimate_can_screen(constraints, objectives, costs) else None,
                         screen_duplicates=True, study_budget=spec.search.budget, owner=str(out),
                         max_retries=spec.search.max_retries, time_limit_s=spec.search.time_limit_s)
        evaluated = sum(1 for r in ran if r.state.value == "complete")
        failed = sum(1 for r in ran if r.state.value == "failed")
        full = sum(1 for r in records(study) if r.state.value == "complete") >= spec.search.budget
        if evaluated < remaining and not full:  # full: other drivers sharing the study did the rest
            why = (f"{failed} candidates failed (see front.json's 'failed' or the runs' error tags)"
                   if failed >= failure_cap(remaining) else
                   "the sampler kept proposing plans already tried or estimated infeasible (the space may be too "
                   "small for the budget)")
            stopped = f"stopped after {evaluated} of {remaining} candidates: {why}"
            log(f"[slimsearch] {stopped}")
        status = "FINISHED"
    except BaseException as exc:
        if _stopped(exc):
            status = "KILLED"
        _register_end(job_id, exc, log)
        raise
    finally:
        if bar is not None:
            bar.close()
        if ray_start is not None:  # Ray's shutdown (~2 s) overlaps writing the results, which need no Ray
            ray_start.stop(wait=False)
        try:
            result = _finish(study, space, tracker, out, objectives, teacher, task.metric_name, state,
                             default_modes)
            tracker.finish(status)
            if status == "FINISHED":
                _register_end(job_id, None, log)
        except TrackingUnavailable as exc:
            if status != "FINISHED":  # an error is on its way out already: say this one, raise that one
                log(f"[slimsearch] {exc}")
            else:
                _register_end(job_id, exc, log)
                raise JobStateError(f"{exc}; every result is in the Optuna study ({redact(storage_url)}): when the "
                                    f"store is back, `slimsearch run {source} --out {out} --resume` logs them")
        finally:
            if ray_start is not None:
                ray_start.stop()
            _release(locks)  # last: while a driver holds them, the registry's "running" is true (JobStatus.LOST)
    return dataclasses.replace(result, stopped=stopped)


def _estimate_can_screen(constraints, objectives, costs) -> bool:
    """Whether the driver's screen can use the estimate: a constraint on a cost it estimates (all but the
    measured ``@local`` ones), or every objective such a cost. Otherwise the estimate would cost the
    driver about half a second per candidate (building the plan's model), between trials, for nothing;
    the ``auto`` sampler still calls it for itself."""
    estimable = {c for c in costs if not c.endswith("@local")}
    return any(c.metric in estimable for c in constraints) or all(m in estimable for m in objectives)


class TrackingUnavailable(Exception):
    """The MLflow store could not be written to when the job ended (internal: run_job says what to do)."""


def _short_error(exc: BaseException) -> str:
    """An MLflow or database error in one short line: the DB-API error when there is one."""
    text = " ".join(str(exc).split())
    found = re.search(r"\((?:\w+\.)*\w*(?:Error|Exception)\) [^\[(]*", text)
    return (found.group(0).strip() if found else text[:200]) or type(exc).__name__


def _log_record(tracker, space, default_modes: dict[str, str], record) -> str:
    """Log one trial as its MLflow child run; the run id."""
    from slimsearch.evaluators.metrics import provenance_map

    plan = space.plan_from_params(record.params)
    return tracker.log_candidate(record.number, record.params, record.values,
                                 provenance_map(record.values, record.provenance), plan.to_json(),
                                 failed=record.error, tags=candidate_tags(plan, record.values, default_modes, record))


class _CandidateLog:
    """Logs each finished trial as an MLflow child run as it comes.

    While the store cannot be written (server down, SQLite locked or read-only), a trial
    that could not be logged waits here (its results are in the Optuna study already) and
    is logged, oldest first, with the next trial once a write succeeds; :func:`_finish`
    logs whatever still waits when the job ends. Calling it returns True when the store
    took everything.
    """

    def __init__(self, tracker, space, default_modes: dict[str, str], log):
        self.tracker, self.space, self.default_modes, self.log = tracker, space, default_modes, log
        self.waiting: dict[int, Any] = {}
        self.down: Optional[str] = None

    def __call__(self, record) -> bool:
        self.waiting[record.number] = record
        for number in sorted(self.waiting):
            try:
                _log_record(self.tracker, self.space, self.default_modes, self.waiting[number])
            except Exception as exc:  # noqa: BLE001 - the study holds the trial; logging it can wait
                self.down = _short_error(exc)
                self.log(f"[slimsearch] MLflow store not writable ({self.down}); {len(self.waiting)} candidate(s) "
                         "wait to be logged (their results are in the Optuna study)")
                return False
            del self.waiting[number]
        if self.down is not None:
            self.log("[slimsearch] MLflow store writable again: the waiting candidates are logged")
            self.down = None
        return True


def _register(spec: JobSpec, out: Path, state: dict, tracker, log) -> Optional[int]:
    """Record the job as running in the job registry (storage/registry.py); None if it cannot be."""
    from slimsearch.storage import redact
    from slimsearch.storage.registry import Registry, safely

    return safely(lambda: Registry().record_start(
        name=spec.name, out=out, config_json=spec.to_json(), study_name=state["study_name"],
        storage=redact(state["storage"]), tracking_uri=redact(state["tracking_uri"]),
        experiment_id=tracker.client.get_run(state["parent_run_id"]).info.experiment_id,
        parent_run_id=state["parent_run_id"], budget=spec.search.budget), log)


def _release(locks: list) -> None:
    for lock in locks:
        if lock is not None:
            lock.close()


def _stopped(exc: BaseException) -> bool:
    """Stopped from outside (Ctrl-C; SIGTERM, a KeyboardInterrupt in the command): --resume goes on."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit))


def _register_end(job_id: Optional[int], exc: Optional[BaseException], log) -> None:
    """finished (``exc`` None), stopped (interrupted) or failed, in the job registry."""
    from slimsearch.storage.registry import JobStatus, Registry, safely

    if job_id is None:
        return
    status = JobStatus.FINISHED if exc is None else JobStatus.STOPPED if _stopped(exc) else JobStatus.FAILED
    safely(lambda: Registry().record_end(job_id, status, None if exc is None else f"{type(exc).__name__}: {exc}"),
           log)


def _log_hypervolume(tracker, complete, objectives, teacher, log) -> None:
    """The hypervolume of the candidates done so far as the parent run's ``hypervolume`` series
    (step = candidates done), in the report's teacher units."""
    from slimsearch.search.pareto import hypervolume_reference, hypervolume_series

    if len(objectives) < 2:
        return
    cands = [{"trial": r.number, "metrics": r.values, "feasible": r.feasible} for r in complete]
    try:
        series = hypervolume_series(cands, objectives, hypervolume_reference(objectives, teacher, cands))
        if series:
            tracker.log_parent_series("hypervolume", series[-1], step=len(cands))
    except Exception as exc:  # noqa: BLE001 - a missing chart point must not stop the search
        log(f"[slimsearch] hypervolume not logged ({type(exc).__name__}: {exc})")


def _front_numbers(complete, objectives) -> set[int]:
    """Trial numbers of the non-dominated candidates among the feasible ones (a candidate that breaks
    a job constraint never enters the front)."""
    from slimsearch.search._study import front_of

    return {r.number for r in front_of(complete, objectives)}


def _power_modes_used(spec: JobSpec, chosen) -> dict[str, str]:
    """``power_mode.<profile> -> mode`` for every profile of the job: ``chosen`` where it says, else the default."""
    from slimsearch.hardware_profiles import load_profile

    return {f"power_mode.{p.name}": chosen.get(p.name) or load_profile(p.ref).default_power_mode.name
            for p in spec.profiles}


def candidate_tags(plan, values, default_modes: dict[str, str], record=None) -> dict[str, str]:
    """MLflow tags of a candidate: the power mode each profile's figures are modelled at,
    ``absent.<metric>`` with the reason for every cost figure that has no value, and (given the
    trial ``record``) ``screened`` and ``stopped_early`` as ``true``/``false``."""
    from slimsearch.evaluators.metrics import absent_reasons
    from slimsearch.storage.tracking import mlflow_key

    tags = {**default_modes, **{f"power_mode.{p}": m for p, m in plan.power_modes.items()}}
    if record is not None:
        tags["screened"] = "true" if record.state.value == "screened" else "false"
        tags["stopped_early"] = "true" if (record.values or {}).get(STOPPED_METRIC) else "false"
    tags.update({f"absent.{mlflow_key(k)}": why for k, why in absent_reasons(values).items()})
    return tags


def _finish(study, space, tracker, out: Path, objectives, teacher, metric_name, state,
            default_modes: dict[str, str]) -> JobResult:
    """Reconcile MLflow with the study, mark the front, write front.json and the plot.

    The files in ``out`` are written even when the MLflow store cannot be; that is then
    raised as :class:`TrackingUnavailable` (the study holds every result, and the next
    ``--resume`` logs what MLflow lacks).
    """
    from slimsearch.dashboards.front import front_infos, write_front_html
    from slimsearch.evaluators.metrics import provenance_map
    from slimsearch.search._study import records
    from slimsearch.storage import redact

    all_records = records(study)
    complete = [r for r in all_records if r.state.value == "complete"]
    front = _front_numbers(complete, objectives)
    children: dict[int, str] = {}
    unreachable = None
    try:
        children = tracker.children()
        for r in all_records:  # told to the study but not logged: store down, or driver killed in between
            if r.number not in children:
                children[r.number] = _log_record(tracker, space, default_modes, r)
        tracker.set_pareto(children, front)
        for r in complete:
            if r.number in front and children.get(r.number):
                tracker.log_onnx_model(children[r.number], model_file(out, space.plan_from_params(r.params)))
    except Exception as exc:  # noqa: BLE001 - whatever the store says, the files below are still written
        unreachable = exc
    candidates = []
    for r in complete:
        plan = space.plan_from_params(r.params)
        provenance = provenance_map(r.values, r.provenance)
        candidates.append({"trial": r.number, "run_id": children.get(r.number), "params": r.params,
                           "plan": plan.to_dict(), "describe": plan.describe(), "metrics": r.values,
                           "provenance": provenance, "on_front": r.number in front, "feasible": r.feasible})
    front_list = sorted((c for c in candidates if c["on_front"]), key=lambda c: c["trial"])
    teacher_provenance = provenance_map(teacher, state.get("teacher_provenance"))
    data = {"job": state["spec"]["name"], "objectives": objectives, "metric": metric_name, "teacher": teacher,
            "teacher_provenance": teacher_provenance,
            "front": front_list, "candidates": candidates,
            "failed": [{"trial": r.number, "error": r.error} for r in all_records if r.state.value == "failed"]}
    _write_json(out / FRONT_FILE, data)
    artifacts = [out / FRONT_FILE]
    if len(objectives) >= 2 and candidates:
        provenance = {k: v for c in candidates for k, v in c["provenance"].items()}
        infos = front_infos(candidates, objectives, front=front, teacher=teacher, provenance=provenance)
        write_front_html(infos, out / FRONT_HTML)
        artifacts.append(out / FRONT_HTML)
    if candidates:
        from slimsearch.jobs.query import write_job_report

        artifacts.append(write_job_report(out))
    if unreachable is None:
        try:
            for path in artifacts:
                tracker.log_artifact(path)
        except Exception as exc:  # noqa: BLE001
            unreachable = exc
    if unreachable is not None:
        missing = sum(1 for r in all_records if r.number not in children)
        raise TrackingUnavailable(f"the MLflow store {redact(tracker.tracking_uri)} could not be written when the job "
                                  f"ended ({_short_error(unreachable)}): {missing} of {len(all_records)} candidate(s) "
                                  "are not logged there yet") from unreachable
    return JobResult(out=out, front=front_list, candidates=candidates, teacher=teacher, objectives=objectives,
                     teacher_provenance=teacher_provenance)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="candidates", unit="cand", file=sys.stderr, dynamic_ncols=True)
