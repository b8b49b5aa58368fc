"""Launching a job as ``slimsearch run`` does, from the command line or from Python.

One path for both doors: the job is read (a file, a validated :class:`JobSpec`, or its
data as a dict) with its overrides, checked at the door (every field, the ``--out``
folder, the stores it names open), then run, joined to a Ray cluster when asked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from slimsearch.exceptions import ConfigError
from slimsearch.jobs.load import apply_overrides, check_reachable, dump_job, load_job, validate_job
from slimsearch.jobs.runner import JobResult, run_job
from slimsearch.jobs.spec import JobSpec

# what may override a job's fields at launch: keyword -> (job field, the command-line flag)
OVERRIDES: dict[str, tuple[str, str]] = {
    "budget": ("search.budget", "--budget"),
    "workers": ("search.workers", "--workers"),
    "threads": ("search.threads_per_worker", "--threads"),
    "time_limit_s": ("search.time_limit_s", "--time-limit"),
    "device": ("search.device", "--device"),
    "gpus_per_worker": ("search.gpus_per_worker", "--gpus-per-worker"),
    "storage": ("storage", "--storage"),
    "tracking_uri": ("tracking_uri", "--tracking-uri"),
}
EXECUTORS = ("ray", "local")

JobLike = Union[str, "os.PathLike[str]", JobSpec, dict]


def read_job(job: JobLike, overrides: dict[str, Any], labels: dict[str, str]) -> tuple[JobSpec, str]:
    """The validated job and what names it in messages; ``overrides`` maps job fields to values,
    ``labels`` job fields (and ``out``) to what an error in one names (``--budget``, ``budget=``)."""
    if isinstance(job, (str, os.PathLike)):
        return load_job(job, overrides, flags=labels), os.fspath(job)
    if isinstance(job, JobSpec):
        data = dump_job(job)
    elif isinstance(job, dict):
        import copy

        data = copy.deepcopy(job)
    else:
        raise ConfigError(f"job: {type(job).__name__} is not a job; allowed: a job file's path, a JobSpec, or "
                          "a job's data as a dict")
    return validate_job(apply_overrides(data, overrides), source="<job>", flags=labels), "<job>"


def launch(job: JobLike, *, overrides: Optional[dict[str, Any]] = None, labels: Optional[dict[str, str]] = None,
           out: Optional[Union[str, "os.PathLike[str]"]] = None, resume: bool = False, executor: str = "ray",
           progress: bool = True, ray_address: Optional[str] = None, ray_in_background: bool = False,
           log: Callable[[str], Any] = print) -> JobResult:
    """Check ``job`` at the door, then run (or resume) it; see :func:`slimsearch.run`."""
    from slimsearch.cluster import joined

    if executor not in EXECUTORS:
        raise ConfigError(f"executor: {executor!r} is not an executor; allowed: {list(EXECUTORS)}")
    spec, source = read_job(job, {k: v for k, v in (overrides or {}).items() if v is not None}, labels or {})
    folder = Path(out) if out is not None else Path("runs") / spec.name
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{(labels or {}).get('out', 'out=')} {str(folder)!r}: is a file; allowed: a new folder, "
                          "or the folder of this job with --resume")
    check_reachable(spec, source=source, flags=labels or {})
    if ray_address is None:  # a cluster's GPUs are counted once it is joined (run_job)
        from slimsearch.jobs.resources import gpus_here, resolve_resources

        gpus, here = gpus_here()
        resolve_resources(spec.search, cpus=os.cpu_count() or 1, gpus=gpus, executor=executor, driver_gpus=here,
                          source=source, flags=labels)
    with joined(ray_address, spec.profile_refs, log=log) as devices:
        return run_job(spec, folder, resume=resume, executor=executor, progress=progress, log=log, source=source,
                       devices=devices, ray_in_background=ray_in_background)


def run(job: JobLike, *, out: Optional[Union[str, "os.PathLike[str]"]] = None, resume: bool = False,
        executor: str = "ray", progress: bool = True, ray_address: Optional[str] = None,
        log: Callable[[str], Any] = print, **overrides: Any) -> JobResult:
    """Run (or resume) a compression search job, as ``slimsearch run`` does, and return its front.

    ``job`` is a job file's path, a :class:`JobSpec`, or a job's data as a dict.
    ``overrides`` set the job's fields as the command's flags do: ``budget``, ``workers``,
    ``threads``, ``time_limit_s``, ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``),
    ``gpus_per_worker``, ``storage``, ``tracking_uri``. ``out`` is the job folder
    (default ``runs/<job name>``); ``resume`` continues the job there. Bad input raises
    :class:`~slimsearch.ConfigError` before anything is written.
    """
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ConfigError(f"run: unknown keyword {unknown[0]!r}; allowed: {sorted(OVERRIDES)} and out, resume, "
                          "executor, progress, ray_address, log")
    given = {k: v for k, v in overrides.items() if v is not None}
    return launch(job, overrides={OVERRIDES[k][0]: v for k, v in given.items()},
                  labels={OVERRIDES[k][0]: f"{k}=" for k in given}, out=out, resume=resume, executor=executor,
                  progress=progress, ray_address=ray_address, log=log)
