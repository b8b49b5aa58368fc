"""apply_plan: the compressed model a plan stands for, its registered methods run in order."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable, Optional

from slimsearch.compress.registry import Context, apply_config, method_of, methods, plan_configs

if TYPE_CHECKING:
    from torch import nn

    from slimsearch.spaces.plan import CompressionPlan
    from slimsearch.tasks import Task


def apply_plan(task: "Task", plan: "CompressionPlan", *,
               on_chunk: Optional[Callable[[int, "nn.Module"], bool]] = None,
               chunk_every: Optional[int] = None) -> "nn.Module":
    """Compress a copy of the teacher as the plan says, with the methods of the task's family
    (classification: prune, quantize, sparsify, factorise, calibrate, distill, fold BatchNorm,
    freeze; causal-lm: cut, heal, Wanda 2:4, SmoothQuant, weight-only quantization, KV cache;
    see :func:`plan_configs`).

    Deterministic for ``plan.seed``: export rebuilds the measured model with it.
    ``on_chunk`` and ``chunk_every`` reach the fine-tuning (early stopping of a hopeless
    candidate).
    """
    import torch

    torch.manual_seed(plan.seed)
    context = Context(task=task, plan=plan, on_chunk=on_chunk, chunk_every=chunk_every)
    model, owned = task.teacher, False  # the teacher is copied once, before a method would change it
    for config in plan_configs(plan, task.family):
        method = method_of(config)
        if not owned and not method.copies:
            model = copy.deepcopy(model)
        model, owned = method.apply(model, config, context), True
    return model if owned else copy.deepcopy(model)


def finalize(model: "nn.Module", task: "Task", plan: Optional["CompressionPlan"] = None) -> "nn.Module":
    """The deployable form of a (fine-tuned) student: the plan's steps from BatchNorm folding on."""
    from slimsearch.compress.fold_and_freeze import FOLD_ORDER
    from slimsearch.spaces.plan import CompressionPlan

    plan = plan or CompressionPlan()
    context = Context(task=task, plan=plan)
    for method in methods(task.family):
        config = method.from_plan(plan) if method.order >= FOLD_ORDER else None
        if config is not None:
            model = apply_config(model, config, context)
    return model
