"""The values the search driver passes around: dimensions, constraints, trial records, results,
and the names of what it records on each Optuna trial."""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Optional, Sequence, Union

from slimsearch.exceptions import ConfigError
from slimsearch.search._online import CalibrationFit


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


_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt}
CONSTRAINT_OPS = tuple(_OPS)
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.\-]*(?:@[\w.\-]+)?)\s*(<=|>=|==|<|>)\s*(\S+)\s*$")
CONSTRAINT_SYNTAX = "'<metric> <op> <number>' with op one of <=, >=, ==, <, > (e.g. 'latency_ms <= 20')"


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

    def holds(self, values: Mapping[str, Any]) -> bool:
        """Whether ``values`` meet it (a missing metric does not)."""
        return self.violation(values) == 0.0

    def shortfall(self, values: Mapping[str, Any]) -> float:
        """How far ``values`` miss it, relative to its limit (0 when met, inf when the metric is absent)."""
        violation = self.violation(values)
        return float("inf") if violation is None else violation / (abs(self.limit) or 1.0)

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
    """What a search found: every trial in order, the feasible non-dominated evaluated ones, and
    the refits of the estimate's online calibration (:class:`CalibrationFit`, in order)."""

    trials: list[TrialRecord]
    objectives: dict[str, str]
    front: list[TrialRecord] = field(default_factory=list)
    constraints: tuple[Constraint, ...] = ()
    calibration: tuple[CalibrationFit, ...] = ()  # each refit of the estimate's online calibration

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
ESTIMATE_ATTR = "estimate"  # what estimate returned
CORRECTED_ATTR = "estimate_corrected"  # the metrics online calibration corrected, as the screen saw them
SCREENED_ATTR = "screened"
FEASIBLE_ATTR = "feasible"
PROVENANCE_ATTR = "provenance"
DRIVER_ATTR = "driver"  # host:pid of the driver that asked the trial (several may share a study)
OWNER_ATTR = "owner"  # the job (folder) that asked it: what --resume of that job may recover
