"""``slimsearch plan JOB``: a causal-LM job's fastest plan within a perplexity budget, without a search.

Per group of linears, the cost of each weight choice and KV precision is measured once on a few
calibration windows (:func:`~slimsearch.evaluators.llm_sensitivity.llm_sensitivity`, cached in the
job folder), an integer program picks one option per group minimising the modelled latency (or
energy, or bytes) under the perplexity budget (:func:`~slimsearch.search.planner.solve`), and the
plan is then built and scored on the validation windows, so the figure a user reads is measured,
beside the planner's prediction (which assumes the groups' effects add up, and underestimates plans
that round many groups hard). Where the built plan measures over the budget, the plan's edge moves
in by what the prediction missed and the next plan is built (:func:`next_edge`, at most ``checks``
plans), as a search job's planner does on its calibration windows.
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

__all__ = ["DEFAULT_CHECKS", "DEFAULT_CHOICES", "DEFAULT_HEAD_BITS", "DEFAULT_KV_BITS", "JobPlan", "minimised_measure",
           "next_edge", "plan_job", "ppl_increase_bound"]

DEFAULT_CHOICES = ("rtn-w3-g128", "rtn-w4-g128", "rtn-w8-g128")  # instant to score: minutes for SmolLM2
DEFAULT_KV_BITS = (8, 4)
DEFAULT_HEAD_BITS = (8,)  # the output projection (a tied embedding with it): 8 bits in blocks of 64, or float
DEFAULT_WINDOWS = 4
DEFAULT_CHECKS = 3  # plans built and scored at most, the edge moving in after each that measures over the budget
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
            ``top1``), on the held-out test windows (``ppl_test``, ``ppl_increase_test``: nothing is
            chosen by them) and its packed ``size_bytes``; empty when not verified.
        chosen: group -> option, as the solver chose.
        seconds: wall time of each part (``sensitivity``, ``solve``, ``verify``; ``verify`` counts every
            plan built).
        checks: every plan built, in order: ``edge`` (the predicted increase it was planned within),
            ``predicted`` and ``measured`` ``ppl_increase`` (on the validation windows), ``measured_test``
            (on the test windows) and its packed ``size_bytes``. The plan returned is the first within the budget, else the one of least
            measured increase. Empty when not verified.
    """

    plan: CompressionPlan
    minimised: str
    max_ppl_increase: float
    predicted: Mapping[str, float]
    measured: Mapping[str, float] = field(default_factory=dict)
    chosen: Mapping[str, str] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)
    checks: tuple[Mapping[str, float], ...] = ()

    @property
    def within_budget(self) -> Optional[bool]:
        """Whether the built plan measured within ``max_ppl_increase`` on the validation windows (the
        test figure is held out: see ``measured``); None when not verified (or, with a bytes budget,
        not held to it)."""
        from slimsearch.evaluators.llm_sensitivity import NLL

        if not self.measured or self.minimised == NLL:
            return None
        return self.measured[PPL_INCREASE] <= self.max_ppl_increase

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "minimised": self.minimised, "max_ppl_increase": self.max_ppl_increase,
                "predicted": dict(self.predicted), "measured": dict(self.measured), "chosen": dict(self.chosen),
                "seconds": dict(self.seconds), "checks": [dict(c) for c in self.checks],
                "within_budget": self.within_budget}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobPlan":
        return cls(CompressionPlan.from_dict(data["plan"]), data["minimised"], float(data["max_ppl_increase"]),
                   data["predicted"], data.get("measured", {}), data.get("chosen", {}), data.get("seconds", {}),
                   tuple(data.get("checks", ())))


def ppl_increase_bound(spec) -> Optional[float]:
    """The tightest ``ppl_increase <=`` (or ``<``) bound among the job's constraints; None without one."""
    from slimsearch.search._types import Constraint

    limits = [c.limit for c in map(Constraint.parse, spec.constraints) if c.metric == PPL_INCREASE
              and c.op in ("<=", "<")]
    return min(limits) if limits else None


