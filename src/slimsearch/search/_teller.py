"""Asking the study for candidates and telling it their outcomes, shared by both executors."""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from typing import Any, Callable, Mapping, Optional, Sequence

from slimsearch.search._limits import within_time_limit
from slimsearch.search._online import CalibrationFit, OnlineCalibration
from slimsearch.search._study import _set_constraints, records
from slimsearch.search._types import (CORRECTED_ATTR, DRIVER_ATTR, DURATION_ATTR, ERROR_ATTR, ESTIMATE_ATTR,
                                      EVALUATE_ATTR, FEASIBLE_ATTR, METRICS_ATTR, OWNER_ATTR, PROVENANCE_ATTR,
                                      SCREENED_ATTR, Constraint, Range, Space, TrialRecord, TrialState)


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


def distributions(space: Mapping[str, Any]) -> dict:
    """The Optuna distributions :func:`suggest` creates for ``space``."""
    import optuna.distributions as od

    out = {}
    for name, dim in space.items():
        if isinstance(dim, Range):
            if dim.integer:
                out[name] = od.IntDistribution(dim.low, dim.high, log=dim.log, step=dim.step or 1)
            else:
                out[name] = od.FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
        else:
            out[name] = od.CategoricalDistribution(list(dim))
    return out


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

    With ``calibration`` the screen judges the corrected estimate, and each trial that
    completes gives the calibration its (estimated, measured) pairs, the trials already in
    the study first; ``on_calibration`` is called with each refit. A trial keeps the raw
    estimate (``estimate``) and the values ``evaluate`` returned; the corrected estimate it
    was screened on is recorded apart (``estimate_corrected``).
    """

    def __init__(self, study, space: Space, objectives: Mapping[str, str], listener, *,
                 constraints: Sequence[Constraint] = (), estimate: Optional[Callable[[dict], dict]] = None,
                 screen_duplicates: bool = False, max_screened: Optional[int] = None,
                 study_budget: Optional[int] = None, owner: Optional[str] = None,
                 calibration: Optional[OnlineCalibration] = None,
                 on_calibration: Optional[Callable[[CalibrationFit], None]] = None):
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
        self.calibration, self.on_calibration = calibration, on_calibration
        if screen_duplicates or estimate is not None or calibration is not None:
            for r in records(study):
                if r.state is not TrialState.FAILED:
                    self.seen.setdefault(_key(r.params), r.number)
                if r.state is TrialState.COMPLETE and r.feasible:
                    self.complete.append(r)
                if r.state is TrialState.COMPLETE and calibration is not None:  # refits reported when made
                    calibration.add(r.estimate or self._raw_estimate(r.params, r.values, r.provenance), r.values,
                                    r.provenance)

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
                estimate = call_evaluate(self.estimate, params).get("values") or {}
                estimate = {k: v for k, v in estimate.items() if v is not None}
                corrected = self.calibration.correct(estimate) if self.calibration is not None else estimate
                reason = self._screen(corrected, estimate)
                if corrected != estimate:
                    trial.set_user_attr(CORRECTED_ATTR, {k: v for k, v in corrected.items() if v != estimate[k]})
            if estimate:
                trial.set_user_attr(ESTIMATE_ATTR, estimate)
            self.seen.setdefault(key, trial.number)
            if reason is None:
                self.running[trial.number] = (trial, time.time())
                return trial.number, params
            self._record_screened(trial, params, estimate, reason)
            if self.max_screened is not None and self.n_screened >= self.max_screened:
                return None

    def _screen(self, estimate: Mapping[str, float], raw: Mapping[str, float]) -> Optional[str]:
        for c in self.constraints:
            v = c.violation(estimate)
            if v:
                was = "" if estimate[c.metric] == raw[c.metric] else f" (corrected from {raw[c.metric]:.4g})"
                return f"estimated infeasible: {c.metric} = {estimate[c.metric]:.4g}{was} breaks {c}"
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

        judged = {**estimate, **trial.user_attrs.get(CORRECTED_ATTR, {})}  # what the screen saw
        feasible = _set_constraints(trial, [c for c in self.constraints if c.metric in judged], judged)
        trial.set_user_attr(SCREENED_ATTR, reason)
        trial.set_user_attr(FEASIBLE_ATTR, feasible)
        self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        self.n_screened += 1
        self._emit(TrialRecord(trial.number, params, {}, TrialState.SCREENED, estimate=dict(estimate),
                               feasible=feasible, screened=reason))

    def _record_cheap(self, trial, params: dict, values: dict, outcome: dict, duration: float) -> TrialRecord:
        """A candidate evaluate scored only cheaply and did not promote (``outcome["screened"]`` says
        why): pruned, with its cheap values; like a screened trial, it takes no place of the budget."""
        import optuna

        reason = outcome["screened"]
        provenance = dict(outcome.get("provenance") or {})
        trial.set_user_attr(METRICS_ATTR, values)
        if provenance:
            trial.set_user_attr(PROVENANCE_ATTR, provenance)
        feasible = _set_constraints(trial, [c for c in self.constraints if c.metric in values], values)
        trial.set_user_attr(SCREENED_ATTR, reason)
        trial.set_user_attr(FEASIBLE_ATTR, feasible)
        self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        self.n_screened += 1
        return self._emit(TrialRecord(trial.number, params, dict(values), TrialState.SCREENED, duration_s=duration,
                                      feasible=feasible, screened=reason, provenance=provenance))

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
        if error is None and outcome.get("screened"):
            return self._record_cheap(trial, params, values, outcome, duration)
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
        if error is None and self.calibration is not None:
            if not estimate:  # not estimated when asked (a job that does not screen): now, once
                estimate = self._raw_estimate(params, values, provenance)
                if estimate:
                    trial.set_user_attr(ESTIMATE_ATTR, estimate)
            self._calibrate(estimate, values, provenance)
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

    def _raw_estimate(self, params: dict, values: Mapping[str, float], provenance) -> dict:
        fn = self.estimate or self.calibration.estimate
        if fn is None or not self.calibration.could_learn(values, provenance):
            return {}
        return {k: v for k, v in (call_evaluate(fn, params).get("values") or {}).items() if v is not None}

    def _calibrate(self, estimate: Mapping[str, float], values: Mapping[str, float], provenance) -> None:
        for fit in self.calibration.add(estimate, values, provenance):
            if self.on_calibration is not None:
                self.on_calibration(fit)


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


def call_evaluate(evaluate: Callable[[dict], dict], params: dict, time_limit_s: Optional[float] = None) -> dict:
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
        if getattr(result, "screened", None):
            out["screened"] = result.screened
    except Exception as exc:  # any failure of one candidate costs that candidate only
        last = traceback.extract_tb(exc.__traceback__)[-1]
        out = {"error": f"{type(exc).__name__}: {exc} (at {os.path.basename(last.filename)}:{last.lineno})"}
    out["seconds"] = time.perf_counter() - started  # inside evaluate, where it ran (the worker)
    return out
