"""A multiple-choice knapsack: one option per group, one measure minimised, budgets on the others.

The sensitivity-guided planner (issue 21) predicts each option's effect on a model group by
group (a loss such as the KL divergence to the teacher, and costs such as packed bytes or
modelled decode time) and assumes the effects add up across groups. Choosing the best
combination is then the multiple-choice knapsack problem: pick exactly one option in every
group, minimise the sum of one measure subject to upper bounds on the sums of others. NVIDIA
ModelOpt's AutoQuantize (a score per layer and format, a knapsack under an effective-bits budget)
and AMD Quark's top-k search pose the same problem.

Why an integer program: the problem is NP-hard in general, and greedy or Lagrangian rounding
can both overshoot a budget and miss the optimum by a lot on a few hundred groups; a
mixed-integer solver gives the exact optimum of the prediction (``mip_rel_gap`` 0) in
milliseconds at this size, and says when no plan fits. Why HiGHS (``highspy``): an exact,
maintained open-source MIP solver under the MIT licence, binary wheels for every platform and
Python this project supports, and it requires only numpy (no pin that clashes with ours);
PuLP would shell out to CBC, an external binary.

Options may carry a *mode*: a setting that must be the same in every group whose chosen option
has one (a decoder's weight method and group size are model-wide in its plan). Options without a
mode (e.g. leaving a group in float) go with any mode. A measure may have a constant part
(``base``) that no choice changes, added to every total.

Everything here is a prediction from the per-option values; the search measures the plans.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from slimsearch.exceptions import ConfigError

__all__ = ["Problem", "Selection", "solve", "sweep"]

RETRIES = 4  # re-solves with a budget tightened by the solver's tolerance overshoot


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Problem:
    """Groups, their options and what each option adds to each measure.

    Attributes:
        options: group -> option -> measure -> value. Every option of every group names the same
            measures (e.g. ``kl``, ``size_bytes``, ``latency_ms@rpi4``).
        base: measure -> the constant part of its total (0 where not given).
        modes: option name -> its mode; options not named go with any mode.
    """

    options: Mapping[str, Mapping[str, Mapping[str, float]]]
    base: Mapping[str, float] = field(default_factory=dict)
    modes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        options = {str(g): {str(o): {str(m): float(v) if _number(v) else v for m, v in values.items()}
                            for o, values in opts.items()} for g, opts in self.options.items()}
        if not options:
            raise ConfigError("Problem.options must name at least one group, got none")
        measures = None
        for group, opts in options.items():
            if not opts:
                raise ConfigError(f"Problem.options[{group!r}] must hold at least one option, got none")
            for option, values in opts.items():
                if measures is None:
                    measures = tuple(sorted(values))
                if tuple(sorted(values)) != measures:
                    raise ConfigError(f"Problem.options[{group!r}][{option!r}] must give the measures "
                                      f"{list(measures)}, got {sorted(values)}")
                bad = [m for m, v in values.items() if not _number(v)]
                if bad:
                    raise ConfigError(f"Problem.options[{group!r}][{option!r}][{bad[0]!r}] must be a finite number, "
                                      f"got {values[bad[0]]!r}")
        object.__setattr__(self, "options", options)
        base = {str(m): v for m, v in self.base.items()}
        for name, value in base.items():
            if name not in measures or not _number(value):
                raise ConfigError(f"Problem.base[{name!r}] must be a finite number of a measure in "
                                  f"{list(measures)}, got {value!r}")
        object.__setattr__(self, "base", {m: float(v) for m, v in base.items()})
        object.__setattr__(self, "modes", {str(o): str(m) for o, m in self.modes.items()})

    @property
    def measures(self) -> tuple[str, ...]:
        """The measures every option gives, sorted."""
        return tuple(sorted(next(iter(next(iter(self.options.values())).values()))))

    def total(self, chosen: Mapping[str, str], measure: str) -> float:
        """``base + sum over groups`` of ``measure`` for one option per group."""
        self._check_measure(measure, "measure")
        return self.base.get(measure, 0.0) + math.fsum(self.options[g][chosen[g]][measure] for g in self.options)

    def mode_of(self, chosen: Mapping[str, str]) -> Optional[str]:
        """The mode of a choice (None when no chosen option has one); ConfigError when they differ."""
        modes = {self.modes[o] for o in chosen.values() if o in self.modes}
        if len(modes) > 1:
            raise ConfigError(f"chosen options must share one mode, got {sorted(modes)}")
        return next(iter(modes), None)

    def _check_measure(self, measure: str, what: str) -> None:
        if measure not in self.measures:
            raise ConfigError(f"{what} {measure!r} is not a measure of the problem; allowed: {list(self.measures)}")

    def to_json(self) -> str:
        return json.dumps({"options": self.options, "base": self.base, "modes": self.modes}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Problem":
        data = json.loads(text)
        return cls(data["options"], data.get("base", {}), data.get("modes", {}))


@dataclass(frozen=True)
class Selection:
    """One option per group, as the solver chose it.

    Attributes:
        chosen: group -> option.
        minimised: the measure minimised.
        budgets: measure -> its upper bound.
        totals: measure -> predicted total (``base`` included) of every measure.
        mode: the shared mode of the chosen options (None: none has one).
    """

    chosen: Mapping[str, str]
    minimised: str
    budgets: Mapping[str, float]
    totals: Mapping[str, float]
    mode: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "chosen", dict(self.chosen))
        object.__setattr__(self, "budgets", {k: float(v) for k, v in self.budgets.items()})
        object.__setattr__(self, "totals", {k: float(v) for k, v in self.totals.items()})

    @property
    def value(self) -> float:
        """The predicted total of the minimised measure."""
        return self.totals[self.minimised]

    def to_json(self) -> str:
        return json.dumps({"chosen": self.chosen, "minimised": self.minimised, "budgets": self.budgets,
                           "totals": self.totals, "mode": self.mode}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Selection":
        data = json.loads(text)
        return cls(data["chosen"], data["minimised"], data["budgets"], data["totals"], data.get("mode"))


def _check_budgets(problem: Problem, minimise: str, budgets: Mapping[str, float]) -> dict[str, float]:
    problem._check_measure(minimise, "minimise")
    out = {}
    for name, bound in budgets.items():
        problem._check_measure(name, "budget")
        if not _number(bound):
            raise ConfigError(f"budget {name!r} must be a finite number, got {bound!r}")
        out[name] = float(bound)
    return out


_quiet = {"banner_printed": False}


def _highs():
    """A silent HiGHS solver. The first one of a process prints HiGHS's banner to the process's standard
    output (from C++, before any option can be set): that one is made with file descriptor 1 on
    /dev/null for the moment (a line another thread writes to it then is lost)."""
    import highspy

    if _quiet["banner_printed"]:
        return highspy.Highs()
    import os
    import sys

    try:
        sys.stdout.flush()
        saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):  # no descriptor 1 to redirect: let it print
        return highspy.Highs()
    try:
        os.dup2(null, 1)
        h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
    _quiet["banner_printed"] = True
    return h


def _solve_once(problem: Problem, minimise: str, budgets: Mapping[str, float]) -> Optional[dict[str, str]]:
    """The optimal choice, or None when the budgets admit no plan."""
    import highspy
    import numpy as np

    groups = list(problem.options)
    columns = [(g, o) for g in groups for o in problem.options[g]]
    modes = sorted(set(problem.modes[o] for _, o in columns if o in problem.modes))
    n = len(columns) + len(modes)
    h = _highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("mip_abs_gap", 0.0)
    h.setOptionValue("mip_feasibility_tolerance", 1e-9)
    h.setOptionValue("primal_feasibility_tolerance", 1e-9)
    h.setOptionValue("threads", 1)
    costs = np.array([problem.options[g][o][minimise] for g, o in columns] + [0.0] * len(modes))
    h.addCols(n, costs, np.zeros(n), np.ones(n), 0, np.array([], dtype=np.int32), np.array([], dtype=np.int32),
              np.array([], dtype=float))
    h.changeColsIntegrality(n, np.arange(n, dtype=np.int32), np.full(n, highspy.HighsVarType.kInteger))
    inf = highspy.kHighsInf

    def row(lower: float, upper: float, entries: Sequence[tuple[int, float]]) -> None:
        index = np.array([i for i, _ in entries], dtype=np.int32)
        value = np.array([v for _, v in entries], dtype=float)
        h.addRow(lower, upper, len(entries), index, value)

    for g in groups:  # one option per group
        row(1.0, 1.0, [(i, 1.0) for i, (gi, _) in enumerate(columns) if gi == g])
    for name, bound in budgets.items():  # each budget; rows scaled to a unit bound so tolerances are relative
        room = bound - problem.base.get(name, 0.0)
        scale = max(abs(room), 1.0)
        entries = [(i, problem.options[g][o][name] / scale) for i, (g, o) in enumerate(columns)]
        entries = [(i, v) for i, v in entries if v != 0.0]
        if not entries:  # no option changes this measure: the base alone meets the budget or not
            if room < 0:
                return None
            continue
        row(-inf, room / scale, entries)
    if modes:  # one mode; a moded option only with its mode
        first = len(columns)
        row(1.0, 1.0, [(first + k, 1.0) for k in range(len(modes))])
        for i, (_, o) in enumerate(columns):
            if o in problem.modes:
                row(-inf, 0.0, [(i, 1.0), (first + modes.index(problem.modes[o]), -1.0)])
    h.run()
    status = h.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        if status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
            return None
        raise RuntimeError(f"HiGHS ended with status {h.modelStatusToString(status)}")
    x = list(h.getSolution().col_value)
    chosen = {}
    for g in groups:
        picks = [(x[i], o) for i, (gi, o) in enumerate(columns) if gi == g]
        chosen[g] = max(picks)[1]
    return chosen


def solve(problem: Problem, budgets: Mapping[str, float], *, minimise: str) -> Selection:
    """The choice of one option per group with the least total ``minimise`` whose totals stay within
    ``budgets`` (measure -> upper bound, ``base`` included), exactly: the totals are recomputed from
    the options' values and checked, not taken from the solver.

    Raises:
        ConfigError: an unknown measure, or budgets no choice meets.
    """
    budgets = _check_budgets(problem, minimise, budgets)
    tightened = dict(budgets)
    for _ in range(RETRIES):
        chosen = _solve_once(problem, minimise, tightened)
        if chosen is None:
            least = {name: problem.base.get(name, 0.0) + math.fsum(min(v[name] for v in opts.values())
                                                                   for opts in problem.options.values())
                     for name in budgets}
            raise ConfigError(f"no plan meets the budgets {budgets}; each alone needs at least {least} "
                              "(the cheapest option of every group)")
        totals = {m: problem.total(chosen, m) for m in problem.measures}
        over = {name: totals[name] - bound for name, bound in budgets.items() if totals[name] > bound}
        if not over:
            return Selection(chosen, minimise, budgets, totals, problem.mode_of(chosen))
        for name, excess in over.items():  # within the solver's tolerance but over: tighten and re-solve
            tightened[name] -= max(excess, abs(budgets[name]) * 1e-12)
    raise RuntimeError(f"HiGHS kept returning plans over the budgets {budgets} by the solver's tolerance")


def sweep(problem: Problem, over: str, *, minimise: str, points: int = 16,
          budgets: Optional[Mapping[str, float]] = None) -> tuple[Selection, ...]:
    """The predicted front: :func:`solve` at ``points`` budgets on ``over``, evenly spaced from the least
    any choice can cost to what the choice best in ``minimise`` costs, under the fixed ``budgets`` on other
    measures. Distinct choices only, in budget order: each has more ``over`` and no more ``minimise``
    than the one before (a larger budget cannot raise the optimum). Budgets below every feasible plan
    are skipped."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ConfigError(f"sweep points must be an integer >= 2, got {points!r}")
    fixed = _check_budgets(problem, minimise, budgets or {})
    problem._check_measure(over, "over")
    if over in fixed:
        raise ConfigError(f"sweep over {over!r} must not also be a fixed budget; fixed: {sorted(fixed)}")
    best = solve(problem, fixed, minimise=minimise)
    low = problem.base.get(over, 0.0) + math.fsum(min(v[over] for v in opts.values())
                                                   for opts in problem.options.values())
    high = best.totals[over]
    found: list[Selection] = []
    for k in range(points):
        bound = high if k == points - 1 else low + (high - low) * k / (points - 1)
        try:
            selection = solve(problem, {**fixed, over: bound}, minimise=minimise)
        except ConfigError:
            continue
        if found and selection.chosen == found[-1].chosen:
            continue
        if found and selection.value >= found[-1].value:  # no better for more budget: keep the cheaper one
            continue
        found.append(selection)
    return tuple(found)
