"""Early stopping inside a candidate: stop fine-tuning one that cannot plausibly reach the front.

Why this is ours: Optuna's pruners (median, percentile, Hyperband) compare one intermediate
value across trials and know nothing of the rest of a candidate. A compression candidate is
different: all its costs are fixed before it is fine-tuned (size, MACs and the modelled
device figures follow from the plan; local latency is one timing of the graph away), and
only the task metric moves while it trains. So after a quarter, half and three quarters of
its distillation steps a worker can ask whether the candidate, with its known costs and the
best metric it could plausibly still reach, would be dominated by the current front or
break a constraint. If so, fine-tuning stops there.

"Plausibly reach": the metric now, plus the largest share of its remaining gap to the
teacher's metric that a finished candidate of the job closed from the same point of its
training to its end, times this candidate's gap, plus ``margin``; only finished candidates
that were at least as far behind the teacher at that point count, and with none, nothing
is stopped. Relative, and never extrapolated: distillation pulls a student towards its
teacher, and one far behind gains far more than one close to it (MNIST, measured: a 2-bit
candidate at 0.86 after a quarter of its steps ended at 0.98, while finished candidates,
all within 0.03 of the teacher then, had closed at most 75% of their gaps, or 0.015 in
absolute terms; absolute gains stopped it and another future front member in one run).
Nothing is stopped before ``MIN_CURVES`` candidates have finished.

The two sides share the job folder (as the front models do, ``jobs.folder.model_file``):
the driver writes :data:`SNAPSHOT_FILE` (front, constraints, gains) after every finished
candidate; each worker reads it at its checks and leaves its learning curve in
:data:`CURVES_DIR` for the gains. A stopped candidate is still measured and recorded, with
``stopped_early = 1`` and the steps it got; the job adds the constraint
``stopped_early <= 0``, so it never enters the front, and samplers see it as infeasible.
It counts towards the budget: it was fine-tuned, for part of its steps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from slimsearch._io import atomic_write
from slimsearch.metric_names import TaskFamily

SNAPSHOT_FILE = "early_stop.json"
CURVES_DIR = "curves"
CHECKS = (0.25, 0.5, 0.75)  # where a candidate is checked, as shares of its distillation steps
MIN_CURVES = 3  # finished candidates needed before the gains are trusted
STOPPED_METRIC = "stopped_early"  # 1.0: stopped; 0.0: fine-tuned to the end
STEPS_METRIC = "distill_steps_done"
CONSTRAINT = f"{STOPPED_METRIC} <= 0"
LOCAL_SUFFIX = "@local"


def curve_file(out: Path, plan) -> Path:
    """Where a worker leaves ``plan``'s learning curve in job folder ``out`` (named by a hash of the plan)."""
    return Path(out) / CURVES_DIR / (hashlib.sha256(plan.to_json().encode()).hexdigest()[:20] + ".json")


def _atomic_write(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, sort_keys=True))


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# -- driver side ---------------------------------------------------------------------------


def gains(curves: Sequence[Mapping], direction: str, teacher: float) -> dict[str, list[list[float]]]:
    """Per check (as ``"0.25"``...), ``[gap, closed]`` for each finished candidate of ``curves``
    (``{"points": [[share, value], ...], "final": value}``) that was behind ``teacher`` at that
    check: its gap then and the share of it closed by the end. A check with fewer than
    :data:`MIN_CURVES` such candidates is left out."""
    sign = 1.0 if direction == "max" else -1.0
    out = {}
    for share in CHECKS:
        seen = sorted([sign * (teacher - v), sign * (c["final"] - v) / (sign * (teacher - v))]
                      for c in curves for s, v in c["points"] if abs(s - share) < 1e-9 and sign * (teacher - v) > 0)
        if len(seen) >= MIN_CURVES:
            out[f"{share:g}"] = seen
    return out


def plausible_share(seen: Sequence[Sequence[float]], gap: float) -> Optional[float]:
    """The largest share ``closed`` of the ``[gap, closed]`` pairs ``seen`` at least ``gap`` behind; None
    without one (a candidate further behind than any finished one is not judged)."""
    shares = [closed for g, closed in seen if g >= gap]
    return max(0.0, max(shares)) if shares else None


