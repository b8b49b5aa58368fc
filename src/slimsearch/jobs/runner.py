"""Running a job: task, space, study, Ray trials, MLflow runs, front and plot.

This is the glue between the values of DESIGN.md's one-way flow; each step is a
call into the module that owns it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slimsearch.exceptions import ConfigError, JobStateError
from slimsearch.jobs.spec import JobSpec
from slimsearch.metric_names import (BASE_METRICS, DECODER_METRICS, DECODER_PROFILE_METRICS, LOCAL_ENERGY_METRIC,
                                     PROFILE_METRICS, TaskFamily, local_latency_metrics)
from slimsearch.jobs.early_stop import CONSTRAINT as STOP_CONSTRAINT
from slimsearch.jobs.folder import FRONT_FILE, FRONT_HTML, MODELS_DIR, STATE_FILE, job_state, make_folder, write_json, model_file
from slimsearch.jobs.log import TrackingUnavailable, CandidateLog, front_numbers, log_calibration, log_hypervolume, log_record, power_modes_used, progress_bar, register_job, register_end, release_locks, short_error, was_stopped
from slimsearch.jobs.rung import RungFile
from slimsearch.jobs.worker import build_space, cached_task, estimate_params, evaluate_params, job_screen


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
    tracking_uri: Optional[str] = None  # the MLflow store the job logged to; None: SQLite in the job folder


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
    from slimsearch.evaluators.candidate import quiet_local_latencies
    from slimsearch.evaluators.graph_kinds import FLOAT, kinds_in
    from slimsearch.evaluators.metrics import absent_reasons, provenance_map
    from slimsearch.hardware_profiles._energy import EnergyDomain, energy_meter
    from slimsearch.ray_runtime import RayStart
    from slimsearch.search._study import open_study, recover_interrupted, records
    from slimsearch.search._types import Constraint
    from slimsearch.search import OnlineCalibration
    from slimsearch.search.driver import failure_cap, run_trials
    from slimsearch.search.samplers import make_sampler, seeded_at_first_trial
    from slimsearch.storage import default_storage_url, default_tracking_uri, redact
    from slimsearch.storage.locks import claim_folder, claim_sqlite
    from slimsearch.storage.tracking import Tracker, mlflow_key
    from slimsearch.tasks import task_on
    from slimsearch.jobs.resources import gpus_here, resolve_resources
    from slimsearch.jobs.warm_start import enqueue_front, job_planner

    out = Path(out).resolve()
    objectives = {k: v.value for k, v in spec.objectives.items()}
    cores = os.cpu_count() or 1
    gpus, local_gpus = gpus_here()  # a job that names a GPU this machine (or cluster) lacks stops here
    resources = resolve_resources(spec.search, cpus=cores, gpus=gpus, executor=executor, driver_gpus=local_gpus,
                                  source=source)
    workers, threads = resources.workers, resources.threads

    import torch

    torch.set_num_threads(threads)
    state = job_state(spec, out, resume)
    log(f"[slimsearch] task {spec.task}: loading data and teacher (trained once, then cached)")
    try:  # what the job file names must fit the task; say so before anything is written
        task = cached_task(spec.task, spec.search.seed, spec.task_path, spec.task_text)
        reported = {task.metric_name, task.family.gap_name(task.metric_name), *task.extra_metrics}
        costs = {*BASE_METRICS, *local_latency_metrics(task.latency_batch)}
        costs |= {f"{m}@{p}" for p in spec.profile_names for m in PROFILE_METRICS}
        if task.family is TaskFamily.CAUSAL_LM:
            costs |= {*DECODER_METRICS, *(f"{m}@{p}" for p in spec.profile_names for m in DECODER_PROFILE_METRICS)}
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
        make_folder(out)
    if state.get("teacher_sha256") and state["teacher_sha256"] != task.teacher_sha256:  # "" = not recorded
        raise JobStateError(f"{out}: the teacher of task {spec.task!r} changed since the job started; "
                            "its results would not be comparable: start a new job")
    teacher = state.get("teacher")  # a resumed job keeps the teacher figures it started with
    kinds = state.get("reference_kinds", {})  # and those of the teacher deployed as the other graph kinds
    if teacher is None:
        measured = model_metrics(task.teacher, task, spec.profile_refs, power_modes=spec.teacher_power_modes(),
                                 devices=devices, device=resources.device)
        teacher, state["teacher_provenance"] = dict(measured.values), provenance_map(measured.values,
                                                                                      measured.provenance)
        teacher.update(quiet_local_latencies(task))  # the reference paired figures scale to: as quiet as it gets
        kinds = quiet_local_latencies(task, [k for k in kinds_in(space.choices) if k != FLOAT])
        work = task_on(task, resources.device)  # the teacher is scored where the candidates are
        teacher[f"{task.metric_name}_test"] = score(work.teacher, work.test, work)
    teacher_score = teacher[task.metric_name]
    reference = local_reference_figures(task, teacher, kinds)

    # Ray starts in the background while the study and the MLflow run are set up (a resumed job
    # starts it only once it knows candidates remain). Not before the teacher is measured:
    # Ray's start-up processes would share the CPU with its latency timing.
    early = ray_in_background and executor == "ray" and not resume
    ray_start = RayStart(workers * threads, background=True) if early else None
    locks: list = []
    try:
        storage_url = spec.storage or default_storage_url(out)
        tracking_uri = spec.tracking_uri or default_tracking_uri(out)
        locks.append(claim_sqlite(storage_url, f"{source}: storage" if spec.storage else f"--out {out}"))
        locks.append(claim_folder(out))
        planned = job_planner(spec, task, space, out, teacher_score=teacher_score, log=log)
        # A candidate stopped early was not fine-tuned to the end: a constraint keeps it off the front.
        constraint_texts = [*spec.constraints, *([STOP_CONSTRAINT] if spec.search.early_stopping else [])]
        constraints = [Constraint.parse(c) for c in constraint_texts]
        estimate_fn = functools.partial(estimate_params, task=task, space=space, profiles=spec.profile_refs,
                                        predicted=None if planned is None else
                                        functools.partial(planned.estimate, metric=task.metric_name,
                                                          gap=task.family.gap_name(task.metric_name)))
        # where the screen or auto uses the estimate, it is corrected from the device figures measured
        # as candidates finish (device:<profile> nodes); exact sizes and modelled figures teach nothing
        can_screen = _estimate_can_screen(constraints, objectives, costs)
        calibration = (OnlineCalibration(estimate_fn, measured_only=True)
                       if can_screen or spec.search.sampler.value == "auto" else None)
        sampler_args = {"budget": spec.search.budget, "estimate": estimate_fn, "constraints": constraint_texts,
                        "space": dict(space.choices), "calibration": calibration}
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
        if planned is not None:
            enqueue_front(planned, spec, study, most=remaining, log=log)

        tracker = Tracker(tracking_uri, spec.name, artifact_root=out / "mlartifacts")
        params = {"job": redact(spec.to_json()), "task": spec.task, "budget": spec.search.budget, "sampler": spec.search.sampler.value,
                  "workers": workers, "storage": redact(storage_url),
                  "local_energy_meter": meter.source if meter is not None else
                  "none (no readable RAPL counters: energy_mj@local not recorded)",
                  "measured_on_device_nodes": ", ".join(sorted(devices or {})) or "none",
                  "device": resources.device, "gpus_per_worker": resources.gpus_per_worker,
                  "local_latency": describe_reference(reference)}
        if planned is not None:
            params["planner"] = planned.describe()
        screen = job_screen(spec, task)
        if screen is not None:
            params["promotion_rule"] = screen.rule()
        parent = tracker.start_parent(spec.name, params, parent_id=state.get("parent_run_id"))
        default_modes = power_modes_used(spec, {})
        if not resume:
            teacher_tags = {f"teacher.{k}": v for k, v in power_modes_used(spec, spec.teacher_power_modes()).items()}
            teacher_tags.update({f"absent.teacher.{mlflow_key(k)}": why for k, why in absent_reasons(teacher).items()})
            teacher_tags.update({f"teacher.provenance.{mlflow_key(k)}": v
                                 for k, v in provenance_map(teacher, state.get("teacher_provenance")).items()})
            tracker.log_parent_metrics({f"teacher.{k}": v for k, v in teacher.items()}, tags=teacher_tags)
        first = first_unrun(study)  # the first trial this start runs: its threads and device are recorded
        state = {"spec": json.loads(spec.to_json()), "parent_run_id": parent, "study_name": spec.name,
                 "storage": storage_url, "tracking_uri": tracking_uri, "teacher": teacher,
                 # torch's thread count changes float rounding in training: export rebuilds a trial with
                 # the count its worker had (an entry per start: [first trial number it ran, threads])
                 "threads": [*state.get("threads", []), [first, threads]],
                 # where candidates were fine-tuned and scored (a GPU's float rounding differs too), as threads
                 "devices": [*state.get("devices", []), [first, resources.worker_device]],
                 "reference_kinds": kinds,
                 "teacher_sha256": task.teacher_sha256, "created": state.get("created", time.time()),
                 "teacher_provenance": provenance_map(teacher, state.get("teacher_provenance"))}
        write_json(out / STATE_FILE, state)
        job_id = register_job(spec, out, state, tracker, log)
    except BaseException:
        if ray_start is not None:
            ray_start.stop()
        release_locks(locks)
        raise

    log(f"[slimsearch] {done} of {spec.search.budget} candidates done; running {remaining} "
        f"on {resources.describe()}")
    if meter is not None and workers > 1:
        log(f"[slimsearch] {LOCAL_ENERGY_METRIC} counts the whole CPU package ({meter.source}); with {workers} "
            "workers it includes the other trials running meanwhile")
    bar = progress_bar(spec.search.budget, done, progress)
    complete = [r for r in records(study) if r.state.value == "complete"]

    candidate_log = CandidateLog(tracker, space, default_modes, log)
    stops = None
    if spec.search.early_stopping:
        from slimsearch.jobs.early_stop import FrontSnapshot

        stops = FrontSnapshot(out, space.plan_from_params, metric=task.metric_name, teacher=teacher_score,
                              objectives=objectives, constraints=spec.constraints,
                              margin=spec.search.early_stopping_margin, complete=complete, family=task.family,
                              front=[r for r in complete if r.number in front_numbers(complete, objectives)])

    def on_trial(record) -> None:
        if rung is not None:  # before anything that may fail: the next candidate is judged against it
            rung.add(record)
        plan = space.plan_from_params(record.params)
        logged = candidate_log(record)
        if record.state.value == "complete":
            complete.append(record)
            if logged:
                log_hypervolume(tracker, complete, objectives, teacher, log)
        front = front_numbers(complete, objectives)
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
    rung = RungFile(out, study, spec.objectives) if screen is not None else None
    job_fn = functools.partial(evaluate_params, job_json=redact(spec.to_json()), space=space, teacher_score=teacher_score,
                               out=str(out), devices=devices or None, reference=reference,
                               device=resources.worker_device)
    status, stopped = "FAILED", ""
    try:
        if remaining and executor == "ray":
            ray_start = ray_start or RayStart(workers * threads, background=ray_in_background)
            if ray_start.ready() and workers * threads > cores:  # started here, on this machine's cores
                log(f"[slimsearch] {workers} worker(s) x {threads} threads on {cores} cores: candidates share "
                    "cores, so each runs slower and its measured latencies vary more")
        ran = run_trials(study, dict(space.choices), job_fn, objectives, n_trials=remaining, executor=executor,
                         workers=workers, threads_per_worker=threads, gpus_per_worker=resources.gpus_per_worker,
                         listener=on_trial,
                         ray_storage=str(out / "ray"), constraints=constraints,
                         estimate=estimate_fn if can_screen else None, calibration=calibration,
                         on_calibration=functools.partial(log_calibration, tracker, log=log),
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
        if spec.search.baselines and task.family is TaskFamily.CAUSAL_LM:
            from slimsearch._threads import torch_threads
            from slimsearch.jobs.baselines import run_baselines

            with torch_threads(min(workers * threads, cores)):  # the workers are done: every core is free
                run_baselines(task, spec.profile_refs, out, teacher_score=teacher_score, log=log, tracker=tracker,
                              device=resources.device, reference=reference,
                              power_modes=spec.teacher_power_modes())
        status = "FINISHED"
    except BaseException as exc:
        if was_stopped(exc):
            status = "KILLED"
        register_end(job_id, exc, log)
        raise
    finally:
        if bar is not None:
            bar.close()
        if ray_start is not None:  # Ray's shutdown (~2 s) overlaps writing the results, which need no Ray
            ray_start.stop(wait=False)
        try:
            result = _finish(study, space, tracker, out, objectives, teacher, task.metric_name, state,
                             default_modes, family=task.family)
            tracker.finish(status)
            if status == "FINISHED":
                register_end(job_id, None, log)
        except TrackingUnavailable as exc:
            if status != "FINISHED":  # an error is on its way out already: say this one, raise that one
                log(f"[slimsearch] {exc}")
            else:
                register_end(job_id, exc, log)
                raise JobStateError(f"{exc}; every result is in the Optuna study ({redact(storage_url)}): when the "
                                    f"store is back, `slimsearch run {source} --out {out} --resume` logs them")
        finally:
            if ray_start is not None:
                ray_start.stop()
            release_locks(locks)  # last: while a driver holds them, the registry's "running" is true (JobStatus.LOST)
    return dataclasses.replace(result, stopped=stopped)


def first_unrun(study) -> int:
    """The number of the first trial a start of the job runs: the lowest waiting or running one
    (trials enqueued before the job started are numbered then), else the next to be created."""
    from optuna.trial import TrialState

    open_ = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))]
    return min(open_, default=len(study.trials))


def local_reference_figures(task, teacher: dict, kinds: Optional[dict] = None) -> Optional[dict[str, float]]:
    """The teacher's local latencies measured at the job's start (before Ray and its workers start:
    a quiet moment), by metric name, and ``kinds``, those of the teacher deployed as the other graph
    kinds the space allows (``quiet_local_latencies``): every candidate's are timed paired with the
    teacher deployed as its own kind of graph and scaled to these (``measure_local``). A causal LM's:
    its decode tokens/s and prefill ms (None when its architecture has no deployed graph, so no
    prefill figure: timed unpaired in PyTorch)."""
    if task.family is TaskFamily.CAUSAL_LM:
        from slimsearch.evaluators.decoder import DECODE, PREFILL

        return {name: teacher[name] for name in (DECODE, PREFILL)} if PREFILL in teacher else None
    return {**{name: teacher[name] for name in local_latency_metrics(task.latency_batch)}, **(kinds or {})}


def describe_reference(reference: Optional[dict[str, float]]) -> str:
    """The MLflow parameter ``local_latency``: how the candidates' ``@local`` latencies were measured."""
    if reference is None:
        return "unpaired: median of repeated calls, as the worker found the machine"
    figures = ", ".join(f"{k}={v:.4g}" for k, v in sorted(reference.items()))
    if any(k.startswith("decode_tok_s") for k in reference):
        return ("paired: the deployed graph timed in rounds alternating with the teacher's in the same process; "
                f"the median per-round ratio times the teacher's figure measured at the job's start ({figures})")
    return ("paired: median of per-round ratios to the teacher deployed as the candidate's kind of graph (float; "
            "act-qdq: 8-bit inputs to every layer; w8a8), in alternating rounds in the same worker, times that "
            f"reference's latency measured at the job's start ({figures}); raw figures: latency_ms_raw*@local")


