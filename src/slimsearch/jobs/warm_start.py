"""The planner's start of a causal-LM job searched by ``auto``: plans predicted on the front, run first.

Before its first candidate, the job measures what each choice of its space costs each linear
group, across blocks, or in each block where the space chooses weight bits per block
(``space.per_block``) (:func:`~slimsearch.evaluators.llm_sensitivity.llm_sensitivity` on a few
calibration windows: the weight bits, methods and group sizes the space lists, and its KV-cache
precisions), cached in the job folder so that a resumed job reads it back. Two uses:

- **Warm start.** The integer program (:func:`~slimsearch.search.planner.sweep`) gives the plans
  of least modelled latency at a range of predicted perplexity budgets; those predicted within
  the job's ``ppl_increase`` bound, spread over it, are enqueued as the first candidates
  (``ceil(budget / 3)`` of them at most; none already in the study is enqueued again).
- **Guide.** :meth:`PlannerStart.estimate` predicts a plan's validation perplexity from the table
  (the teacher's, times ``exp`` of the summed NLL changes, the uniform cuts' among them) and its
  ``ppl_increase``. ``auto`` fits
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

from slimsearch.spaces.plan import FULL_PRECISION

if TYPE_CHECKING:
    from slimsearch.evaluators.llm_sensitivity import Sensitivity

__all__ = ["PlannerStart", "enqueue_front", "job_planner", "planner_start"]

WINDOWS = 4  # calibration windows the sensitivity is measured on
SWEEP_POINTS = 16
PLANNED_ATTR = "planner"  # the user attribute of an enqueued trial: proposed by the planner
CUTS = ("ffn_keep", "kv_groups_keep", "hidden_keep", "drop_layers")  # uniform cuts: measured alone, not planned
CUTS_FILE = "planner-cuts.json"
WEIGHT_BITS, KV_BITS, METHOD, GROUP_SIZE = "weight_bits", "kv_bits", "weight_method", "group_size"


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
        seconds: wall time of the sensitivity pass (near 0 when ``table.cached``).
    """

    table: "Sensitivity"
    groups: tuple[str, ...]
    choices: Mapping[str, tuple]
    searched: tuple[str, ...]
    teacher_score: float
    seconds: float = 0.0
    cuts: Mapping[str, Mapping[Any, float]] = dataclasses.field(default_factory=dict)
    per_block: bool = False

    def describe(self) -> str:
        """One line for the job's MLflow params: what the table holds and how it was obtained."""
        options = sorted({o for opts in self.table.options.values() for o in opts})
        where = (f"per block's linear group ({len(self.groups)})" if self.per_block else
                 f"per linear group across blocks ({', '.join(self.groups)})")
        return (f"sensitivity {where} of {options} on {WINDOWS} "
                f"calibration windows, {'read from the job folder' if self.table.cached else 'measured'}"
                + (f"; cuts alone: {', '.join(f'{n} {list(v)}' for n, v in self.cuts.items())}" if self.cuts else "")
                + "; plans predicted on the front within the ppl_increase bound run first; perplexity predicted as "
                "the teacher's times exp(sum of the NLL changes)")

    def _values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Every dimension's value in the plan ``params`` (the fixed ones included)."""
        return {**{k: v[0] for k, v in self.choices.items() if len(v) == 1}, **params}

    def options_of(self, params: Mapping[str, Any]) -> Optional[dict[str, str]]:
        """Group -> the table's option the params choose; None where a choice lies outside the table."""
        from slimsearch.evaluators.llm_sensitivity import FLOAT, KV_GROUP, WeightChoice, kv_option

        values = self._values(params)
        for name, value in values.items():
            if not name.startswith((WEIGHT_BITS + ".", KV_BITS, METHOD, GROUP_SIZE, "act_bits.", "power_mode.")) \
                    and value != _neutral(name, self.choices[name]) and value not in self.cuts.get(name, {}):
                return None  # a sparsity, healing, ...: not measured
            if name.startswith("act_bits.") and value != FULL_PRECISION:
                return None
        chosen: dict[str, str] = {}
        for group in self.groups:
            bits = values.get(f"{WEIGHT_BITS}.{group}", FULL_PRECISION)
            chosen[group] = FLOAT if bits == FULL_PRECISION else WeightChoice(
                values.get(METHOD, "rtn"), bits, values.get(GROUP_SIZE, 128)).name
        if KV_GROUP in self.table.options:
            kv = values.get(KV_BITS, FULL_PRECISION)
            chosen[KV_GROUP] = FLOAT if kv == FULL_PRECISION else kv_option(kv)
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
    return planner_start(spec, task, space, folder, teacher_score=teacher_score, log=log)


