"""The planner's start of a causal-LM job searched by ``auto``: plans predicted on the front, run first.

Before its first candidate, the job measures what each choice of its space costs each linear
group, across blocks, or in each block where the space chooses weight bits per block
(``space.per_block``) (:func:`~slimsearch.evaluators.llm_sensitivity.llm_sensitivity` on a few
calibration windows: the weight bits, methods and group sizes the space lists, its KV-cache
precisions and its output projection widths), cached in the job folder so that a resumed job
reads it back. Two uses:

- **Warm start.** The integer program (:func:`~slimsearch.search.planner.solve`) gives the plan
  of least modelled latency (or the job's other cost) within a predicted perplexity budget. The
  plan at the job's ``ppl_increase`` bound is built and measured on the same windows
  (:func:`plan_checker`, cached in the job folder); where it loses more than ``CHECK_MARGIN`` of the
  bound, the edge moves in by what the prediction missed (at most ``CHECKS`` plans built). The
  plan at the edge, the plans of least predicted loss within each uniform baseline's bytes and
  modelled latency (a front member that dominates the recipe, where the prediction holds), and
  plans at evenly smaller budgets below the edge are enqueued as the first candidates
  (``ceil(budget / 3)`` of them at most; none already in the study is enqueued again).
- **Guide.** :meth:`PlannerStart.estimate` predicts a plan's validation perplexity from the table
  (the teacher's, times ``exp`` of the summed NLL changes, the uniform cuts' among them, a loss
  scaled by what the sum missed on the plan measured at the edge) and its ``ppl_increase``. ``auto`` fits
  its perplexity surrogate's trend on the first, so it ranks unseen plans by what their groups
  cost, and does not propose a plan whose predicted increase breaks the job's bound (the sum
  underestimates the loss of plans that round many groups hard, so such a plan would break it
  too; the estimate is corrected by the factor fitted on the evaluated plans as they finish,
  :class:`~slimsearch.search.OnlineCalibration`). Each uniform cut value the space lists
  (``ffn_keep``, ``kv_groups_keep``, ``hidden_keep``, ``drop_layers``) is measured alone too, on the
  same windows (the cut built as a candidate's is, its NLL change against the teacher's), and
  cached beside the table; cuts are not planned (they change every group's bytes), only predicted.
  Plans with a choice outside both (sparsity, SmoothQuant inputs, healing) get no prediction.

The prediction assumes the groups' effects add up; they add up less well as more groups are
rounded hard (the measured loss exceeds the sum), which is why the search measures what it runs
and the trend is fitted on the measured values. Only the job's own space is planned: a choice
the space does not list is not proposed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import FULL_PRECISION

if TYPE_CHECKING:
    from slimsearch.evaluators.llm_sensitivity import Sensitivity

__all__ = ["PlannerStart", "enqueue_front", "job_planner", "plan_checker", "planner_start"]

WINDOWS = 4  # calibration windows the sensitivity is measured on
SWEEP_POINTS = 16
PLANNED_ATTR = "planner"  # the user attribute of an enqueued trial: proposed by the planner
CUTS = ("ffn_keep", "kv_groups_keep", "hidden_keep", "drop_layers")  # uniform cuts: measured alone, not planned
CUTS_FILE = "planner-cuts.json"
CHECKS_FILE = "planner-checks.json"  # the measured increase of the plans the planner checked
CHECKS = 3  # plans at the edge built and measured at most, moving it in each time
CHECK_MARGIN = 0.8  # share of the bound a checked plan may lose on the planner's windows
WEIGHT_BITS, METHOD, GROUP_SIZE = "weight_bits", "weight_method", "group_size"


@dataclass(frozen=True)
class PlannerStart:
    """The sensitivity table of a job's space, and what it predicts.

    Attributes:
        table: the per-group options (:class:`~slimsearch.evaluators.llm_sensitivity.Sensitivity`),
            each group's options restricted to what the space allows it.
        groups: the space's linear groups (the task's ``layers``, or per block: ``"3.down"``).
        choices: the space's dimensions (param name -> values) and its fixed values.
        searched: the names of the dimensions Optuna records (a trial's params).
        cuts: cut dimension -> value -> the NLL change of that cut alone (the listed values but the
            neutral one).
        teacher_score: the teacher's validation perplexity the predictions scale.
        edge: the predicted ``ppl_increase`` the first enqueued plan is planned at (None: the job's
            bound), set by :func:`checked`.
        targets: budgets (measure -> at most) within which the plan of least predicted loss is proposed
            too, when predicted within the edge: each uniform recipe's the job evaluates as a baseline,
            its packed bytes and its modelled figure of the measure the planner minimises.
        correction: the factor a predicted loss (a positive sum of NLL changes) is multiplied by: what
            the sum missed on the plan measured at the edge (1: nothing measured, or it lost no more).
        seconds: wall time of the sensitivity pass (near 0 when ``table.cached``).
    """

    table: "Sensitivity"
    groups: tuple[str, ...]
    choices: Mapping[str, tuple]
    searched: tuple[str, ...]
    teacher_score: float
    seconds: float = 0.0
    cuts: Mapping[str, Mapping[Any, float]] = dataclasses.field(default_factory=dict)
    edge: Optional[float] = None
    correction: float = 1.0
    targets: tuple[Mapping[str, float], ...] = ()

    @property
    def per_block(self) -> bool:
        """Whether the groups are each block's own (``"3.down"``) rather than a group in every block."""
        return any("." in g for g in self.groups)

    @property
    def problem(self):
        """The table as the integer program takes it (:class:`~slimsearch.search.planner.Problem`)."""
        from slimsearch.search.planner import Problem

        return Problem(self.table.options, self.table.base, self.table.modes)

    def describe(self) -> str:
        """One line for the job's MLflow params: what the table holds and how it was obtained."""
        options = sorted({o for opts in self.table.options.values() for o in opts})
        where = (f"per block's linear group ({len(self.groups)})" if self.per_block else
                 f"per linear group across blocks ({', '.join(self.groups)})")
        return (f"sensitivity {where} of {options} on {WINDOWS} "
                f"calibration windows, {'read from the job folder' if self.table.cached else 'measured'}"
                + (f"; cuts alone: {', '.join(f'{n} {list(v)}' for n, v in self.cuts.items())}" if self.cuts else "")
                + "; plans predicted on the front within "
                + ("the ppl_increase bound" if self.edge is None else f"ppl_increase {self.edge:+.2%} (the edge the "
                   "plans measured at it gave)") + " run first; perplexity predicted as the teacher's times "
                f"exp(sum of the NLL changes{f' x {self.correction:.2f} where positive' if self.correction != 1 else ''})")

    def _values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Every dimension's value in the plan ``params`` (the fixed ones included)."""
        return {**{k: v[0] for k, v in self.choices.items() if len(v) == 1}, **params}

    def options_of(self, params: Mapping[str, Any]) -> Optional[dict[str, str]]:
        """Group -> the table's option the params choose; None where a choice lies outside the table."""
        from slimsearch.evaluators.llm_sensitivity import FLOAT, WHOLE_GROUPS, WeightChoice, whole_option

        values = self._values(params)
        planned = (WEIGHT_BITS + ".", *WHOLE_GROUPS.values(), METHOD, GROUP_SIZE, "act_bits.", "power_mode.")
        for name, value in values.items():
            if not name.startswith(planned) \
                    and value != _neutral(name, self.choices[name]) and value not in self.cuts.get(name, {}):
                return None  # a sparsity, healing, ...: not measured
            if name.startswith("act_bits.") and value != FULL_PRECISION:
                return None
        chosen: dict[str, str] = {}
        for group in self.groups:
            bits = values.get(f"{WEIGHT_BITS}.{group}", FULL_PRECISION)
            chosen[group] = FLOAT if bits == FULL_PRECISION else WeightChoice(
                values.get(METHOD, "rtn"), bits, values.get(GROUP_SIZE, 128)).name
        for group, name in WHOLE_GROUPS.items():
            if group in self.table.options:
                chosen[group] = whole_option(group, values.get(name, FULL_PRECISION))
        if any(o not in self.table.options.get(g, {}) for g, o in chosen.items()):
            return None
        return chosen

    def estimate(self, params: Mapping[str, Any], metric: str, gap: str) -> dict[str, Optional[float]]:
        """``{metric: the predicted validation perplexity, gap: its predicted increase over the teacher's}``
        of the plan ``params`` (None outside the table)."""
        from slimsearch.evaluators.llm_sensitivity import NLL

        chosen = self.options_of(params)
        if chosen is None:
            return {metric: None, gap: None}
        values = self._values(params)
        cuts = [self.cuts[name][values[name]] for name in self.cuts if values.get(name) in self.cuts[name]]
        change = math.fsum([*(self.table.options[g][o][NLL] for g, o in chosen.items()), *cuts])
        change *= self.correction if change > 0 else 1.0
        return {metric: self.teacher_score * math.exp(change), gap: math.expm1(change)}


def _neutral(name: str, values: Sequence) -> Any:
    """The value of a dimension the table does not plan: its default (no compression) where listed."""
    from slimsearch.spaces.choices import CHOICES

    default = next((c.default for c in CHOICES if c.name == name.partition(".")[0]), None)
    return default if default is not None and default in values else values[0]


def _dimensions(space) -> dict[str, tuple]:
    return {**{k: (v,) for k, v in space.fixed}, **{k: tuple(v) for k, v in space.choices}}


def job_planner(spec, task, space, folder: Path, *, teacher_score: float,
                log: Callable[[str], None] = print) -> Optional[PlannerStart]:
    """The planner start of a causal-LM job searched by ``auto`` with ``search.planner`` on; else None."""
    from slimsearch.metric_names import TaskFamily

    if not spec.search.planner or spec.search.sampler.value != "auto" or task.family is not TaskFamily.CAUSAL_LM:
        return None
    start = planner_start(spec, task, space, folder, teacher_score=teacher_score, log=log)
    if spec.search.baselines:
        start = dataclasses.replace(start, targets=baseline_budgets(task, spec))
    return checked(start, spec, plan_checker(task, space, folder, start), log=log)


def baseline_budgets(task, spec) -> tuple[dict[str, float], ...]:
    """Per uniform recipe a causal-LM job evaluates as a baseline, largest first: its packed weight bytes and
    its modelled figure of the measure the planner minimises (the job's first profile's latency)."""
    from slimsearch.evaluators.estimate import estimate
    from slimsearch.evaluators.llm_sensitivity import SIZE
    from slimsearch.jobs.baselines import baseline_plans
    from slimsearch.jobs.plan import minimised_measure

    measure = minimised_measure(spec)
    out = []
    for plan in baseline_plans(task.layers or (), spec.teacher_power_modes()).values():
        values = estimate(task, plan, spec.profile_refs).values
        budget = {SIZE: float(values[SIZE]), **({measure: float(values[measure])} if values.get(measure) else {})}
        if budget not in out:
            out.append(budget)
    return tuple(sorted(out, key=lambda b: -b[SIZE]))


def planner_start(spec, task, space, folder: Path, *, teacher_score: float,
                  log: Callable[[str], None] = print) -> PlannerStart:
    """Measure (or read from ``folder``) the sensitivity of ``space``'s choices for ``task``'s teacher."""
    from slimsearch.evaluators.llm_sensitivity import (FLOAT, HEAD_GROUP, KV_GROUP, WHOLE_GROUPS, WeightChoice,
                                                       llm_sensitivity, option_bits)

    dims = _dimensions(space)
    groups = tuple(space.layers)
    per_block = bool(spec.space.per_block)
    bits = sorted({b for g in groups for b in dims.get(f"{WEIGHT_BITS}.{g}", (FULL_PRECISION,))} - {FULL_PRECISION})
    choices = [WeightChoice(m, b, gs) for m in dims.get(METHOD, ("rtn",)) for gs in dims.get(GROUP_SIZE, (128,))
               for b in bits]
    kv, head = ([b for b in dims.get(WHOLE_GROUPS[g], (FULL_PRECISION,)) if b != FULL_PRECISION]
                for g in (KV_GROUP, HEAD_GROUP))
    started = time.perf_counter()
    log(f"[slimsearch] planner: sensitivity of {len(choices)} weight choices x {len(groups)} groups"
        + (f", {len(kv)} KV precisions" if kv else "") + (f", {len(head)} output projection widths" if head else "")
        + f" on {WINDOWS} calibration windows")
    table = llm_sensitivity(task.teacher, task.train.x[:WINDOWS], choices, kv_bits=kv, head_bits=head,
                            per_block=per_block, profiles=spec.profile_refs, folder=folder)
    seconds = time.perf_counter() - started
    log(f"[slimsearch] planner: sensitivity {'read from the job folder' if table.cached else 'measured'} "
        f"({seconds:.0f} s)")

    def allowed(group: str, option: str) -> bool:
        if group in WHOLE_GROUPS:
            return option_bits(group, option) in dims.get(WHOLE_GROUPS[group], (FULL_PRECISION,))
        own = dims.get(f"{WEIGHT_BITS}.{group}", (FULL_PRECISION,))
        return (FULL_PRECISION in own) if option == FLOAT else WeightChoice.parse(option).bits in own

    options = {g: {o: m for o, m in opts.items() if allowed(g, o)} for g, opts in table.options.items()}
    cuts = {name: [v for v in dims[name] if v != _neutral(name, dims[name])] for name in CUTS if name in dims}
    cuts = {name: values for name, values in cuts.items() if values}
    if cuts:
        cuts = _cut_losses(task, cuts, task.train.x[:WINDOWS], Path(folder), table.key, log)
    seconds = time.perf_counter() - started
    return PlannerStart(dataclasses.replace(table, options=options), groups, dims, tuple(n for n, _ in space.choices),
                        teacher_score, seconds=seconds, cuts=cuts)


def _mean_nll(model, windows) -> float:
    """Mean next-token negative log-likelihood per predicted token over ``windows`` (the log of what
    :func:`~slimsearch.tasks.causal_lm.score_lm` reports, one window at a time)."""
    from slimsearch.tasks.causal_lm import score_lm

    return math.log(score_lm(model.eval(), windows).perplexity)


def _cut_losses(task, cuts: Mapping[str, Sequence], windows, folder: Path, key: str,
                log: Callable[[str], None]) -> dict[str, dict[Any, float]]:
    """Per cut dimension and listed value, the NLL change of that cut alone (built by ``apply_plan``,
    as a candidate's is) on ``windows``; read from ``folder`` when measured before for this table."""
    import json

    from slimsearch._io import atomic_write
    from slimsearch.compress import apply_plan
    from slimsearch.spaces.plan import CompressionPlan

    path = folder / CUTS_FILE
    wanted = {name: [repr(v) for v in values] for name, values in cuts.items()}
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") == key and data.get("wanted") == wanted:
            return {name: {v: data["nll"][name][repr(v)] for v in values} for name, values in cuts.items()}
    log(f"[slimsearch] planner: the NLL change of each cut alone: {dict(cuts)}")
    teacher = _mean_nll(task.teacher, windows)
    out: dict[str, dict[Any, float]] = {}
    for name, values in cuts.items():
        out[name] = {}
        for value in values:
            model = apply_plan(task, CompressionPlan(**{name: value}))
            out[name][value] = _mean_nll(model, windows) - teacher
    atomic_write(path, json.dumps({"key": key, "wanted": wanted,
                                   "nll": {n: {repr(v): x for v, x in d.items()} for n, d in out.items()}}))
    return out


def enqueue_front(start: PlannerStart, spec, study, *, most: int,
                  log: Callable[[str], None] = print) -> tuple[dict, ...]:
    """Enqueue in ``study`` the plans the planner predicts on the front within its edge (the job's
    ``ppl_increase`` bound, or where :func:`checked` moved it) that it does not hold yet, at most
    ``most`` (the candidates left to run), each with the user attribute ``planner`` set."""
    from slimsearch.jobs.plan import minimised_measure
    from slimsearch.search._teller import _key

    params = _front_params(start, spec, minimised_measure(spec))
    # a waiting trial holds its params as Optuna's fixed_params until it starts
    held = {_key(t.params or t.system_attrs.get("fixed_params") or {}) for t in study.get_trials(deepcopy=False)}
    new = [p for p in params if _key(p) not in held][:max(most, 0)]
    for p in new:
        study.enqueue_trial(p, user_attrs={PLANNED_ATTR: True}, skip_if_exists=False)
    log(f"[slimsearch] planner: {len(new)} of the {len(params)} plan(s) it predicts on the front within the "
        "bound enqueued first")
    return tuple(new)


def checked(start: PlannerStart, spec, check: Callable[[dict], float],
            log: Callable[[str], None] = print) -> PlannerStart:
    """``start`` with its edge and correction measured: the plan at the job's ``ppl_increase`` bound is
    built and measured by ``check`` (params -> its increase on the planner's windows,
    :func:`plan_checker`); where it loses more than ``CHECK_MARGIN`` of the bound (the sum of the
    groups' losses underestimates plans that round many groups), the edge moves in by what the sum
    missed (:func:`~slimsearch.jobs.plan.next_edge`: first as a factor, then along the line through
    the last two plans built), up to ``CHECKS`` plans. The margin leaves room for the validation
    text, which the calibration windows only approximate. The last measured plan's measured over predicted loss
    becomes the correction of every prediction (when above 1). Without a bound: ``start`` as it is."""
    from slimsearch.jobs.plan import minimised_measure, next_edge, ppl_increase_bound

    bound = ppl_increase_bound(spec)
    if bound is None:
        return start
    edge, correction, target, measure = bound, 1.0, CHECK_MARGIN * bound, minimised_measure(spec)
    seen: list[tuple[float, float]] = []  # (predicted, measured) of the plans built
    for _ in range(CHECKS):
        selection = _solve_at(start, edge, measure)
        predicted = math.nan if selection is None else _predicted(start, selection)
        if not predicted > 0:
            break
        measured = check(_params_of(start, selection.chosen))
        seen.append((predicted, measured))
        correction = max(1.0, measured / predicted)
        log(f"[slimsearch] planner: the plan at predicted ppl_increase {predicted:+.2%} measures {measured:+.2%} "
            "on its windows")
        if measured <= target:
            break
        edge = next_edge(seen, target)
    return dataclasses.replace(start, edge=edge, correction=correction)


def _solve(start: PlannerStart, budget: Mapping[str, float], minimise: str):
    """The plan of least ``minimise`` within ``budget`` (measure -> at most); None when none fits, or
    only plans at the budget's very edge, which the solver's tolerance keeps returning just over it."""
    from slimsearch.search.planner import solve

    try:
        return solve(start.problem, budget, minimise=minimise)
    except (ConfigError, RuntimeError):
        return None


def _solve_at(start: PlannerStart, increase: float, measure: str):
    """The plan of least ``measure`` predicted within ``increase`` (uncorrected); None when none is."""
    from slimsearch.evaluators.llm_sensitivity import NLL

    return _solve(start, {NLL: start.table.base[NLL] + math.log1p(increase)}, measure)


def _predicted(start: PlannerStart, selection) -> float:
    """The ``ppl_increase`` the table predicts for the planner's ``selection`` (uncorrected)."""
    from slimsearch.evaluators.llm_sensitivity import NLL

    return math.expm1(selection.totals[NLL] - start.table.base[NLL])


def plan_checker(task, space, folder: Path, start: PlannerStart) -> Callable[[dict], float]:
    """params -> the perplexity increase of that plan, built as a candidate is (``apply_plan``), on the
    planner's calibration windows: what the planner's sum predicted, measured without the candidate's
    evaluation (no validation text, no timing). Cached in ``folder`` (a resumed job reads it back)."""
    import json

    from slimsearch._io import atomic_write
    from slimsearch.compress import apply_plan
    from slimsearch.search._teller import _key

    path, windows = Path(folder) / CHECKS_FILE, task.train.x[:WINDOWS]
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    done: dict[str, float] = data.get("increase", {}) if data.get("key") == start.table.key else {}
    teacher: list[float] = []

    def check(params: dict) -> float:
        key = repr(_key(params))
        if key not in done:
            if not teacher:
                teacher.append(_mean_nll(task.teacher, windows))
            done[key] = math.expm1(_mean_nll(apply_plan(task, space.plan_from_params(params)), windows) - teacher[0])
            atomic_write(path, json.dumps({"key": start.table.key, "increase": done}))
        return done[key]

    return check


def _front_params(start: PlannerStart, spec, measure: str) -> list[dict]:
    """The params of plans on the predicted front, at most ceil(budget / 3): with a ``ppl_increase``
    bound, the plan at the edge (:attr:`PlannerStart.edge`, else the bound) first, then the plans of
    least predicted loss within each of :attr:`PlannerStart.targets` (predicted within the edge), then
    plans at evenly smaller predicted increases; without one, spread over the whole predicted front. Never the
    teacher itself."""
    from slimsearch.evaluators.llm_sensitivity import FLOAT, NLL
    from slimsearch.jobs.plan import ppl_increase_bound
    from slimsearch.search.planner import sweep

    n = max(1, math.ceil(spec.search.budget / 3))
    bound = ppl_increase_bound(spec)
    if bound is None:
        front = [s for s in sweep(start.problem, NLL, minimise=measure, points=SWEEP_POINTS)
                 if any(o != FLOAT for o in s.chosen.values())]
        chosen = [front[round((len(front) - 1) * (1 - k / max(n - 1, 1)))] for k in range(min(n, len(front)))]
    else:
        edge = bound if start.edge is None else start.edge
        at_bytes = [_solve(start, budget, NLL) for budget in start.targets]
        chosen = [_solve_at(start, edge, measure),
                  *[s for s in at_bytes if s is not None and _predicted(start, s) <= edge],
                  *[_solve_at(start, edge * (n - k) / n, measure) for k in range(1, n)]]
    out: list[dict] = []
    for selection in chosen:
        if selection is None or all(o == FLOAT for o in selection.chosen.values()):
            continue
        params = _params_of(start, selection.chosen)
        if params not in out:
            out.append(params)
    return out[:n]


def _params_of(start: PlannerStart, chosen: Mapping[str, str]) -> dict:
    """The trial params of the planner's choice ``chosen`` (group -> option), the space's other searched
    dimensions at their neutral values."""
    from slimsearch.evaluators.llm_sensitivity import FLOAT, WHOLE_GROUPS, WeightChoice, option_bits

    params = {name: _neutral(name, start.choices[name]) for name in start.searched}
    weights = [WeightChoice.parse(o) for g, o in chosen.items() if g not in WHOLE_GROUPS and o != FLOAT]
    for group in start.groups:
        option = chosen.get(group, FLOAT)
        if f"{WEIGHT_BITS}.{group}" in params:
            params[f"{WEIGHT_BITS}.{group}"] = FULL_PRECISION if option == FLOAT else WeightChoice.parse(option).bits
    if weights:
        for name, value in ((METHOD, weights[0].method), (GROUP_SIZE, weights[0].group_size)):
            if name in params:
                params[name] = value
    for group, name in WHOLE_GROUPS.items():
        if name in params and group in chosen:
            params[name] = option_bits(group, chosen[group])
    return params