def write_snapshot(out: Path, *, metric: str, direction: str, teacher: float, objectives: Mapping[str, str],
                   constraints: Sequence[str], front: Sequence[Mapping[str, float]],
                   curves: Sequence[Mapping], margin: float, family: str = TaskFamily.CLASSIFICATION.value) -> None:
    """What workers compare a candidate against: the feasible front's objective values, the job's
    constraints and, per check, the gaps to the teacher finished candidates closed (:func:`gains`).
    ``family`` (the task's) names and measures the gap to the teacher (``accuracy_drop``, ...)."""
    _atomic_write(Path(out) / SNAPSHOT_FILE, {
        "metric": metric, "direction": direction, "family": TaskFamily(family).value, "teacher": teacher,
        "objectives": dict(objectives),
        "constraints": list(constraints), "front": [dict(f) for f in front], "margin": margin,
        "gains": gains(curves, direction, teacher), "finished": len(curves)})


class FrontSnapshot:
    """The driver's side: gathers each finished candidate's curve (``complete``: trial records, with
    ``plan_of(params)`` giving a record's plan) and rewrites :data:`SNAPSHOT_FILE` with ``front``.
    ``family`` is the task's: which way its metric points and how its gap is named."""

    def __init__(self, out: Path, plan_of: Callable[[dict], Any], *, metric: str, teacher: float,
                 objectives: Mapping[str, str], constraints: Sequence[str], margin: float, complete: Sequence,
                 front: Sequence, family: TaskFamily = TaskFamily.CLASSIFICATION):
        self.out, self.plan_of, self.metric = Path(out), plan_of, metric
        family = TaskFamily(family)
        self.common = {"metric": metric, "direction": family.direction, "family": family.value, "teacher": teacher,
                       "objectives": dict(objectives), "constraints": list(constraints), "margin": margin}
        self.curves: dict[int, dict] = {}
        for record in complete:
            self._curve(record)
        self._write(front)

    def add(self, record, front: Sequence) -> Optional[str]:
        """Take a finished candidate and the front after it; why it was stopped, if it was."""
        left = self._curve(record)
        self._write(front)
        if record.values.get(STOPPED_METRIC):
            return (left or {}).get("reason") or "stopped early"
        return None

    def _curve(self, record) -> Optional[dict]:
        """What the worker left for ``record``; a finished one's curve joins the gains."""
        left = _read(curve_file(self.out, self.plan_of(record.params)))
        final = record.values.get(self.metric)
        if left is not None and left.get("stopped_at") is None and final is not None:
            self.curves[record.number] = {"points": left["points"], "final": final}
        return left

    def _write(self, front: Sequence) -> None:
        write_snapshot(self.out, front=[{m: r.values.get(m) for m in self.common["objectives"]} for r in front],
                       curves=list(self.curves.values()), **self.common)


# -- worker side ---------------------------------------------------------------------------


