"""``search()``: the driver's Python door, for any space and any ``evaluate``.

The job path (``slimsearch run``, :func:`slimsearch.jobs.runner.run_job`) and
this function open the same kind of Optuna study and run the same
:func:`slimsearch.search.driver.run_trials`; only what they evaluate differs.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Callable, Mapping, Optional, Sequence

from slimsearch.exceptions import ConfigError
from slimsearch.ray_runtime import start_ray
from slimsearch.search._online import OnlineCalibration
from slimsearch.search._study import _check_objectives, front_of, open_study, records
from slimsearch.search._types import Constraint, Executor, Range, SearchResult, TrialState
from slimsearch.search.driver import default_threads, run_trials
from slimsearch.search.samplers import Sampler, make_sampler

STUDY_NAME = "slimsearch"


def _check_space(space: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"space: a non-empty mapping of name -> list of choices or Range is needed, got {space!r}")
    out = {}
    for name, dim in space.items():
        if isinstance(dim, tuple) and len(dim) == 2 and all(isinstance(v, (int, float)) for v in dim):
            dim = Range(*dim)
        if isinstance(dim, Range):
            out[name] = dim
            continue
        if isinstance(dim, (str, bytes)) or not isinstance(dim, Sequence) or len(dim) == 0:
            raise ConfigError(f"space.{name}: must be a non-empty list of choices, a Range or a (low, high) "
                              f"tuple, got {dim!r}")
        bad = [c for c in dim if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:
            raise ConfigError(f"space.{name}: choices must be None, bool, int, float or str, got {bad[0]!r}")
        out[name] = list(dim)
    return out


def search(
    space: Mapping[str, Any],
    evaluate: Callable[[dict], Mapping[str, float]],
    objectives: Mapping[str, str],
    *,
    constraints: Sequence[str] = (),
    budget: int,
    sampler: str = "auto",
    seed: int = 0,
    estimate: Optional[Callable[[dict], Mapping[str, float]]] = None,
    executor: str = "local",
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    storage: Optional[str] = None,
    time_limit_s: Optional[float] = None,
    calibrate_estimate: bool = True,
) -> SearchResult:
    """Search ``space`` for the front of ``objectives`` in ``budget`` evaluations.

    Args:
        space: name -> list of choices (categorical), or a numeric range: ``Range(low, high,
            step=None, log=False)`` or the tuple ``(low, high)``; integer ends give integers.
        evaluate: params -> metric values; the expensive call the budget counts. An
            exception or a missing objective fails that trial only.
        objectives: metric -> "max" or "min".
        constraints: strings ``"<metric> <op> <number>"``, op one of ``<= >= < >``; a trial
            that breaks one (or does not report its metric) never enters the front.
        budget: evaluations to run (trials already in ``storage`` count).
        sampler: "auto" (slimsearch's, uses ``estimate``), "random", "nsga2", "tpe" or "gp".
        seed: seeds the sampler; ``executor="local"`` with one worker repeats exactly.
        estimate: params -> cheap predicted metrics (e.g. latency from a device profile).
            Candidates whose estimate breaks a constraint, or (when it covers every
            objective) is dominated by an evaluated trial, are recorded as screened and not
            evaluated; screening does not use budget and stops the search after
            ``max(100, 10 * budget)`` screened candidates. Params already asked are screened
            too (evaluating them again would buy nothing).
        executor: "local" (in this process) or "ray" (Ray Tune trials; Ray is started for
            the call unless it runs already, and shut down after if this call started it).
        workers: concurrent trials with ``executor="ray"``.
        gpus_per_worker: GPUs each Ray trial asks for (a fraction shares one; ``evaluate`` then
            finds its GPU as ``cuda``); 0: none. Where ``evaluate`` runs its work is its own choice.
        storage: database URL keeping the study (SQLite, PostgreSQL); None keeps it in
            memory. A search on a storage that already holds one continues it.
        time_limit_s: wall-clock seconds one ``evaluate`` call may take; past them it is
            stopped where it runs (a training loop within one step; one native call only when
            it returns) and the trial fails with a TimeoutError; None: no limit.
        calibrate_estimate: correct ``estimate`` online: for each metric both ``estimate``
            and ``evaluate`` return, the estimate is corrected from the measured values as
            trials complete (refitted every 5; :class:`~slimsearch.search.OnlineCalibration`),
            and screening (and ``auto``, on constraints) uses the corrected one. Recorded
            values never change.

    Returns:
        SearchResult with ``trials`` (params, values, state "complete" | "failed" |
        "screened", estimate as ``estimate`` returned it, feasible), ``front`` (evaluated
        feasible non-dominated) and ``calibration`` (each refit, with its held-out error).
    """
    space = _check_space(space)
    _check_objectives(objectives)
    objectives = dict(objectives)
    parsed = tuple(Constraint.parse(c) for c in ([constraints] if isinstance(constraints, str) else constraints))
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"budget: must be an int >= 1, got {budget!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers: must be an int >= 1, got {workers!r}")
    if (isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, (int, float))
            or not 0 <= gpus_per_worker <= 64 or (gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker))):
        raise ConfigError(f"gpus_per_worker: must be 0, a fraction of a GPU up to 1 or a whole number of GPUs up "
                          f"to 64, got {gpus_per_worker!r}")
    try:
        kind = Executor(executor)
    except ValueError:
        raise ConfigError(f"executor must be one of {[e.value for e in Executor]}, got {executor!r}") from None
    try:
        Sampler(sampler)
    except ValueError:
        raise ConfigError(f"sampler must be one of {[s.value for s in Sampler]}, got {sampler!r}") from None
    if time_limit_s is not None and (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float))
                                     or not 0 < time_limit_s < float("inf")):
        raise ConfigError(f"time_limit_s: must be a number of seconds > 0 or None, got {time_limit_s!r}")
    if estimate is not None and not callable(estimate):
        raise ConfigError(f"estimate: must be a callable params -> dict or None, got {estimate!r}")
    if not isinstance(calibrate_estimate, bool):
        raise ConfigError(f"calibrate_estimate: must be True or False, got {calibrate_estimate!r}")
    calibration = OnlineCalibration(estimate) if calibrate_estimate and estimate is not None else None

    def new_sampler(offset: int):
        return make_sampler(sampler, seed=seed + offset, budget=budget, estimate=estimate, constraints=parsed,
                            space=space, calibration=calibration)

    study = open_study(storage, STUDY_NAME, objectives, new_sampler(0))
    if study.trials:  # continuing: a sampler seeded as at the start would propose the same params again
        study.sampler = new_sampler(len(study.trials))
    done = sum(1 for r in records(study) if r.state is TrialState.COMPLETE)
    remaining = max(0, budget - done)

    started_ray, ray_dir = False, None
    try:
        threads = 1
        if kind is Executor.RAY and remaining:
            threads = default_threads(workers)
            started_ray = start_ray(workers * threads)
            ray_dir = tempfile.mkdtemp(prefix="slimsearch-ray-")
        run_trials(study, space, evaluate, objectives, n_trials=remaining, executor=kind.value, workers=workers,
                   threads_per_worker=threads, gpus_per_worker=float(gpus_per_worker), ray_storage=ray_dir,
                   constraints=parsed, estimate=estimate,
                   screen_duplicates=True, max_screened=max(100, 10 * budget), time_limit_s=time_limit_s,
                   calibration=calibration)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        if ray_dir is not None:
            shutil.rmtree(ray_dir, ignore_errors=True)
    trials = records(study)
    return SearchResult(trials=trials, objectives=objectives, front=front_of(trials, objectives),
                        constraints=parsed, calibration=tuple(calibration.fits) if calibration else ())


__all__ = ["Constraint", "Range", "SearchResult", "search"]
