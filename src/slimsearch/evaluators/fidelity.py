"""Multi-fidelity: a causal-LM candidate is scored first on a share of the validation text and
promoted to the full evaluation only if it could still meet the job's perplexity bound and ranks
among the best of the candidates its job has scored so far.

The rule, as a job records it (:meth:`Screen.rule`): on the first ``share`` of the validation
windows, the candidate's perplexity over the teacher's on the same windows, less one, is its cheap
``ppl_increase``. It is promoted only if

1. that cheap increase is at most ``slack`` times the job's ``ppl_increase <= bound``;
2. fewer than ``max(1, floor(keep x n))`` of the ``n`` candidates judged so far (this one
   included) were promoted: a quota, so that a job whose last promoted candidate was sampled has
   evaluated at most ``max(1, floor(keep x n))`` of its ``n`` candidates in full;
3. its cheap point (cheap increase, and each of the job's objectives that are known before timing:
   exact sizes, modelled device figures) is among the best ``max(1, floor(keep x n))`` of the
   points within the bound, best first as NSGA-II selects: by non-dominated front, then by
   crowding distance, then by cheap increase.

A plan the planner proposed skips 2 and 3 (its sensitivity pass is a cheaper fidelity that ranked
it already; a job enqueues at most its budget of them, first) and counts among the promoted, so
the candidates sampled after it wait for the quota.

A candidate that is not promoted has its cheap figures (``ppl_screen``, ``ppl_increase_screen``,
``fidelity`` = ``share``) and its exact or modelled costs recorded, nothing is timed, and the search
counts it as screened, not as one of its budget's evaluations: a budget of ``B`` full evaluations
asks for about ``B / keep`` candidates. A promoted candidate is evaluated in full (``fidelity`` 1.0),
its cheap figures kept beside the full ones.

Why a ratio on the same windows: perplexity varies from window to window far more than the
candidate's ratio to its teacher does, so a quarter of the text tells the ratio well enough to
reject what is far beyond the bound (slack 2: the bound is a hard constraint, and a candidate
rejected here is never seen again). Why a rank as well: a sampler that proposes the front's
neighbours proposes plans whose full-text figures differ by less than the quarter's error, so no
rule that asks only "could this still reach the front?" rejects them; successive halving (and its
multi-objective form, MO-ASHA, Schmucker et al. 2021, which ranks a rung this way) spends the full
evaluations on the best cheap points instead, comparing cheap figures only with cheap figures.
The ranking is asynchronous: each candidate is judged against those judged before it (a job writes
them to its folder, :mod:`slimsearch.jobs.rung`), never promoted later.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from slimsearch.tasks import Task

__all__ = ["FIDELITY", "Rung", "Screen"]

FIDELITY = "fidelity"  # share of the validation text a candidate's recorded figures come from
CHEAP_INCREASE = "ppl_increase_screen"
SHARE = 0.25
SLACK = 2.0
KEEP = 0.4  # successive halving's 1 / eta: the share of a job's candidates evaluated in full


@dataclass(frozen=True)
class Rung:
    """What a job has judged before this candidate: each earlier candidate's cheap point (its
    ``ppl_increase_screen`` and objective values), how many of them were promoted, and whether
    this candidate is a plan of the planner's."""

    points: tuple[Mapping[str, float], ...] = ()
    promoted: int = 0
    planned: bool = False


