"""The search driver: an Optuna study proposes, Ray Tune (or this process) evaluates.

All search state lives in the Optuna study (RDB storage), so a stopped search is
resumed from the database alone. Ray Tune runs each evaluation as a trial in a
worker process. Tune's stock ``OptunaSearch`` is not used: it leaves failed
multi-objective trials RUNNING and has no place for per-trial metadata, so
:class:`StudySearcher` below does ask/tell on the study itself.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import socket
import time
import traceback
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from slimsearch.exceptions import ConfigError
from slimsearch.search._limits import within_time_limit


@dataclass(frozen=True)
class Range:
    """A numeric dimension: every value in ``[low, high]``; integers when both ends are ints.

    ``step`` makes it discrete (``Range(0, 1, step=0.25)``), ``log`` samples on a log
    scale. In a ``search()`` space a plain tuple ``(low, high)`` means ``Range(low, high)``.
    """

    low: float
    high: float
    step: Optional[float] = None
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ConfigError(f"Range: `low <= high` must hold, but got (low={self.low}, high={self.high})")
        if self.log and self.low <= 0:
            raise ConfigError(f"Range: a log range needs low > 0, but got low={self.low}")
        if self.step is not None and self.step <= 0:
            raise ConfigError(f"Range: step must be > 0, but got step={self.step}")

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool)
                   for v in (self.low, self.high, 1 if self.step is None else self.step))


Dimension = Union[Sequence[Any], Range]
Space = Mapping[str, Dimension]


class Executor(str, Enum):
    LOCAL = "local"
    RAY = "ray"


class TrialState(str, Enum):
    COMPLETE = "complete"
    FAILED = "failed"
    SCREENED = "screened"  # judged by its cheap estimate and never evaluated


_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.\-]*(?:@[\w.\-]+)?)\s*(<=|>=|<|>)\s*(\S+)\s*$")
CONSTRAINT_SYNTAX = "'<metric> <op> <number>' with op one of <=, >=, <, > (e.g. 'latency_ms <= 20')"


@dataclass(frozen=True)
class Constraint:
    """``metric op limit``, e.g. ``latency_ms@raspberry-pi-4 <= 20``; parse strings with :meth:`parse`."""

    metric: str
    op: str
    limit: float

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        if isinstance(text, Constraint):
            return text
        match = _CONSTRAINT.match(text) if isinstance(text, str) else None
        limit = None
        if match:
            try:
                limit = float(match.group(3))
            except ValueError:
                limit = None
        if match is None or limit is None or not math.isfinite(limit):
            raise ConfigError(f"constraint {text!r}: not understood; allowed: {CONSTRAINT_SYNTAX}")
        return cls(match.group(1), match.group(2), limit)

    def violation(self, values: Mapping[str, Any]) -> Optional[float]:
        """How far ``values`` are from meeting it (0.0 when met); None when the metric is absent."""
        value = values.get(self.metric)
        if value is None or value != value:
            return None
        if _OPS[self.op](float(value), self.limit):
            return 0.0
        return max(abs(float(value) - self.limit), 1e-12)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.limit:g}"


@dataclass(frozen=True)
class TrialRecord:
    """One finished evaluation, as the driver reports it to listeners."""

    number: int
    params: dict[str, Any]
    values: dict[str, float]
    state: TrialState
    error: Optional[str] = None
    duration_s: float = 0.0
    estimate: dict[str, float] = field(default_factory=dict)
    feasible: bool = True  # meets every constraint (measured values; screened: estimated)
    screened: Optional[str] = None  # why it was not evaluated
    provenance: dict[str, str] = field(default_factory=dict)  # measured|modelled, as evaluate reported it


@dataclass(frozen=True)
class SearchResult:
    """What a search found: every trial in order, and the feasible non-dominated evaluated ones."""

    trials: list[TrialRecord]
    objectives: dict[str, str]
    front: list[TrialRecord] = field(default_factory=list)
    constraints: tuple[Constraint, ...] = ()

    @property
    def evaluated(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state is TrialState.COMPLETE]

    @property
    def screened(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state is TrialState.SCREENED]


METRICS_ATTR = "metrics"
ERROR_ATTR = "error"
DURATION_ATTR = "duration_s"  # asked to told, as the driver sees it
EVALUATE_ATTR = "evaluate_s"  # inside evaluate, as the worker timed it
ESTIMATE_ATTR = "estimate"
SCREENED_ATTR = "screened"
FEASIBLE_ATTR = "feasible"
PROVENANCE_ATTR = "provenance"
DRIVER_ATTR = "driver"  # host:pid of the driver that asked the trial (several may share a study)
OWNER_ATTR = "owner"  # the job (folder) that asked it: what --resume of that job may recover


def _check_objectives(objectives: Mapping[str, str]) -> None:
    if not objectives:
        raise ConfigError("objectives: at least one objective is needed")
    for name, direction in objectives.items():
        if direction not in ("max", "min"):
            raise ConfigError(f"objectives.{name}: direction must be 'max' or 'min', got {direction!r}")


def open_study(storage: Optional[str], name: str, objectives: Mapping[str, str], sampler):
    """Create or load the Optuna study that holds a search.

    ``storage`` is a database URL (RDB storage through SQLAlchemy), or None for a study
    kept in memory for this process only.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is None:
        rdb = optuna.storages.InMemoryStorage()
    else:
        engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
        rdb = _rdb_storage(storage, engine_kwargs)
    directions = ["maximize" if d == "max" else "minimize" for d in objectives.values()]
    study = optuna.create_study(storage=rdb, study_name=name, directions=directions, sampler=sampler,
                                load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objectives))
    return study


