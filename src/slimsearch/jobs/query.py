"""Finding a job (registry id, name or folder) and reading its progress and front.

Behind ``slimsearch jobs|status|front`` and ``slimsearch.jobs()``/``front()``; reads the
job folder's files, the registry and the Optuna study, and writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slimsearch.exceptions import ConfigError, JobStateError
from slimsearch.storage.registry import JobRecord, Registry, safely


@dataclass(frozen=True)
class JobRef:
    folder: Path
    record: Optional[JobRecord]  # None for a folder the registry does not know (e.g. another machine's)


def resolve_job(ref: str | Path, registry: Optional[Registry] = None) -> JobRef:
    """The job ``ref`` names: a job folder (holding ``job.json``), else a registry id or name."""
    registry = registry or Registry()
    path = Path(ref).expanduser()
    if (path / "job.json").is_file():
        return JobRef(path.resolve(), safely(lambda: registry.find_by_out(path)))
    record = registry.find(str(ref))
    if record is None:
        raise ConfigError(f"JOB {str(ref)!r}: no registered job has this id or name and it is not a job folder "
                          "(no job.json in it); `slimsearch jobs` lists the registered ones")
    if not (Path(record.out) / "job.json").is_file():
        raise JobStateError(f"JOB {str(ref)!r}: registered job {record.id} lived in {record.out}, "
                            "which no longer holds its job.json")
    return JobRef(Path(record.out), record)


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / "job.json").read_text())


def read_front(ref: str | Path, registry: Optional[Registry] = None) -> dict:
    """The job's ``front.json`` (objectives, teacher, front members, every candidate)."""
    job = resolve_job(ref, registry)
    path = job.folder / "front.json"
    if not path.is_file():
        raise JobStateError(f"{job.folder}: no front.json yet (it is written when the job ends or stops); "
                            "`slimsearch status` shows its progress")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class JobProgress:
    id: Optional[int]
    name: str
    folder: Path
    status: str
    done: int
    failed: int
    running: int
    budget: int
    front_size: int
    hypervolume: Optional[float]  # in teacher units (see search.pareto.hypervolume_reference); None if not computed
    hypervolume_rule: Optional[str]
    seconds_per_candidate: Optional[float]
    seconds_left: Optional[float]

    def to_dict(self) -> dict:
        return {**self.__dict__, "folder": str(self.folder)}


def progress(ref: str | Path, registry: Optional[Registry] = None) -> JobProgress:
    """Candidates done of the budget, front size, the front's hypervolume and time left, from the
    Optuna study as it is now (also while the job runs)."""
    import optuna

    from slimsearch.search.pareto import hypervolume_reference, hypervolume_series
    from slimsearch.search._study import front_of, records

    job = resolve_job(ref, registry)
    state = read_state(job.folder)
    spec = state["spec"]
    objectives = {k: (v if isinstance(v, str) else v.get("value")) for k, v in spec["objectives"].items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=state["study_name"], storage=state["storage"])
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    # job.json stores the spec with sorted keys; the study's values follow the job file's order
    names = list(study.metric_names or objectives)
    objectives = {n: objectives[n] for n in names}
    recs = records(study)
    feasible = {r.number: r.feasible for r in recs}
    cands = [{"trial": t.number, "metrics": dict(zip(names, t.values)), "feasible": feasible.get(t.number, True)}
             for t in complete]
    front = front_of(recs, objectives)  # feasible and non-dominated, as front.json's
    hv = rule = None
    if len(names) >= 2 and cands:
        reference = hypervolume_reference(objectives, state.get("teacher"), cands)
        series = hypervolume_series(cands, objectives, reference)
        hv, rule = (series[-1] if series else None), (reference.rule if series else None)
    budget = int(spec["search"]["budget"])
    workers = max(1, int(spec["search"].get("workers") or 1))
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete
                 if t.datetime_complete and t.datetime_start]
    per = sum(durations) / len(durations) if durations else None
    status = job.record.status if job.record else ("finished" if (job.folder / "front.json").is_file() else "unknown")
    left = None
    if per is not None and status == "running":
        left = per * max(0, budget - len(complete)) / workers
    return JobProgress(job.record.id if job.record else None, spec["name"], job.folder, status, len(complete),
                       sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
                       sum(t.state == optuna.trial.TrialState.RUNNING for t in trials), budget, len(front), hv,
                       rule, per, left)


_SEARCH_SETTINGS = ("budget", "workers", "seed", "sampler")


def _comparable(config: dict) -> dict:
    """A job config without its name and search settings: what a fair baseline must share."""
    out = {k: v for k, v in config.items() if k != "name"}
    out["search"] = {k: v for k, v in config.get("search", {}).items() if k not in _SEARCH_SETTINGS}
    return out


def find_random_baseline(folder: Path, registry: Optional[Registry] = None) -> Optional[Path]:
    """The folder of the latest finished random-search job in the registry that searched the same
    task, space, objectives, constraints and profiles as the job in ``folder``; None if there is none."""
    registry = registry or Registry()
    folder = Path(folder).resolve()
    mine = _comparable(read_state(folder)["spec"])
    for record in reversed(registry.jobs()):
        if record.out == str(folder) or record.status != "finished":
            continue
        config = json.loads(record.config)
        if config.get("search", {}).get("sampler") != "random" or _comparable(config) != mine:
            continue
        if (Path(record.out) / "front.json").is_file():
            return Path(record.out)
    return None


def write_job_report(folder: Path, out: Optional[Path] = None, baseline: Optional[Path] = None) -> Path:
    """Write the job's ``report.html`` (:func:`slimsearch.dashboards.report.write_report`). Without a
    ``baseline`` folder, the job registry is asked for a finished random-search job of the same
    task, space, objectives and profiles (:func:`find_random_baseline`), unless the job is one."""
    from slimsearch.dashboards.report import write_report

    folder = Path(folder)
    state_path = folder / "job.json"
    if baseline is None and state_path.exists():
        sampler = json.loads(state_path.read_text())["spec"]["search"].get("sampler")
        if sampler != "random":
            baseline = safely(lambda: find_random_baseline(folder))
    return write_report(folder, out, baseline=baseline)