class EarlyStop:
    """The ``on_chunk`` of one candidate's fine-tuning (see :func:`slimsearch.compress.distill.distill`).

    ``steps`` is the candidate's distillation steps; :attr:`every` the steps between checks
    (0 for fewer than 4 steps: such a candidate is not checked).
    After fine-tuning, :meth:`finish` leaves the curve for the driver and says whether and
    why the candidate was stopped.
    """

    def __init__(self, out: Path, task, plan, profiles: Sequence[Any], reference=None, device=None):
        self.out, self.task, self.plan, self.profiles = Path(out), task, plan, profiles
        self.device = device  # where the student trains and is scored; its costs and timings are the CPU's
        self.reference = reference  # the teacher to pair local latencies with, as the full evaluation does
        self.steps = plan.distill.steps
        self.every = self.steps // 4  # 0 (under 4 steps): never checked
        self.points: list[list[float]] = []
        self.stopped_at: Optional[int] = None
        self.reason: Optional[str] = None
        self._costs: Optional[dict] = None
        self._measured: Optional[dict] = None

    def __call__(self, step: int, student) -> bool:
        from slimsearch.evaluators import score

        check = step // self.every
        if not 1 <= check <= len(CHECKS):
            return True
        share = CHECKS[check - 1]
        from slimsearch.tasks import task_on

        work = self.task if self.device is None else task_on(self.task, self.device)
        value = score(student, work.val, work)
        self.points.append([share, value])
        snapshot = _read(self.out / SNAPSHOT_FILE)
        seen = (snapshot or {}).get("gains", {}).get(f"{share:g}")
        if seen is None:
            return True
        sign = 1.0 if snapshot["direction"] == "max" else -1.0
        gap = max(0.0, sign * (snapshot["teacher"] - value))
        closed = plausible_share(seen, gap) if gap > 0 else 0.0
        if closed is None:
            return True
        reason = self._hopeless(snapshot, value, closed * gap, student)
        if reason is None:
            return True
        self.stopped_at, self.reason = step, f"stopped at step {step} of {self.steps}: {reason}"
        return False

    def finish(self) -> dict[str, float]:
        """Leave the curve in the job folder; the metrics that record the stop."""
        (self.out / CURVES_DIR).mkdir(exist_ok=True)
        _atomic_write(curve_file(self.out, self.plan), {"steps": self.steps, "points": self.points,
                                                       "stopped_at": self.stopped_at, "reason": self.reason})
        done = self.steps if self.stopped_at is None else self.stopped_at
        return {STOPPED_METRIC: 0.0 if self.stopped_at is None else 1.0, STEPS_METRIC: float(done)}

    def _hopeless(self, snapshot: Mapping, value: float, gain: float, student) -> Optional[str]:
        """Why the candidate cannot plausibly reach the front, or None."""
        from slimsearch.search._types import Constraint

        metric, teacher = snapshot["metric"], snapshot["teacher"]
        sign = 1.0 if snapshot["direction"] == "max" else -1.0
        best = value + sign * (gain + snapshot["margin"])
        reachable = f"{metric} {value:.4f} now, at best {best:.4f} at the end"
        family = TaskFamily(snapshot.get("family", TaskFamily.CLASSIFICATION.value))
        known = {metric: best, family.gap_name(metric): family.gap(best, teacher)}
        for text in snapshot["constraints"]:
            c = Constraint.parse(text)
            if c.metric in known and c.violation(known):
                return f"{reachable}, which breaks {c}"
        objectives = snapshot["objectives"]
        front = snapshot["front"]
        if not front:
            return None
        known.update(self.costs(student))
        unknown = [m for m in objectives if m not in known]
        if any(not m.endswith(LOCAL_SUFFIX) for m in unknown):
            return None  # a metric only the full evaluation gives (a task's extra metric, a device node's timing)
        # the front members at least as good on what is known so far; then time it, if that is left
        rivals = [f for f in front if _covers(f, known, {m: d for m, d in objectives.items() if m in known},
                                              strictly=False)]
        if rivals and unknown:
            known.update(self.measured(student))
        rivals = [f for f in rivals if _covers(f, known, objectives)]
        if not rivals:
            return None
        return f"{reachable}; front member with {_describe(rivals[0], objectives)} is as good or better on every objective"

    def costs(self, student) -> dict[str, float]:
        """The candidate's size, MACs and modelled device figures: fixed by the plan, computed once
        on a finalized copy (training changes weights, not shapes)."""
        if self._costs is None:
            from slimsearch.evaluators.costs import task_costs

            costs = task_costs(self._finalized(student), self.task, self.profiles, self.plan.power_modes)
            self._costs = {k: v for k, v in costs.values.items() if v is not None}
        return self._costs

    def measured(self, student) -> dict[str, float]:
        """The candidate's local latencies, timed once on a finalized copy (only asked for when every
        other objective already shows it dominated)."""
        if self._measured is None:
            from slimsearch.evaluators.candidate import measure_local

            self._measured = measure_local(self._finalized(student), self.task, reference=self.reference)
        return self._measured

    def _finalized(self, student):
        from slimsearch.compress import finalize
        from slimsearch.tasks import task_on

        return finalize(copy.deepcopy(student).to("cpu"), task_on(self.task, "cpu"))


def _covers(member: Mapping[str, float], known: Mapping[str, float], objectives: Mapping[str, str],
            strictly: bool = True) -> bool:
    """``member`` is at least as good as ``known`` on every objective and (``strictly``) better on one (NaN: never)."""
    better = False
    for m, d in objectives.items():
        a, b = member.get(m), known.get(m)
        if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
            return False
        if (a < b) if d == "max" else (a > b):
            return False
        better = better or a != b
    return better or not strictly


def _describe(member: Mapping[str, float], objectives: Mapping[str, str]) -> str:
    return ", ".join(f"{m} {member[m]:.4g}" for m in objectives)
