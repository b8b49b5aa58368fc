"""What a job records as it runs: MLflow runs and tags of its candidates, the job registry's
row, the hypervolume series, the progress bar."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Optional

from slimsearch.jobs.spec import JobSpec

from slimsearch.jobs.early_stop import STOPPED_METRIC


class TrackingUnavailable(Exception):
    """The MLflow store could not be written to when the job ended (internal: run_job says what to do)."""


def short_error(exc: BaseException) -> str:
    """An MLflow or database error in one short line: the DB-API error when there is one."""
    text = " ".join(str(exc).split())
    found = re.search(r"\((?:\w+\.)*\w*(?:Error|Exception)\) [^\[(]*", text)
    return (found.group(0).strip() if found else text[:200]) or type(exc).__name__


def log_record(tracker, space, default_modes: dict[str, str], record) -> str:
    """Log one trial as its MLflow child run; the run id."""
    from slimsearch.evaluators.metrics import provenance_map

    plan = space.plan_from_params(record.params)
    return tracker.log_candidate(record.number, record.params, record.values,
                                 provenance_map(record.values, record.provenance), plan.to_json(),
                                 failed=record.error, tags=candidate_tags(plan, record.values, default_modes, record))


class CandidateLog:
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
                log_record(self.tracker, self.space, self.default_modes, self.waiting[number])
            except Exception as exc:  # noqa: BLE001 - the study holds the trial; logging it can wait
                self.down = short_error(exc)
                self.log(f"[slimsearch] MLflow store not writable ({self.down}); {len(self.waiting)} candidate(s) "
                         "wait to be logged (their results are in the Optuna study)")
                return False
            del self.waiting[number]
        if self.down is not None:
            self.log("[slimsearch] MLflow store writable again: the waiting candidates are logged")
            self.down = None
        return True


def register_job(spec: JobSpec, out: Path, state: dict, tracker, log) -> Optional[int]:
    """Record the job as running in the job registry (storage/registry.py); None if it cannot be."""
    from slimsearch.storage import redact
    from slimsearch.storage.registry import Registry, safely

    return safely(lambda: Registry().record_start(
        name=spec.name, out=out, config_json=spec.to_json(), study_name=state["study_name"],
        storage=redact(state["storage"]), tracking_uri=redact(state["tracking_uri"]),
        experiment_id=tracker.client.get_run(state["parent_run_id"]).info.experiment_id,
        parent_run_id=state["parent_run_id"], budget=spec.search.budget), log)


def release_locks(locks: list) -> None:
    for lock in locks:
        if lock is not None:
            lock.close()


def was_stopped(exc: BaseException) -> bool:
    """Stopped from outside (Ctrl-C; SIGTERM, a KeyboardInterrupt in the command): --resume goes on."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit))


def register_end(job_id: Optional[int], exc: Optional[BaseException], log) -> None:
    """finished (``exc`` None), stopped (interrupted) or failed, in the job registry."""
    from slimsearch.storage.registry import JobStatus, Registry, safely

    if job_id is None:
        return
    status = JobStatus.FINISHED if exc is None else JobStatus.STOPPED if was_stopped(exc) else JobStatus.FAILED
    safely(lambda: Registry().record_end(job_id, status, None if exc is None else f"{type(exc).__name__}: {exc}"),
           log)


def log_hypervolume(tracker, complete, objectives, teacher, log) -> None:
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


def front_numbers(complete, objectives) -> set[int]:
    """Trial numbers of the non-dominated candidates among the feasible ones (a candidate that breaks
    a job constraint never enters the front)."""
    from slimsearch.search._study import front_of

    return {r.number for r in front_of(complete, objectives)}


def power_modes_used(spec: JobSpec, chosen) -> dict[str, str]:
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


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="candidates", unit="cand", file=sys.stderr, dynamic_ncols=True)


def log_calibration(tracker, fit, log) -> None:
    """One refit of the estimate's online calibration as points of the parent run's
    ``calibration.<metric>.*`` series (step = the pairs it was fitted on)."""
    try:
        for name, value in fit.metrics().items():
            tracker.log_parent_series(name, value, step=fit.pairs)
    except Exception as exc:  # noqa: BLE001 - a missing chart point must not stop the search
        log(f"[slimsearch] calibration refit not logged ({type(exc).__name__}: {exc})")
