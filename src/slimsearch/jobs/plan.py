"""``slimsearch plan JOB``: a causal-LM job's fastest plan within a perplexity budget, without a search.

Per group of linears, the cost of each weight choice and KV precision is measured once on a few
calibration windows (:func:`~slimsearch.evaluators.llm_sensitivity.llm_sensitivity`, cached in the
job folder), an integer program picks one option per group minimising the modelled latency (or
energy, or bytes) under the perplexity budget (:func:`~slimsearch.search.planner.solve`), and the
plan is then built and scored on the validation windows, so the figure a user reads is measured,
beside the planner's prediction (which assumes the groups' effects add up).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from slimsearch.exceptions import ConfigError
from slimsearch.metric_names import TaskFamily
from slimsearch.spaces.plan import CompressionPlan

__all__ = ["DEFAULT_CHOICES", "DEFAULT_HEAD_BITS", "DEFAULT_KV_BITS", "JobPlan", "minimised_measure", "plan_job",
           "ppl_increase_bound"]

DEFAULT_CHOICES = ("rtn-w3-g128", "rtn-w4-g128", "rtn-w8-g128")  # instant to score: minutes for SmolLM2
DEFAULT_KV_BITS = (8, 4)
DEFAULT_HEAD_BITS = (8,)  # the output projection (a tied embedding with it): 8 bits in blocks of 64, or float
DEFAULT_WINDOWS = 4
PPL_INCREASE = "ppl_increase"


@dataclass(frozen=True)
class JobPlan:
    """A planned plan, what the planner predicted for it and what it measured once built.

    Attributes:
        plan: the plan (``apply_plan`` builds it; a job or ``search`` can evaluate it).
        minimised: the measure the integer program minimised (``latency_ms@<profile>``, ``energy_mj@...``
            or ``size_bytes``; modelled, except bytes, which are exact; ``nll``, predicted, within a bytes budget).
        max_ppl_increase: the perplexity budget, relative to the teacher (with a bytes budget: the job's
            bound, or 0 without one; not a limit of the plan).
        predicted: the planner's totals (``nll``, ``kl``, ``size_bytes``, the modelled figures) and
            ``ppl_increase`` from its NLL, all predictions from the per-group table.
        measured: the built plan scored on the validation windows (``ppl``, ``ppl_increase``, ``kl``,
            ``top1``) and its packed ``size_bytes``; empty when not verified.
        chosen: group -> option, as the solver chose.
        seconds: wall time of each part (``sensitivity``, ``solve``, ``verify``).
    """

    plan: CompressionPlan
    minimised: str
    max_ppl_increase: float
    predicted: Mapping[str, float]
    measured: Mapping[str, float] = field(default_factory=dict)
    chosen: Mapping[str, str] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "minimised": self.minimised, "max_ppl_increase": self.max_ppl_increase,
                "predicted": dict(self.predicted), "measured": dict(self.measured), "chosen": dict(self.chosen),
                "seconds": dict(self.seconds)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobPlan":
        return cls(CompressionPlan.from_dict(data["plan"]), data["minimised"], float(data["max_ppl_increase"]),
                   data["predicted"], data.get("measured", {}), data.get("chosen", {}), data.get("seconds", {}))


def ppl_increase_bound(spec) -> Optional[float]:
    """The tightest ``ppl_increase <=`` (or ``<``) bound among the job's constraints; None without one."""
    from slimsearch.search._types import Constraint

    limits = [c.limit for c in map(Constraint.parse, spec.constraints) if c.metric == PPL_INCREASE
              and c.op in ("<=", "<")]
    return min(limits) if limits else None


def _budget(spec, max_ppl_increase: Optional[float]) -> float:
    """The flag's budget, else the job's ``ppl_increase <=`` constraint."""
    if max_ppl_increase is None:
        max_ppl_increase = ppl_increase_bound(spec)
        if max_ppl_increase is None:
            raise ConfigError(f"plan: job {spec.name!r} has no 'ppl_increase <= X' constraint; allowed: add one to "
                              "its constraints, or give --max-ppl-increase X")
    if not (isinstance(max_ppl_increase, (int, float)) and math.isfinite(max_ppl_increase) and max_ppl_increase > 0):
        raise ConfigError(f"plan: the perplexity budget must be a number > 0 (0.05 = 5%), got {max_ppl_increase!r}")
    return float(max_ppl_increase)


def minimised_measure(spec, minimise: Optional[str] = None) -> str:
    """``minimise`` checked against what the job's profiles allow, else the first profile's modelled
    ``latency_ms`` (``size_bytes`` for a job without profiles)."""
    from slimsearch.evaluators.llm_sensitivity import SIZE

    profiles = [p.name for p in spec.profiles]
    allowed = [SIZE] + [f"{m}@{p}" for p in profiles for m in ("latency_ms", "energy_mj")]
    chosen = minimise or (allowed[1] if len(allowed) > 1 else SIZE)
    if chosen not in allowed:
        raise ConfigError(f"plan: cannot minimise {chosen!r}; allowed: {allowed} (the job's profiles, modelled)")
    return chosen


