"""Structured pruning (width) and dropping whole blocks (depth), as the task's structure cuts them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from slimsearch.compress.registry import Context, register
from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import IMPORTANCES, CompressionPlan

TAYLOR_BATCH = 128  # training examples whose gradients rank channels for importance "taylor"


@dataclass(frozen=True)
class PruneConfig:
    """Share of channels/heads/neurons removed per prunable group, blocks dropped whole, and how
    channels are ranked."""

    ratios: Mapping[str, float] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    importance: str = "l1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", dict(self.ratios))
        object.__setattr__(self, "drop", tuple(self.drop))
        bad = {name: r for name, r in self.ratios.items() if not 0.0 <= r < 1.0}
        if bad:
            raise ConfigError(f"prune ratios must be in [0, 1), got {bad}")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance must be one of {list(IMPORTANCES)}, got {self.importance!r}")


def _from_plan(plan: CompressionPlan) -> PruneConfig | None:
    ratios = {name: lp.prune_ratio for name, lp in plan.layers.items() if lp.prune_ratio > 0}
    if not ratios and not plan.drop:
        return None
    return PruneConfig(ratios=ratios, drop=plan.drop, importance=plan.importance)


@register("prune", PruneConfig, order=10, from_plan=_from_plan, copies=True)  # the structures prune a copy
def prune(model, config: PruneConfig, context: Context):
    """The model with the groups' channels physically removed and the blocks dropped."""
    from slimsearch.structures.channels import ChannelStructure

    task = context.task
    kwargs = {"drop": config.drop, "importance": config.importance}
    if config.importance == "taylor":
        kwargs["batch"] = (task.train.x[:TAYLOR_BATCH], task.train.y[:TAYLOR_BATCH])
    return (task.structure or ChannelStructure()).prune(model, task.example_input, config.ratios, **kwargs)
