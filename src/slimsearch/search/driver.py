"""The search driver: an Optuna study proposes, Ray Tune (or this process) evaluates.

All search state lives in the Optuna study (RDB storage), so a stopped search is
resumed from the database alone. Ray Tune runs each evaluation as a trial in a
worker process. Tune's stock ``OptunaSearch`` is not used: it leaves failed
multi-objective trials RUNNING and has no place for per-trial metadata, so
``_teller._Teller`` does ask/tell on the study itself, for both executors here.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from slimsearch._device import trial_resources
from slimsearch.exceptions import ConfigError
from slimsearch.search._online import CalibrationFit, OnlineCalibration
from slimsearch.search._study import _check_objectives
from slimsearch.search._teller import _Teller, call_evaluate
from slimsearch.search._types import Constraint, Executor, Space, TrialRecord, TrialState


def run_trials(
    study,
    space: Space,
    evaluate: Callable[[dict], dict],
    objectives: Mapping[str, str],
    *,
    n_trials: int,
    executor: str = "local",
    workers: int = 1,
    threads_per_worker: int = 1,
    gpus_per_worker: float = 0.0,
    listener: Optional[Callable[[TrialRecord], None]] = None,
    ray_storage: Optional[str] = None,
    constraints: Sequence[Constraint] = (),
    estimate: Optional[Callable[[dict], dict]] = None,
    screen_duplicates: bool = False,
    max_screened: Optional[int] = None,
    study_budget: Optional[int] = None,
    owner: Optional[str] = None,
    max_retries: int = 1,
    max_failed: Optional[int] = None,
    time_limit_s: Optional[float] = None,
    calibration: Optional[OnlineCalibration] = None,
    on_calibration: Optional[Callable[[CalibrationFit], None]] = None,
) -> list[TrialRecord]:
    """Evaluate new trials of ``study`` until ``n_trials`` complete; their records, screened and failed ones included.

    A failed evaluation (it raised, returned no objective, or its worker died past its
    retries) does not count towards ``n_trials``: the search goes on, and stops early only
    after ``max_failed`` (default :func:`failure_cap`) failures in this call.

    ``estimate``, ``constraints`` and ``screen_duplicates`` turn on screening (see
    :class:`_Teller`); screened trials do not count towards ``n_trials`` and at most
    ``max_screened`` (default ``max(100, 10 * n_trials)``) are screened. ``listener`` is
    called with every record, screened ones too, as it is made. ``calibration`` corrects the
    estimate from the measured values of completed trials (the screen judges the corrected
    one; pass the same object to the ``auto`` sampler so it aims with it too), and
    ``on_calibration`` is called with each of its refits.

    With ``executor="ray"``, each trial asks Ray for ``threads_per_worker`` CPUs and ``gpus_per_worker``
    GPUs (a fraction shares one; :func:`~slimsearch._device.trial_resources`). A trial whose worker
    process dies (killed, crashed) is run again up to ``max_retries`` times, then recorded as failed
    with the reason; with ``"local"`` the
    worker is this process, and a trial it was running when it died is run again by ``--resume``
    (:func:`recover_interrupted`). An evaluation still running after ``time_limit_s`` seconds is
    stopped where it runs and recorded as failed, not retried (:func:`within_time_limit`).

    ``study_budget`` caps the study's complete plus running trials, for several drivers (processes
    or machines) that share one study: each stops asking once the study is full, so together
    they complete at most that many; a trial that loses the race for the last place is recorded
    as screened (never evaluated). ``owner`` (e.g. the job folder) is recorded on each trial, so
    that :func:`recover_interrupted` of one driver leaves the others' running trials alone.
    """
    _check_objectives(objectives)
    try:
        kind = Executor(executor)
    except ValueError:
        raise ConfigError(f"executor must be one of {[e.value for e in Executor]}, got {executor!r}") from None
    if n_trials <= 0:
        return []
    if max_screened is None:
        max_screened = max(100, 10 * n_trials)
    if max_failed is None:
        max_failed = failure_cap(n_trials)
    teller = _Teller(study, space, objectives, listener, constraints=constraints, estimate=estimate,
                     screen_duplicates=screen_duplicates, max_screened=max_screened, study_budget=study_budget, owner=owner,
                     calibration=calibration, on_calibration=on_calibration)
    if kind is Executor.LOCAL:
        while teller.count(TrialState.COMPLETE) < n_trials and teller.count(TrialState.FAILED) < max_failed:
            asked = teller.ask()
            if asked is None:
                break
            number, params = asked
            teller.tell(number, params, call_evaluate(evaluate, params, time_limit_s))
        return teller.records
    _run_ray(teller, evaluate, n_trials=n_trials, workers=workers, threads=threads_per_worker, storage=ray_storage,
             max_retries=max_retries, max_failed=max_failed, time_limit_s=time_limit_s, gpus=gpus_per_worker)
    return teller.records


def default_threads(workers: int) -> int:
    """Torch threads per worker when none are asked for: the cores shared out among the workers, at least 1."""
    return max(1, (os.cpu_count() or 1) // workers)


def failure_cap(n_trials: int) -> int:
    """How many failed evaluations a search of ``n_trials`` takes before it stops: a task that
    fails every candidate must not run forever, one that fails some must still fill the budget."""
    return max(10, n_trials)


def _ray_trainable(config: dict, evaluate=None, threads: int = 1, time_limit_s: Optional[float] = None) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(threads)
    tune.report({"outcome": json.dumps(call_evaluate(evaluate, config["params"], time_limit_s))})


def _worker_failure(trial, max_retries: int) -> str:
    """Why a Ray Tune trial ended in error, in one line: how often its worker failed and the last error."""
    try:
        # Tune appends each failure to the error file in the driver's staging folder at once, and
        # copies it to the experiment's storage later: get_error() reads that copy, which the
        # searcher is often told of the failure before (it then said "no error recorded").
        local = getattr(trial, "error_file", None)
        if local and os.path.exists(local):
            with open(local, encoding="utf-8", errors="replace") as f:
                error = f.read().rsplit("Failure # ", 1)[-1].partition("\n")[2]
        else:
            error = trial.get_error()
    except Exception:  # noqa: BLE001 - the error file is a courtesy; the count is what matters
        error = None
    text = " ".join(str(error or "").split())
    if "worker process has died" in text or "died unexpectedly" in text:
        text = "the worker process died (killed, crashed or out of memory)"
    elif len(text) > 300:
        text = text[:300] + "..."
    attempts = getattr(trial, "num_failures", 0) or max_retries + 1
    return (f"the Ray worker running this candidate failed {attempts} time(s) (search.max_retries = "
            f"{max_retries}): {text or 'no error recorded'}")


def _run_ray(teller: _Teller, evaluate, *, n_trials: int, workers: int, threads: int, storage: Optional[str],
             max_retries: int = 1, max_failed: int = 10, time_limit_s: Optional[float] = None, gpus: float = 0.0):
    import ray
    from ray import tune
    from ray.tune.search import Searcher

    started: dict[str, Any] = {}  # Tune trial id -> Tune Trial, to read its failures

    class TrialRegister(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            started[trial.trial_id] = trial

    class StudySearcher(Searcher):
        """Ray Tune searcher that asks and tells the Optuna study directly.

        A trial whose worker dies is run again by Tune itself (``FailureConfig(max_failures=
        max_retries)``, same trial id and params, so the study sees one trial); only once the
        retries are used up does :meth:`on_trial_complete` get ``error=True``. A candidate that
        raises is not a Tune failure: :func:`call_evaluate` turns it into a recorded error, once.
        """

        def __init__(self):
            super().__init__(metric=None, mode=None)
            self.pending: dict[str, tuple[int, dict]] = {}

        def suggest(self, trial_id: str):
            complete = teller.count(TrialState.COMPLETE)
            if complete >= n_trials or teller.count(TrialState.FAILED) >= max_failed:
                return Searcher.FINISHED
            if complete + len(self.pending) >= n_trials:  # enough running; ask again if one fails
                return None
            asked = teller.ask()
            if asked is None:  # the screening cap was reached: no more candidates worth evaluating
                return Searcher.FINISHED
            number, params = asked
            self.pending[trial_id] = (number, params)
            return {"number": number, "params": params}

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
            number, params = self.pending.pop(trial_id)
            if result and "outcome" in result:
                outcome = json.loads(result["outcome"])
            else:
                outcome = {"error": _worker_failure(started.get(trial_id), max_retries)}
            started.pop(trial_id, None)
            teller.tell(number, params, outcome)

    if not ray.is_initialized():
        raise ConfigError("executor 'ray' needs Ray started first (slimsearch starts it for jobs)")
    trainable = tune.with_resources(tune.with_parameters(_ray_trainable, evaluate=evaluate, threads=threads,
                                                         time_limit_s=time_limit_s),
                                     trial_resources(threads, gpus))
    tuner = tune.Tuner(
        trainable,
        # num_samples=-1: Tune asks until the searcher says FINISHED (when n_trials are complete)
        tune_config=tune.TuneConfig(search_alg=StudySearcher(), num_samples=-1,
                                    max_concurrent_trials=workers, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=storage, name=f"trials-{int(time.time())}", verbose=0,
                                  log_to_file=True, failure_config=tune.FailureConfig(max_failures=max_retries),
                                  callbacks=[TrialRegister()]),
    )
    # Tune's own Ctrl-C handler ends fit() quietly, as if the search were over: a job then said the
    # sampler had run dry and recorded itself finished, exit 0. Off for this call, Ctrl-C raises
    # KeyboardInterrupt here as anywhere else; the trials in flight stay RUNNING in the study and
    # are run again by --resume (recover_interrupted).
    before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        tuner.fit()
    finally:
        if before is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before


def __getattr__(name: str):
    """Names that lived here before the driver was split, forwarded for one release."""
    from slimsearch._compat import moved_attribute

    return moved_attribute(__name__, name, ("slimsearch.search._types", "slimsearch.search._study",
                                            "slimsearch.search._teller", "slimsearch.ray_runtime"))
