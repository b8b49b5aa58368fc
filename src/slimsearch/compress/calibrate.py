"""Activation ranges of the quantized layers' inputs, calibrated on training batches."""

from __future__ import annotations

from dataclasses import dataclass

from slimsearch.compress.registry import Context, register
from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import ACT_CALIBRATIONS, FULL_PRECISION, CompressionPlan


@dataclass(frozen=True)
class CalibrateConfig:
    """How the ranges are chosen (``minmax``, ``percentile``, ``mse``) and on how much data."""

    method: str = "minmax"
    batches: int = 4
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in ACT_CALIBRATIONS:
            raise ConfigError(f"act_calibration must be one of {list(ACT_CALIBRATIONS)}, got {self.method!r}")
        if self.batches < 1 or self.batch_size < 1:
            raise ConfigError(f"calibration needs batches >= 1 and batch_size >= 1, got {self.batches} and "
                              f"{self.batch_size}")


def _from_plan(plan: CompressionPlan) -> CalibrateConfig | None:
    if all(lp.act_bits >= FULL_PRECISION for lp in plan.layers.values()):
        return None
    return CalibrateConfig(method=plan.act_calibration)


@register("calibrate", CalibrateConfig, order=40, from_plan=_from_plan)
def calibrate(model, config: CalibrateConfig, context: Context):
    """Observe the quantized layers' inputs on random training batches (seeded by the plan)."""
    import torch

    from slimsearch.compress.quant.layers import calibrate_activations

    train = context.task.train
    gen = torch.Generator().manual_seed(context.plan.seed)
    batches = [train.x[torch.randint(0, len(train), (config.batch_size,), generator=gen)]
               for _ in range(config.batches)]
    calibrate_activations(model, batches, method=config.method)
    return model