def next_edge(seen: Sequence[tuple[float, float]], target: float) -> float:
    """The predicted ``ppl_increase`` to plan the next plan within so that it measures ``target``, from
    the (predicted, measured) increases of the plans built so far (the last one measured over it).

    The per-group sum underestimates plans that round many groups hard, so the first move is as if it
    missed a factor (``predicted x target / measured``); once two plans are built, along the line
    through the last two (it missed a factor and an offset), never above the last prediction nor
    below a quarter of it. Shared by ``slimsearch plan`` and a search job's planner check.
    """
    predicted, measured = seen[-1]
    edge = predicted * target / measured
    if len(seen) > 1:
        (p0, m0), (p1, m1) = seen[-2:]
        if m1 != m0 and p1 != p0 and (m1 - m0) / (p1 - p0) > 0:
            edge = min(predicted, max(p1 + (target - m1) * (p1 - p0) / (m1 - m0), predicted / 4))
    return edge


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
             checks: int = DEFAULT_CHECKS, progress: Optional[Callable[[str], None]] = None) -> JobPlan:
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
        checks: plans built at most: where a plan measures over the perplexity budget, the edge moves
            in (:func:`next_edge`) and the next is built (1: the first plan only; not with ``max_bytes``,
            whose plan is not held to a perplexity).
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
    if isinstance(checks, bool) or not isinstance(checks, int) or checks < 1:
        raise ConfigError(f"plan: checks must be an integer >= 1, got {checks!r}")
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
    from slimsearch.evaluators.llm_sensitivity import SIZE

    problem = Problem(table.options, table.base, table.modes)

    def solved(edge: float):
        begin = time.perf_counter()
        limits = {SIZE: float(max_bytes)} if max_bytes is not None else {NLL: table.base[NLL] + math.log1p(edge)}
        selection = solve(problem, limits, minimise=measure)
        seconds["solve"] = seconds.get("solve", 0.0) + time.perf_counter() - begin
        return selection, {**selection.totals, PPL_INCREASE: math.expm1(selection.totals[NLL] - table.base[NLL])}

    if not verify:
        selection, predicted = solved(budget)
        return JobPlan(plan_from_choice(selection.chosen), measure, budget, predicted, {}, selection.chosen, seconds)
    picked, built = _build_within(solved, _Verifier(task), budget, checks if max_bytes is None else 1, seconds, say)
    _, selection, predicted, measured = picked
    made = tuple({"edge": e, "predicted": p[PPL_INCREASE], "measured": m[PPL_INCREASE],
                  "measured_test": m[f"{PPL_INCREASE}_test"], "size_bytes": m["size_bytes"]} for e, _, p, m in built)
    return JobPlan(plan_from_choice(selection.chosen), measure, budget, predicted, measured, selection.chosen, seconds,
                   made)


def _build_within(solved: Callable, verify: Callable, budget: float, checks: int, seconds: dict,
                  say: Callable[[str], None]) -> tuple[tuple, list[tuple]]:
    """The plan picked and every plan built, each as (edge, selection, predicted, measured): the plan
    ``solved`` within the budget, then, while the last measured over it, the plan solved within the
    edge :func:`next_edge` gives, ``checks`` plans at most (fewer where nothing is predicted within the
    edge or the plan repeats). Picked: the first measured within the budget, else the one of least
    measured increase."""
    from slimsearch.evaluators.llm_sensitivity import plan_from_choice

    built: list[tuple] = []
    edge = budget
    for attempt in range(checks):
        if attempt:
            edge = next_edge([(p[PPL_INCREASE], m[PPL_INCREASE]) for _, _, p, m in built], budget)
        try:
            selection, predicted = solved(edge)
        except (ConfigError, RuntimeError):
            if not attempt:
                raise
            break  # nothing is predicted within the moved edge: keep the plans built
        if any(s.chosen == selection.chosen for _, s, _, _ in built):
            break  # the edge moved in too little to change the plan
        start = time.perf_counter()
        say(f"building the plan predicted at ppl_increase {predicted[PPL_INCREASE]:+.2%} and scoring it on the "
            "validation windows")
        measured = verify(plan_from_choice(selection.chosen))
        seconds["verify"] = seconds.get("verify", 0.0) + time.perf_counter() - start
        built.append((edge, selection, predicted, measured))
        if measured[PPL_INCREASE] <= budget or not predicted[PPL_INCREASE] > 0:
            break
        if attempt + 1 < checks:
            say(f"measured {measured[PPL_INCREASE]:+.2%}, over the budget: moving the plan's edge in")
    within = [b for b in built if b[3][PPL_INCREASE] <= budget]
    return (within[0] if within else min(built, key=lambda b: b[3][PPL_INCREASE])), built


def _refuse_family(task: str, family: TaskFamily) -> None:
    raise ConfigError(f"plan: task {task!r} is a {family.value} task; allowed: a causal-lm task "
                      "(smollm2 or 'causal-lm:<path>'); other tasks are searched with `slimsearch run`")


class _Verifier:
    """Builds a plan and scores it on the validation windows, and on the test windows (held out:
    ``<metric>_test`` and ``ppl_increase_test``, which nothing here chooses by), with its packed bytes
    (measured, not predicted); the teacher is scored once, on the first call."""

    def __init__(self, task):
        self.task, self.teacher = task, None

    def __call__(self, plan: CompressionPlan) -> dict[str, float]:
        from slimsearch.compress import apply_plan
        from slimsearch.compress.llm_methods import record_of
        from slimsearch.evaluators.candidate import score, task_scores
        from slimsearch.evaluators.llm_costs import head_kwargs, weight_bytes

        task = self.task
        if self.teacher is None:
            self.teacher = (task_scores(task.teacher, task.val, task)[task.metric_name],
                            score(task.teacher, task.test, task))
        model = apply_plan(task, plan)
        values = dict(task_scores(model, task.val, task))
        values[PPL_INCREASE] = task.family.gap(values[task.metric_name], self.teacher[0])
        values[f"{task.metric_name}_test"] = score(model, task.test, task)
        values[f"{PPL_INCREASE}_test"] = task.family.gap(values[f"{task.metric_name}_test"], self.teacher[1])
        record = record_of(model)
        values["size_bytes"] = float(weight_bytes(model, quantized=record.quantized, **head_kwargs(record.head)))
        return {k: float(v) for k, v in values.items()}