def _rdb_storage(url: str, engine_kwargs: dict):
    """Optuna's RDB storage at ``url``. Drivers that open a new database at the same moment race
    to create Optuna's tables, and PostgreSQL refuses the loser's ``CREATE TYPE``/``CREATE TABLE``;
    the loser tries again and finds them made."""
    import optuna
    from sqlalchemy import exc

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (exc.IntegrityError, exc.ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def records(study) -> list[TrialRecord]:
    """Every finished trial of the study as TrialRecords, in trial order."""
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE:
            state = TrialState.COMPLETE
        elif t.state == optuna.trial.TrialState.FAIL:
            state = TrialState.FAILED
        elif t.state == optuna.trial.TrialState.PRUNED and SCREENED_ATTR in t.user_attrs:
            state = TrialState.SCREENED
        else:
            continue
        out.append(TrialRecord(
            number=t.number, params=dict(t.params), values=dict(t.user_attrs.get(METRICS_ATTR, {})),
            state=state, error=t.user_attrs.get(ERROR_ATTR), duration_s=t.user_attrs.get(DURATION_ATTR, 0.0),
            estimate=dict(t.user_attrs.get(ESTIMATE_ATTR, {})), feasible=t.user_attrs.get(FEASIBLE_ATTR, True),
            screened=t.user_attrs.get(SCREENED_ATTR), provenance=dict(t.user_attrs.get(PROVENANCE_ATTR, {})),
        ))
    return out


def front_of(trials: Sequence[TrialRecord], objectives: Mapping[str, str]) -> list[TrialRecord]:
    """The evaluated, feasible, non-dominated trials (of exact ties the earliest)."""
    from slimsearch.search.pareto import pareto_front

    pool = [t for t in trials if t.state is TrialState.COMPLETE and t.feasible]
    points = [[t.values[m] for m in objectives] for t in pool]
    return [pool[i] for i in sorted(pareto_front(points, list(objectives.values())))]


def _set_constraints(trial, constraints: Sequence[Constraint], values: Mapping[str, Any]) -> bool:
    """Record each constraint's violation on ``trial`` (Optuna 5's ``set_constraint``: <= 0 is
    feasible), so Optuna's samplers steer by them; a constrained metric that is absent counts
    as violated. True when all are met."""
    feasible = True
    for c in constraints:
        v = c.violation(values)
        trial.set_constraint(str(c), 1.0 if v is None else v)
        feasible = feasible and v == 0.0
    return feasible


def recover_interrupted(study, owner: Optional[str] = None) -> int:
    """Mark trials left RUNNING by a stopped driver as failed and queue their params again.

    With ``owner``, only the trials that owner asked (and unowned ones): the RUNNING trials
    of other drivers sharing the study are theirs, still being evaluated."""
    import optuna

    count = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if owner is not None and t.user_attrs.get(OWNER_ATTR, owner) != owner:
            continue
        # Optuna has no public way to annotate a trial this process did not ask for.
        study._storage.set_trial_user_attr(t._trial_id, ERROR_ATTR, "interrupted: the driver stopped")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(t.params), skip_if_exists=False)
        count += 1
    return count