@dataclass(frozen=True)
class Screen:
    """The promotion rule of one job: its ``ppl_increase <= max_increase``, the screen's ``share`` and
    ``slack``, the promoted share ``keep``, and the job's cost ``objectives`` (name -> ``min``/``max``)
    its rank compares beside the cheap increase; ``rung``, what the job judged before the
    candidate it judges next (default: nothing)."""

    max_increase: float
    share: float = SHARE
    slack: float = SLACK
    keep: float = KEEP
    objectives: tuple[tuple[str, str], ...] = ()
    rung: Rung = field(default_factory=Rung)

    def __post_init__(self) -> None:
        for name, value, ok in (("max_increase", self.max_increase, self.max_increase >= 0),
                                ("share", self.share, 0 < self.share < 1), ("slack", self.slack, self.slack >= 1),
                                ("keep", self.keep, 0 < self.keep <= 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
                raise ConfigError(f"screen {name}: {value!r} is not allowed; allowed: max_increase >= 0, "
                                  "0 < share < 1, slack >= 1, 0 < keep <= 1")
        bad = [d for _, d in self.objectives if d not in ("min", "max")]
        if bad:
            raise ConfigError(f"screen objectives: direction {bad[0]!r} is not allowed; allowed: 'min', 'max'")

    def rule(self) -> str:
        """The rule in words, as the job records it in MLflow."""
        ranked = ", ".join([CHEAP_INCREASE, *(name for name, _ in self.objectives)])
        return (f"scored first on {self.share:.0%} of the validation windows; promoted to the full text only if its "
                f"perplexity over the teacher's on those windows, less one, is at most {self.slack:g} x "
                f"{self.max_increase:g} = {self.slack * self.max_increase:g}, fewer than max(1, floor("
                f"{self.keep:g} x n)) of the n candidates judged so far were promoted, and its cheap point "
                f"({ranked}) ranks among the best max(1, floor({self.keep:g} x n)) of those within the bound "
                "(non-dominated front, then crowding distance, then cheap increase); the planner's plans need only "
                "the first and count among the promoted")

    def judge(self, model: "nn.Module", task: "Task",
              costs: Optional[Mapping[str, Optional[float]]] = None) -> tuple[dict[str, float], Optional[str]]:
        """The cheap figures of ``model`` and why it is not promoted after ``rung`` (None: promoted);
        ``costs`` are its untimed costs, which its rank compares beside the cheap increase."""
        from slimsearch.tasks import Split

        n = max(1, round(len(task.val.x) * self.share))
        part = Split(x=task.val.x[:n], y=task.val.y[:n])
        ppl = task.scorer(model, part, False)["ppl"]
        increase = ppl / _teacher_ppl(task, n) - 1
        figures = {"ppl_screen": ppl, CHEAP_INCREASE: increase}
        why = self.promotion({**(costs or {}), CHEAP_INCREASE: increase})
        if why is not None:
            return ({**figures, FIDELITY: n / len(task.val.x)},
                    f"not promoted: {why} (on {n} of {len(task.val.x)} validation windows)")
        return figures, None

    def promotion(self, point: Mapping[str, Optional[float]]) -> Optional[str]:
        """Why the candidate with the cheap ``point`` is not promoted after ``rung`` (None: promoted)."""
        rung = self.rung
        increase = point[CHEAP_INCREASE]
        bar = self.slack * self.max_increase
        if not increase <= bar:
            return f"ppl_increase {increase:.4f} exceeds {self.slack:g} x {self.max_increase:g}"
        if rung.planned:
            return None
        n = len(rung.points) + 1
        best = max(1, math.floor(self.keep * n + 1e-9))
        if rung.promoted >= best:
            return (f"{rung.promoted} of the {n} candidates judged so far were promoted, "
                    f"the most max(1, floor({self.keep:g} x n)) allows")
        known = [(k, d) for k, d in self.objectives if _finite(point.get(k))]
        keys = [CHEAP_INCREASE, *(k for k, _ in known)]
        signs = [1.0, *(-1.0 if d == "max" else 1.0 for _, d in known)]
        rivals = [p for p in rung.points if all(_finite(p.get(k)) for k in keys) and p[CHEAP_INCREASE] <= bar]
        points = [tuple(s * float(p[k]) for k, s in zip(keys, signs)) for p in (*rivals, point)]
        place = best_first(points).index(len(points) - 1)
        if place >= best:
            return (f"its cheap point ranks {place + 1} of the {len(points)} within the bound on ({', '.join(keys)}); "
                    f"the best {best} are promoted")
        return None


def cheap_point(values: Mapping[str, object], objectives: Sequence[str]) -> Optional[dict[str, float]]:
    """What a :class:`Rung` keeps of a judged candidate's recorded ``values``: its cheap increase and
    the finite values of ``objectives`` (None: it was never scored cheaply)."""
    if not _finite(values.get(CHEAP_INCREASE)):
        return None
    return {k: float(values[k]) for k in (CHEAP_INCREASE, *objectives) if _finite(values.get(k))}


def best_first(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of ``points`` (all minimised), best first as NSGA-II selects: by non-dominated front,
    within a front by crowding distance (the larger first), then by the first objective; ties keep
    the given order. Written here, not taken from ``search.pareto``: evaluators sit below search."""
    left = list(range(len(points)))
    order: list[int] = []
    while left:
        front = [i for i in left if not any(_dominates(points[j], points[i]) for j in left)]
        distance = _crowding(points, front)
        order += sorted(front, key=lambda i: (-distance[i], points[i][0]))
        left = [i for i in left if i not in front]
    return order


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def _crowding(points: Sequence[Sequence[float]], front: list[int]) -> dict[int, float]:
    distance = {i: 0.0 for i in front}
    for m in range(len(points[front[0]])):
        ranked = sorted(front, key=lambda i: points[i][m])
        low, high = points[ranked[0]][m], points[ranked[-1]][m]
        distance[ranked[0]] = distance[ranked[-1]] = math.inf
        if high > low:
            for before, i, after in zip(ranked, ranked[1:-1], ranked[2:]):
                distance[i] += (points[after][m] - points[before][m]) / (high - low)
    return distance


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_TEACHER_PPL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # teacher -> {windows: perplexity}


def _teacher_ppl(task: "Task", n: int) -> float:
    """The teacher's perplexity on the first ``n`` validation windows (once per process and teacher)."""
    from slimsearch.tasks import Split

    known = _TEACHER_PPL.setdefault(task.teacher, {})
    if n not in known:
        known[n] = task.scorer(task.teacher, Split(x=task.val.x[:n], y=task.val.y[:n]), False)["ppl"]
    return known[n]
