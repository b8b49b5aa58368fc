"""The search driver: an Optuna study proposes, Ray Tune (or this process) evaluates.

All search state lives in the Optuna study (RDB storage), so a stopped search is
resumed from the database alone. Ray Tune runs each evaluation as a trial in a
worker process. Tune's stock ``OptunaSearch`` is not used: it leaves failed
multi-objective trials RUNNING and has no place for per-trial metadata, so
:class:`StudySearcher` below does ask/tell on the study itself.
"""

from __future__ import annotations

import json
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping, Optional, Sequence

from slimsearch.exceptions import ConfigError

Space = Mapping[str, Sequence[Any]]


class Executor(str, Enum):
    LOCAL = "local"
    RAY = "ray"


class TrialState(str, Enum):
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True)
class TrialRecord:
    """One finished evaluation, as the driver reports it to listeners."""

    number: int
    params: dict[str, Any]
    values: dict[str, float]
    state: TrialState
    error: Optional[str] = None
    duration_s: float = 0.0


@dataclass(frozen=True)
class SearchResult:
    trials: list[TrialRecord]
    objectives: dict[str, str]
    front: list[TrialRecord] = field(default_factory=list)


METRICS_ATTR = "metrics"
ERROR_ATTR = "error"
DURATION_ATTR = "duration_s"


def _check_objectives(objectives: Mapping[str, str]) -> None:
    if not objectives:
        raise ConfigError("objectives: at least one objective is needed")
    for name, direction in objectives.items():
        if direction not in ("max", "min"):
            raise ConfigError(f"objectives.{name}: direction must be 'max' or 'min', got {direction!r}")


def open_study(storage: str, name: str, objectives: Mapping[str, str], sampler):
    """Create or load the Optuna study that holds a search (RDB storage through SQLAlchemy)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    rdb = optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
    directions = ["maximize" if d == "max" else "minimize" for d in objectives.values()]
    study = optuna.create_study(storage=rdb, study_name=name, directions=directions, sampler=sampler,
                                load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objectives))
    return study


def records(study) -> list[TrialRecord]:
    """Every finished trial of the study as TrialRecords, in trial order."""
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE:
            state = TrialState.COMPLETE
        elif t.state == optuna.trial.TrialState.FAIL:
            state = TrialState.FAILED
        else:
            continue
        out.append(TrialRecord(
            number=t.number, params=dict(t.params), values=dict(t.user_attrs.get(METRICS_ATTR, {})),
            state=state, error=t.user_attrs.get(ERROR_ATTR), duration_s=t.user_attrs.get(DURATION_ATTR, 0.0),
        ))
    return out


def recover_interrupted(study) -> int:
    """Mark trials left RUNNING by a stopped driver as failed and queue their params again."""
    import optuna

    count = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # Optuna has no public way to annotate a trial this process did not ask for.
        study._storage.set_trial_user_attr(t._trial_id, ERROR_ATTR, "interrupted: the driver stopped")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(t.params), skip_if_exists=False)
        count += 1
    return count


class _Teller:
    """Asks the study for params and tells it the outcome; shared by both executors."""

    def __init__(self, study, space: Space, objectives: Mapping[str, str], listener):
        self.study, self.space, self.objectives, self.listener = study, space, objectives, listener
        self.running: dict[int, tuple[Any, float]] = {}  # number -> (optuna trial, start time)

    def ask(self) -> tuple[int, dict]:
        trial = self.study.ask()
        params = {name: trial.suggest_categorical(name, list(choices)) for name, choices in self.space.items()}
        self.running[trial.number] = (trial, time.time())
        return trial.number, params

    def tell(self, number: int, params: dict, outcome: dict) -> TrialRecord:
        import optuna

        trial, started = self.running.pop(number)
        duration = time.time() - started
        trial.set_user_attr(DURATION_ATTR, duration)
        error = outcome.get("error")
        values = outcome.get("values") or {}
        if error is None:
            missing = [m for m in self.objectives if values.get(m) is None]
            if missing:
                error = f"evaluate returned no value for objective {missing[0]!r}; it returned {sorted(values)}"
        if error is None and any(v != v for v in (values[m] for m in self.objectives)):
            error = "an objective is NaN"
        if values:
            trial.set_user_attr(METRICS_ATTR, values)
        if error is None:
            self.study.tell(trial, [float(values[m]) for m in self.objectives])
            state = TrialState.COMPLETE
        else:
            trial.set_user_attr(ERROR_ATTR, error)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            state = TrialState.FAILED
        record = TrialRecord(number, params, dict(values), state, error, duration)
        if self.listener is not None:
            self.listener(record)
        return record


def _call(evaluate: Callable[[dict], dict], params: dict) -> dict:
    """Run one evaluation, turning an exception into a recorded error instead of a crash."""
    try:
        values = evaluate(params)
        return {"values": {k: (None if v is None else float(v)) for k, v in values.items()}}
    except Exception as exc:  # any failure of one candidate costs that candidate only
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return {"error": f"{type(exc).__name__}: {exc} (at {os.path.basename(last.filename)}:{last.lineno})"}


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
    listener: Optional[Callable[[TrialRecord], None]] = None,
    ray_storage: Optional[str] = None,
) -> list[TrialRecord]:
    """Evaluate ``n_trials`` new trials of ``study`` and return their records."""
    _check_objectives(objectives)
    try:
        kind = Executor(executor)
    except ValueError:
        raise ConfigError(f"executor must be one of {[e.value for e in Executor]}, got {executor!r}") from None
    teller = _Teller(study, space, objectives, listener)
    if n_trials <= 0:
        return []
    if kind is Executor.LOCAL:
        out = []
        for _ in range(n_trials):
            number, params = teller.ask()
            out.append(teller.tell(number, params, _call(evaluate, params)))
        return out
    return _run_ray(teller, evaluate, n_trials=n_trials, workers=workers, threads=threads_per_worker,
                    storage=ray_storage)


def _ray_trainable(config: dict, evaluate=None, threads: int = 1) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(threads)
    tune.report({"outcome": json.dumps(_call(evaluate, config["params"]))})


def _run_ray(teller: _Teller, evaluate, *, n_trials: int, workers: int, threads: int, storage: Optional[str]):
    import ray
    from ray import tune
    from ray.tune.search import Searcher

    out: list[TrialRecord] = []

    class StudySearcher(Searcher):
        """Ray Tune searcher that asks and tells the Optuna study directly."""

        def __init__(self):
            super().__init__(metric=None, mode=None)
            self.pending: dict[str, tuple[int, dict]] = {}

        def suggest(self, trial_id: str):
            number, params = teller.ask()
            self.pending[trial_id] = (number, params)
            return {"number": number, "params": params}

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
            number, params = self.pending.pop(trial_id)
            if result and "outcome" in result:
                outcome = json.loads(result["outcome"])
            else:
                outcome = {"error": "the Ray worker running this trial failed or died"}
            out.append(teller.tell(number, params, outcome))

    if not ray.is_initialized():
        raise ConfigError("executor 'ray' needs Ray started first (slimsearch starts it for jobs)")
    trainable = tune.with_resources(tune.with_parameters(_ray_trainable, evaluate=evaluate, threads=threads),
                                    {"cpu": threads})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=StudySearcher(), num_samples=n_trials,
                                    max_concurrent_trials=workers, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=storage, name=f"trials-{int(time.time())}", verbose=0,
                                  log_to_file=True),
    )
    tuner.fit()
    return out