def suggest(trial, space: Space) -> dict:
    """Params for ``trial`` from ``space``: a Range is numeric, any other sequence categorical.

    (The ``(low, high)`` shorthand for a Range is the public API's, converted there: the
    job path passes its choices as tuples.)
    """
    params = {}
    for name, dim in space.items():
        if isinstance(dim, Range):
            if dim.integer:
                params[name] = trial.suggest_int(name, dim.low, dim.high, step=dim.step or 1, log=dim.log)
            else:
                params[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
        else:
            params[name] = trial.suggest_categorical(name, list(dim))
    return params


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


class _Teller:
    """Asks the study for params and tells it the outcome; shared by both executors.

    With ``estimate`` (or ``screen_duplicates``) a proposal is judged before it is
    evaluated: one whose estimated metrics break a constraint, whose estimate covers
    every objective and is dominated by an evaluated feasible trial, or that repeats
    params already asked, is told to the study as PRUNED with a ``screened`` reason and
    never evaluated. At most ``max_screened`` are screened; then :meth:`ask` returns
    None and the search ends early rather than spin on a space it has used up.

    With ``study_budget`` several drivers may share the study: :meth:`ask` returns None
    once complete and running trials fill the budget (see :func:`_places_taken`).
    """

    def __init__(self, study, space: Space, objectives: Mapping[str, str], listener, *,
                 constraints: Sequence[Constraint] = (), estimate: Optional[Callable[[dict], dict]] = None,
                 screen_duplicates: bool = False, max_screened: Optional[int] = None,
                 study_budget: Optional[int] = None, owner: Optional[str] = None):
        self.study, self.space, self.objectives, self.listener = study, space, objectives, listener
        self.constraints, self.estimate = tuple(constraints), estimate
        self.screen_duplicates, self.max_screened = screen_duplicates, max_screened
        self.study_budget = study_budget
        self.driver = f"{socket.gethostname()}:{os.getpid()}"
        self.owner = owner
        self.running: dict[int, tuple[Any, float]] = {}  # number -> (optuna trial, start time)
        self.records: list[TrialRecord] = []
        self.n_screened = 0
        self.seen: dict[str, int] = {}
        self.complete: list[TrialRecord] = []
        if screen_duplicates or estimate is not None:
            for r in records(study):
                if r.state is not TrialState.FAILED:
                    self.seen.setdefault(_key(r.params), r.number)
                if r.state is TrialState.COMPLETE and r.feasible:
                    self.complete.append(r)

    def count(self, state: TrialState) -> int:
        """Trials of this run that ended in ``state``."""
        return sum(1 for r in self.records if r.state is state)

    def ask(self) -> Optional[tuple[int, dict]]:
        while True:
            if self.study_budget is not None and len(_places_taken(self.study)) >= self.study_budget:
                return None
            trial = self.study.ask()
            trial.set_user_attr(DRIVER_ATTR, self.driver)
            if self.owner is not None:
                trial.set_user_attr(OWNER_ATTR, self.owner)
            params = suggest(trial, self.space)
            key = _key(params)
            reason, estimate = None, {}
            if self.study_budget is not None:
                ahead = _places_taken(self.study, trial)
                if len(ahead) >= self.study_budget:  # another driver took the last place meanwhile
                    self._record_screened(trial, params, {}, f"not evaluated: the study's budget of "
                                          f"{self.study_budget} was filled by other drivers")
                    return None
                if self.screen_duplicates:  # what other drivers have asked since this one started
                    for t in ahead:
                        self.seen.setdefault(_key(t.params), t.number)
            if self.screen_duplicates and key in self.seen:
                reason = f"duplicate of trial {self.seen[key]}"
            elif self.estimate is not None:
                estimate = _call(self.estimate, params).get("values") or {}
                estimate = {k: v for k, v in estimate.items() if v is not None}
                reason = self._screen(estimate)
            if estimate:
                trial.set_user_attr(ESTIMATE_ATTR, estimate)
            self.seen.setdefault(key, trial.number)
            if reason is None:
                self.running[trial.number] = (trial, time.time())
                return trial.number, params
            self._record_screened(trial, params, estimate, reason)
            if self.max_screened is not None and self.n_screened >= self.max_screened:
                return None

    def _screen(self, estimate: Mapping[str, float]) -> Optional[str]:
        for c in self.constraints:
            v = c.violation(estimate)
            if v:
                return f"estimated infeasible: {c.metric} = {estimate[c.metric]:.4g} breaks {c}"
        if all(m in estimate for m in self.objectives):
            from slimsearch.search.pareto import dominates

            point = [estimate[m] for m in self.objectives]
            directions = list(self.objectives.values())
            for r in self.complete:
                if dominates([r.values[m] for m in self.objectives], point, directions):
                    return f"cannot improve the front: its estimate is dominated by trial {r.number}"
        return None

    def _record_screened(self, trial, params: dict, estimate: dict, reason: str) -> None:
        import optuna

        feasible = _set_constraints(trial, [c for c in self.constraints if c.metric in estimate], estimate)
        trial.set_user_attr(SCREENED_ATTR, reason)
        trial.set_user_attr(FEASIBLE_ATTR, feasible)
        self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        self.n_screened += 1
        self._emit(TrialRecord(trial.number, params, {}, TrialState.SCREENED, estimate=dict(estimate),
                               feasible=feasible, screened=reason))

    def _emit(self, record: TrialRecord) -> TrialRecord:
        self.records.append(record)
        if self.listener is not None:
            self.listener(record)
        return record

    def tell(self, number: int, params: dict, outcome: dict) -> TrialRecord:
        import optuna

        trial, started = self.running.pop(number)
        duration = time.time() - started
        trial.set_user_attr(DURATION_ATTR, duration)
        if outcome.get("seconds") is not None:
            trial.set_user_attr(EVALUATE_ATTR, outcome["seconds"])
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
        provenance = dict(outcome.get("provenance") or {})
        if provenance:
            trial.set_user_attr(PROVENANCE_ATTR, provenance)
        # a constrained metric evaluate did not report cannot show the constraint is met
        feasible = _set_constraints(trial, self.constraints, values)
        if self.constraints:
            trial.set_user_attr(FEASIBLE_ATTR, feasible)
        estimate = dict(trial.user_attrs.get(ESTIMATE_ATTR, {}))
        if error is None:
            self.study.tell(trial, [float(values[m]) for m in self.objectives])
            state = TrialState.COMPLETE
        else:
            trial.set_user_attr(ERROR_ATTR, error)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            state = TrialState.FAILED
        record = TrialRecord(number, params, dict(values), state, error, duration, estimate=estimate,
                             feasible=feasible, provenance=provenance)
        if state is TrialState.COMPLETE and feasible:
            self.complete.append(record)
        return self._emit(record)


def _places_taken(study, trial=None) -> list:
    """The complete and running trials of ``study``: the places its budget has given out. With
    ``trial`` (just asked), those ahead of it.

    Optuna numbers trials in the order the storage creates them (under a lock on the study's
    row, so every driver sees one order), and a trial counts only those numbered before it:
    of two drivers asking for the last place at once, exactly one gets it. A trial queued again
    (``fixed_params``, after an interruption) keeps an old number, so it counts every other.
    Optuna's ``MaxTrialsCallback`` counts all trials instead, which lets racing drivers overrun.
    """
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    taken = study.get_trials(deepcopy=False, states=states)
    if trial is None:
        return taken
    requeued = "fixed_params" in study._storage.get_trial_system_attrs(trial._trial_id)
    return [t for t in taken if t.number != trial.number and (requeued or t.number < trial.number)]


def _call(evaluate: Callable[[dict], dict], params: dict, time_limit_s: Optional[float] = None) -> dict:
    """Run one evaluation, turning an exception into a recorded error instead of a crash.

    ``evaluate`` returns a mapping of values, or a Metrics-like object whose ``provenance``
    (measured|modelled per cost metric) then travels with its ``values``. Past
    ``time_limit_s`` seconds it is stopped, and that is its error."""
    started = time.perf_counter()
    try:
        result = within_time_limit(time_limit_s, lambda: evaluate(params))
        provenance = getattr(result, "provenance", None)
        values = result.values if provenance is not None else result
        out = {"values": {k: (None if v is None else float(v)) for k, v in values.items()}}
        if provenance:
            out["provenance"] = {k: getattr(v, "value", v) for k, v in provenance.items()}
    except Exception as exc:  # any failure of one candidate costs that candidate only
        last = traceback.extract_tb(exc.__traceback__)[-1]
        out = {"error": f"{type(exc).__name__}: {exc} (at {os.path.basename(last.filename)}:{last.lineno})"}
    out["seconds"] = time.perf_counter() - started  # inside evaluate, where it ran (the worker)
    return out


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
    constraints: Sequence[Constraint] = (),
    estimate: Optional[Callable[[dict], dict]] = None,
    screen_duplicates: bool = False,
    max_screened: Optional[int] = None,
    study_budget: Optional[int] = None,
    owner: Optional[str] = None,
    max_retries: int = 1,
    max_failed: Optional[int] = None,
    time_limit_s: Optional[float] = None,
) -> list[TrialRecord]:
    """Evaluate new trials of ``study`` until ``n_trials`` complete; their records, screened and failed ones included.

    A failed evaluation (it raised, returned no objective, or its worker died past its
    retries) does not count towards ``n_trials``: the search goes on, and stops early only
    after ``max_failed`` (default :func:`failure_cap`) failures in this call.

    ``estimate``, ``constraints`` and ``screen_duplicates`` turn on screening (see
    :class:`_Teller`); screened trials do not count towards ``n_trials`` and at most
    ``max_screened`` (default ``max(100, 10 * n_trials)``) are screened. ``listener`` is
    called with every record, screened ones too, as it is made.

    With ``executor="ray"``, a trial whose worker process dies (killed, crashed) is run again
    up to ``max_retries`` times, then recorded as failed with the reason; with ``"local"`` the
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
                     screen_duplicates=screen_duplicates, max_screened=max_screened, study_budget=study_budget, owner=owner)
    if kind is Executor.LOCAL:
        while teller.count(TrialState.COMPLETE) < n_trials and teller.count(TrialState.FAILED) < max_failed:
            asked = teller.ask()
            if asked is None:
                break
            number, params = asked
            teller.tell(number, params, _call(evaluate, params, time_limit_s))
        return teller.records
    _run_ray(teller, evaluate, n_trials=n_trials, workers=workers, threads=threads_per_worker, storage=ray_storage,
             max_retries=max_retries, max_failed=max_failed, time_limit_s=time_limit_s)
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
    tune.report({"outcome": json.dumps(_call(evaluate, config["params"], time_limit_s))})


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
             max_retries: int = 1, max_failed: int = 10, time_limit_s: Optional[float] = None):
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
        raises is not a Tune failure: :func:`_call` turns it into a recorded error, once.
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
                                                         time_limit_s=time_limit_s), {"cpu": threads})
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


def start_ray(num_cpus: int, address: Optional[str] = None) -> bool:
    """Start Ray in this process unless it runs already; True when this call started it.

    With ``address``, join that running cluster instead (:func:`slimsearch.cluster.connect`);
    ``ray.shutdown()`` then leaves it running.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    kept = _SigtermHandler()
    try:
        if address is not None:
            from slimsearch.cluster import connect

            connect(address)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     configure_logging=True)
    finally:
        kept.restore()
    return True


