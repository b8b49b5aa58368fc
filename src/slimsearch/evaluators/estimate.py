"""estimate(task, plan, profiles): the cost metrics a plan will have, known before it is trained.

The search driver screens candidates on these (a candidate whose size or modelled
latency already breaks a constraint is never trained) and the ``auto`` sampler uses
them to aim. Nothing here is timed: size and parameter counts are exact (training
changes no shape or bit-width), device figures are modelled from profiles, and
accuracy is not estimated at all.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

# static_costs and modelled_costs live in costs.py; imported from here by older code
from slimsearch.evaluators.costs import modelled_costs, static_costs, task_costs
from slimsearch.evaluators.metrics import Metrics
from slimsearch.spaces.plan import CompressionPlan
from slimsearch.tasks import Task

__all__ = ["estimate", "modelled_costs", "static_costs"]


def estimate(task: Task, plan: CompressionPlan, profiles: Sequence[Any]) -> Metrics:
    """Exact ``size_bytes``, ``params``, ``macs``, ``bitops`` and modelled ``latency_ms@P``,
    ``energy_mj@P``, ``cost_usd_per_1m@P`` for every profile ``P`` of ``plan``'s model.

    The model is built as :func:`~slimsearch.evaluators.apply_plan` builds it (pruned,
    quantized, calibrated, BatchNorm folded) but with no distillation steps, which change
    weights only; its costs are therefore the trained candidate's. A causal LM's plan is not
    built at all (GPTQ alone takes minutes): its cut shape and the bits it sets are enough
    (:func:`~slimsearch.compress.llm_methods.planned_shape`).
    """
    from slimsearch.metric_names import TaskFamily

    if task.family is TaskFamily.CAUSAL_LM:
        from slimsearch.compress.llm_methods import planned_shape

        model, record = planned_shape(task, plan)
        return task_costs(model, task, profiles, plan.power_modes, record=record)
    from slimsearch.compress import apply_plan

    model = apply_plan(task, replace(plan, distill=replace(plan.distill, steps=0)))
    return task_costs(model, task, profiles, plan.power_modes)