def plan_job(spec, *, folder: Union[str, Path, None], max_ppl_increase: Optional[float] = None,
             minimise: Optional[str] = None, choices: Sequence[str] = DEFAULT_CHOICES,
             kv_bits: Sequence[int] = DEFAULT_KV_BITS, head_bits: Sequence[int] = DEFAULT_HEAD_BITS,
             windows: int = DEFAULT_WINDOWS, per_block: bool = True,
             verify: bool = True, task: Any = None, max_bytes: Optional[float] = None,
             progress: Optional[Callable[[str], None]] = None) -> JobPlan:
    """The plan of the causal-LM job ``spec`` (a :class:`~slimsearch.jobs.spec.JobSpec`) that minimises
    ``minimise`` within the perplexity budget; with ``max_bytes``, the plan of least predicted
    perplexity within that many packed weight bytes instead (``minimised`` is then ``nll``, and
    ``max_ppl_increase`` the job's bound, which the plan is not held to).

    Args:
        folder: where the per-group losses are cached (the job folder; a second call reads them).
        max_ppl_increase: the budget (0.05 = 5%); default: the job's ``ppl_increase <=`` constraint.
        minimise: ``latency_ms@P``, ``energy_mj@P`` (P a profile of the job) or ``size_bytes``;
            default: the first profile's latency.
        choices: weight options, named ``<method>-w<bits>-g<group>`` (``-asym`` for asymmetric);
            every quantized group of the plan shares the method and group size.
        kv_bits: KV-cache precisions to consider (16 is the teacher's).
        head_bits: widths of the output projection to consider (8, 4; float is always an option).
        windows: calibration windows the losses are measured on.
        per_block: a choice per block and group (``3.down``) or per group across blocks.
        verify: build the plan and score it on the validation windows.
        task: the job's task, when already loaded.
        progress: called with a line at each stage.
    """
    from slimsearch.evaluators.llm_sensitivity import NLL, WeightChoice, llm_sensitivity, plan_from_choice
    from slimsearch.search.planner import Problem, solve
    from slimsearch.tasks import load_task

    say = progress or (lambda line: None)
    if max_bytes is None:
        budget, measure = _budget(spec, max_ppl_increase), minimised_measure(spec, minimise)
    elif isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float)) or not max_bytes > 0:
        raise ConfigError(f"plan: max_bytes must be a number > 0, got {max_bytes!r}")
    else:
        budget, measure = ppl_increase_bound(spec) or 0.0, NLL
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise ConfigError(f"plan: windows must be an integer >= 1, got {windows!r}")
    parsed = [WeightChoice.parse(c) for c in choices]
    from slimsearch.tasks._registry import task_family

    known = task_family(spec.task)  # a built-in's family is known before its teacher loads (or trains)
    if known is not None and known is not TaskFamily.CAUSAL_LM:
        _refuse_family(spec.task, known)
    if task is None:
        task = load_task(spec.task, seed=spec.search.seed, path=spec.task_path, text=spec.task_text)
    if task.family is not TaskFamily.CAUSAL_LM:
        _refuse_family(spec.task, task.family)
    calib = task.train.x[:windows]
    seconds = {}
    start = time.perf_counter()
    say(f"sensitivity of {len(parsed)} weight choices, {len(kv_bits)} KV precisions and {len(head_bits)} output "
        f"projection widths on {len(calib)} windows")
    table = llm_sensitivity(task.teacher, calib, parsed, kv_bits=kv_bits, head_bits=head_bits, per_block=per_block,
                            profiles=spec.profile_refs, folder=folder)
    seconds["sensitivity"] = time.perf_counter() - start
    start = time.perf_counter()
    from slimsearch.evaluators.llm_sensitivity import SIZE

    limits = {SIZE: float(max_bytes)} if max_bytes is not None else {NLL: table.base[NLL] + math.log1p(budget)}
    selection = solve(Problem(table.options, table.base, table.modes), limits, minimise=measure)
    seconds["solve"] = time.perf_counter() - start
    plan = plan_from_choice(selection.chosen)
    predicted = {**selection.totals, PPL_INCREASE: math.expm1(selection.totals[NLL] - table.base[NLL])}
    measured: dict[str, float] = {}
    if verify:
        start = time.perf_counter()
        say("building the plan and scoring it on the validation windows")
        measured = _verify(task, plan)
        seconds["verify"] = time.perf_counter() - start
    return JobPlan(plan, measure, budget, predicted, measured, selection.chosen, seconds)


def _refuse_family(task: str, family: TaskFamily) -> None:
    raise ConfigError(f"plan: task {task!r} is a {family.value} task; allowed: a causal-lm task "
                      "(smollm2 or 'causal-lm:<path>'); other tasks are searched with `slimsearch run`")


def _verify(task, plan: CompressionPlan) -> dict[str, float]:
    """The built plan on the validation windows, with its packed bytes (measured, not predicted)."""
    from slimsearch.compress import apply_plan
    from slimsearch.compress.llm_methods import record_of
    from slimsearch.evaluators.candidate import task_scores
    from slimsearch.evaluators.llm_costs import head_kwargs, weight_bytes

    teacher = task_scores(task.teacher, task.val, task)[task.metric_name]
    model = apply_plan(task, plan)
    values = dict(task_scores(model, task.val, task))
    values[PPL_INCREASE] = task.family.gap(values[task.metric_name], teacher)
    record = record_of(model)
    values["size_bytes"] = float(weight_bytes(model, quantized=record.quantized, **head_kwargs(record.head)))
    return {k: float(v) for k, v in values.items()}
