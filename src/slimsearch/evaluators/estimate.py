"""estimate(task, plan, profiles): the cost metrics a plan will have, known before it is trained.

The search driver screens candidates on these (a candidate whose size or modelled
latency already breaks a constraint is never trained) and the ``auto`` sampler uses
them to aim. Nothing here is timed: size and parameter counts are exact (training
changes no shape or bit-width), device figures are modelled from profiles, and
accuracy is not estimated at all.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from slimsearch.evaluators.metrics import Metrics, Provenance
from slimsearch.spaces.plan import CompressionPlan
from slimsearch.tasks import Task


def estimate(task: Task, plan: CompressionPlan, profiles: Sequence[Any]) -> Metrics:
    """Exact ``size_bytes``, ``params``, ``macs``, ``bitops`` and modelled ``latency_ms@P``,
    ``energy_mj@P``, ``cost_usd_per_1m@P`` for every profile ``P`` of ``plan``'s model.

    The model is built as :func:`~slimsearch.evaluators.apply_plan` builds it (pruned,
    quantized, calibrated, BatchNorm folded) but with no distillation steps, which change
    weights only; its costs are therefore the trained candidate's.
    """
    from slimsearch.compress import apply_plan
    from slimsearch.hardware_profiles import layer_costs

    model = apply_plan(task, replace(plan, distill=replace(plan.distill, steps=0)))
    layers = layer_costs(model, task.example_input)
    values: dict[str, float | None] = dict(static_costs(model, layers))
    costs = modelled_costs(layers, profiles, plan.power_modes)
    values.update(costs.values)
    return Metrics(values=values, provenance=costs.provenance)


def static_costs(model, layers) -> dict[str, float]:
    """``size_bytes`` (packed), ``params``, ``macs`` and ``bitops`` of ``model`` with ``layer_costs`` ``layers``."""
    from slimsearch.deploy.pack import packed_size

    return {
        "size_bytes": float(packed_size(model)),
        "params": float(sum(p.numel() for p in model.parameters())),
        "macs": float(sum(layer.macs for layer in layers)),
        "bitops": float(sum(layer.macs * layer.weight_bits * layer.act_bits for layer in layers)),
    }


def modelled_costs(layers, profiles: Sequence[Any], power_modes: Mapping[str, str] | None = None) -> Metrics:
    """``latency_ms@P``, ``energy_mj@P`` and ``cost_usd_per_1m@P`` of a model's ``layers`` on every
    profile ``P`` (anything :func:`~slimsearch.hardware_profiles.load_profile` takes), at the
    power mode ``power_modes`` names for it (its default otherwise), all modelled. A model that
    does not run on a device as it is gets ``None`` figures there rather than a guess.
    """
    from slimsearch.exceptions import UnsupportedOnDevice
    from slimsearch.hardware_profiles import load_profile, predict

    values: dict[str, float | None] = {}
    provenance: dict[str, Provenance] = {}
    for ref in profiles:
        profile = load_profile(ref)
        name = profile.name
        try:
            pred = predict(layers, profile, power_mode=(power_modes or {}).get(name))
            figures = (("latency_ms", pred.latency_ms), ("energy_mj", pred.energy_mj),
                       ("cost_usd_per_1m", pred.cost_usd_per_1m))
        except UnsupportedOnDevice:
            figures = (("latency_ms", None), ("energy_mj", None), ("cost_usd_per_1m", None))
        for key, value in figures:
            values[f"{key}@{name}"] = value
            provenance[f"{key}@{name}"] = Provenance.MODELLED
    return Metrics(values=values, provenance=provenance)