def _estimate_can_screen(constraints, objectives, costs) -> bool:
    """Whether the driver's screen can use the estimate: a constraint on a cost it estimates (all but the
    measured ``@local`` ones), or every objective such a cost. Otherwise the estimate would cost the
    driver about half a second per candidate (building the plan's model), between trials, for nothing;
    the ``auto`` sampler still calls it for itself."""
    estimable = {c for c in costs if not c.endswith("@local")}
    return any(c.metric in estimable for c in constraints) or all(m in estimable for m in objectives)


def _finish(study, space, tracker, out: Path, objectives, teacher, metric_name, state,
            default_modes: dict[str, str], family=None) -> JobResult:
    """Reconcile MLflow with the study, mark the front, write front.json and the plot.

    The files in ``out`` are written even when the MLflow store cannot be; that is then
    raised as :class:`TrackingUnavailable` (the study holds every result, and the next
    ``--resume`` logs what MLflow lacks).
    """
    from slimsearch.dashboards.front import front_infos, references_of, write_front_html
    from slimsearch.jobs.baselines import load_baselines
    from slimsearch.evaluators.metrics import provenance_map
    from slimsearch.search._study import records
    from slimsearch.storage import redact

    all_records = records(study)
    complete = [r for r in all_records if r.state.value == "complete"]
    front = front_numbers(complete, objectives)
    baselines = load_baselines(out)
    children: dict[int, str] = {}
    unreachable = None
    try:
        children = tracker.children()
        for r in all_records:  # told to the study but not logged: store down, or driver killed in between
            if r.number not in children:
                children[r.number] = log_record(tracker, space, default_modes, r)
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
    family = TaskFamily(family or TaskFamily.CLASSIFICATION)
    data = {"job": state["spec"]["name"], "objectives": objectives, "metric": metric_name,
            "family": family.value, "direction": family.direction, "teacher": teacher,
            "teacher_provenance": teacher_provenance,
            "front": front_list, "candidates": candidates, "baselines": baselines,
            "failed": [{"trial": r.number, "error": r.error} for r in all_records if r.state.value == "failed"],
            # evaluated only cheaply (multi-fidelity): their cheap figures; screened on the estimate: none
            "screened": [{"trial": r.number, "reason": r.screened, "metrics": r.values}
                         for r in all_records if r.state.value == "screened" and r.values]}
    write_json(out / FRONT_FILE, data)
    artifacts = [out / FRONT_FILE]
    if len(objectives) >= 2 and candidates:
        provenance = {k: v for c in candidates for k, v in c["provenance"].items()}
        infos = front_infos(candidates, objectives, front=front, teacher=teacher, provenance=provenance,
                            references=references_of(baselines))
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
                                  f"ended ({short_error(unreachable)}): {missing} of {len(all_records)} candidate(s) "
                                  "are not logged there yet") from unreachable
    return JobResult(out=out, front=front_list, candidates=candidates, teacher=teacher, objectives=objectives,
                     teacher_provenance=teacher_provenance, tracking_uri=state["spec"].get("tracking_uri"))
