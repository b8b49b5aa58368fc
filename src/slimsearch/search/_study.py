"""The Optuna study a search lives in: opening it (RDB storage), reading its trials, recovering
ones an interrupted driver left running."""

from __future__ import annotations

import time
import warnings
from typing import Any, Mapping, Optional, Sequence

from slimsearch.exceptions import ConfigError
from slimsearch.search._types import (DURATION_ATTR, ERROR_ATTR, ESTIMATE_ATTR, FEASIBLE_ATTR, METRICS_ATTR,
                                      OWNER_ATTR, PROVENANCE_ATTR, SCREENED_ATTR, Constraint, TrialRecord,
                                      TrialState)


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