def planner_start(spec, task, space, folder: Path, *, teacher_score: float,
                  log: Callable[[str], None] = print) -> PlannerStart:
    """Measure (or read from ``folder``) the sensitivity of ``space``'s choices for ``task``'s teacher."""
    from slimsearch.evaluators.llm_sensitivity import FLOAT, KV_GROUP, WeightChoice, llm_sensitivity

    dims = _dimensions(space)
    groups = tuple(space.layers)
    per_block = bool(spec.space.per_block)
    bits = sorted({b for g in groups for b in dims.get(f"{WEIGHT_BITS}.{g}", (FULL_PRECISION,))} - {FULL_PRECISION})
    choices = [WeightChoice(m, b, gs) for m in dims.get(METHOD, ("rtn",)) for gs in dims.get(GROUP_SIZE, (128,))
               for b in bits]
    kv = [b for b in dims.get(KV_BITS, (FULL_PRECISION,)) if b != FULL_PRECISION]
    started = time.perf_counter()
    log(f"[slimsearch] planner: sensitivity of {len(choices)} weight choices x {len(groups)} groups"
        + (f" and {len(kv)} KV precisions" if kv else "") + f" on {WINDOWS} calibration windows")
    table = llm_sensitivity(task.teacher, task.train.x[:WINDOWS], choices, kv_bits=kv, per_block=per_block,
                            profiles=spec.profile_refs, folder=folder)
    seconds = time.perf_counter() - started
    log(f"[slimsearch] planner: sensitivity {'read from the job folder' if table.cached else 'measured'} "
        f"({seconds:.0f} s)")

    def allowed(group: str, option: str) -> bool:
        if group == KV_GROUP:
            listed = dims.get(KV_BITS, (FULL_PRECISION,))
            return (FULL_PRECISION in listed) if option == FLOAT else int(option[2:]) in listed
        own = dims.get(f"{WEIGHT_BITS}.{group}", (FULL_PRECISION,))
        return (FULL_PRECISION in own) if option == FLOAT else WeightChoice.parse(option).bits in own

    options = {g: {o: m for o, m in opts.items() if allowed(g, o)} for g, opts in table.options.items()}
    cuts = {name: [v for v in dims[name] if v != _neutral(name, dims[name])] for name in CUTS if name in dims}
    cuts = {name: values for name, values in cuts.items() if values}
    if cuts:
        cuts = _cut_losses(task, cuts, task.train.x[:WINDOWS], Path(folder), table.key, log)
    seconds = time.perf_counter() - started
    return PlannerStart(dataclasses.replace(table, options=options), groups, dims, tuple(n for n, _ in space.choices),
                        teacher_score, seconds=seconds, cuts=cuts, per_block=per_block)


def _mean_nll(model, windows) -> float:
    """Mean next-token negative log-likelihood per predicted token over ``windows``, one at a time."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = window[None].to(torch.long)
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


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
    """Enqueue in ``study`` the plans the planner predicts on the front within the job's
    ``ppl_increase`` bound that it does not hold yet, at most ``most`` (the candidates left to run),
    each with the user attribute ``planner`` set."""
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


def _front_params(start: PlannerStart, spec, measure: str) -> list[dict]:
    """The params of the predicted front's plans within the job's bound, at most ceil(budget / 3),
    spread over the bound (the cheapest one always among them)."""
    from slimsearch.evaluators.llm_sensitivity import FLOAT, KV_GROUP, NLL, WeightChoice
    from slimsearch.jobs.plan import ppl_increase_bound
    from slimsearch.search.planner import Problem, sweep

    table = start.table
    front = sweep(Problem(table.options, table.base, table.modes), NLL, minimise=measure, points=SWEEP_POINTS)
    bound = ppl_increase_bound(spec)
    within = [s for s in front if (bound is None or math.expm1(s.totals[NLL] - table.base[NLL]) <= bound)
              and any(o != FLOAT for o in s.chosen.values())]  # the teacher itself is no candidate
    if not within:
        return []
    n = min(len(within), max(1, math.ceil(spec.search.budget / 3)))
    picks = sorted({round((len(within) - 1) * (1 - k / max(n - 1, 1))) for k in range(n)},
                   reverse=True)  # the last (the cheapest within the bound) first
    out = []
    for index in picks:
        chosen = within[index].chosen
        params = {name: _neutral(name, start.choices[name]) for name in start.searched}
        weights = [WeightChoice.parse(o) for g, o in chosen.items() if g != KV_GROUP and o != FLOAT]
        for group in start.groups:
            option = chosen.get(group, FLOAT)
            if f"{WEIGHT_BITS}.{group}" in params:
                params[f"{WEIGHT_BITS}.{group}"] = FULL_PRECISION if option == FLOAT else \
                    WeightChoice.parse(option).bits
        if weights:
            for name, value in ((METHOD, weights[0].method), (GROUP_SIZE, weights[0].group_size)):
                if name in params:
                    params[name] = value
        if KV_BITS in params and KV_GROUP in chosen:
            params[KV_BITS] = FULL_PRECISION if chosen[KV_GROUP] == FLOAT else int(chosen[KV_GROUP][2:])
        out.append(params)
    return out