class _SigtermHandler:
    """The process's Python SIGTERM handler, put back after ``ray.init`` replaced it.

    ``ray.init`` takes SIGTERM over: from the main thread with a handler that exits with
    code 15 at once, from any other thread with a C-level one that prints a stack dump and
    kills the process. Either way a handler the process had set (the ``slimsearch``
    command's, which stops a job as Ctrl-C does: the registry says "stopped", the MLflow
    run "KILLED", exit 143) would never run. A process without one keeps Ray's. Signal
    handlers can be set only from the main thread, so :meth:`restore` does nothing
    elsewhere (:class:`RayStart` calls it from :meth:`RayStart.ready`).
    """

    def __init__(self):
        import signal
        import threading

        main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGTERM) if main else None
        self.handler = handler if callable(handler) else None

    def restore(self) -> None:
        import signal
        import threading

        if self.handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.handler)


class RayStart:
    """A job's Ray: started (:func:`start_ray`), waited for (:meth:`ready`), shut down if this
    object started it (:meth:`stop`).

    ``background=True`` starts it in a thread (about 5 s: its GCS, raylet and worker
    processes, then Ray Tune's import), so a job's own set-up (Optuna study, MLflow store,
    registry) runs meanwhile instead of before it. The thread lives until :meth:`stop` and
    shuts Ray down itself: Linux ties the processes Ray starts to the *thread* that started
    them (``PR_SET_PDEATHSIG``), so they are killed the moment that thread ends. Only for a
    process that starts Ray once: Ray restarted from threads in one process can crash
    (ray-project/ray#31145). ``background=False`` starts it in the calling thread, now.
    """

    def __init__(self, num_cpus: int, background: bool = False):
        import threading

        self._started = False
        self._error: Optional[BaseException] = None
        self._sigterm = _SigtermHandler()  # Ray's start in the thread replaces it; ready() puts it back
        self._up, self._stop = threading.Event(), threading.Event()
        self._thread: Optional[threading.Thread] = None
        if not background:
            self._started = start_ray(num_cpus)
            self._up.set()
            return
        self._thread = threading.Thread(target=self._own, args=(num_cpus,), name="slimsearch-ray", daemon=True)
        self._thread.start()

    def _own(self, num_cpus: int) -> None:
        try:
            self._started = start_ray(num_cpus)
            import ray.tune  # noqa: F401 - its first import takes ~1 s; the search needs it next
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by ready()
            self._error = exc
        finally:
            self._up.set()
        self._stop.wait()
        if self._started:
            import ray

            ray.shutdown()

    def ready(self) -> bool:
        """Wait until Ray is up; True when this object started it (it was not running already)."""
        self._up.wait()
        self._sigterm.restore()
        if self._error is not None:
            raise self._error
        return self._started

    def stop(self, wait: bool = True) -> None:
        """Shut Ray down if this object started it; ``wait=False`` returns at once (a later
        ``stop()`` waits for the shutdown to end)."""
        if self._thread is None:  # started in the calling thread: stopped there, now
            if self._started and not self._stop.is_set():
                import ray

                ray.shutdown()
            self._stop.set()
            return
        self._stop.set()
        if wait:
            self._thread.join()
