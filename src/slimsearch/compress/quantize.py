"""Weight and activation quantization per layer: each plain Conv2d/Linear the plan quantizes
becomes its quantized twin (:mod:`slimsearch.compress.quant.layers`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from slimsearch.compress.registry import Context, register
from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import ACT_BITS, FULL_PRECISION, WEIGHT_BITS, CompressionPlan


@dataclass(frozen=True)
class LayerQuant:
    """One layer's grid: bit-widths (32 = float), weight group size (0 = per channel), symmetry."""

    weight_bits: int = FULL_PRECISION
    act_bits: int = FULL_PRECISION
    group_size: int = 0
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.weight_bits not in WEIGHT_BITS:
            raise ConfigError(f"weight_bits must be one of {list(WEIGHT_BITS)}, got {self.weight_bits}")
        if self.act_bits not in ACT_BITS:
            raise ConfigError(f"act_bits must be one of {list(ACT_BITS)}, got {self.act_bits}")
        if self.group_size < 0:
            raise ConfigError(f"group_size must be 0 (per channel) or a positive size, got {self.group_size}")


@dataclass(frozen=True)
class QuantizeConfig:
    """Layer name -> its grid, for the layers quantized."""

    layers: Mapping[str, LayerQuant] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", {name: q if isinstance(q, LayerQuant) else LayerQuant(**q)
                                            for name, q in self.layers.items()})


def _from_plan(plan: CompressionPlan) -> QuantizeConfig | None:
    layers = {name: LayerQuant(lp.weight_bits, lp.act_bits, lp.group_size, lp.symmetric)
              for name, lp in plan.layers.items()
              if lp.weight_bits < FULL_PRECISION or lp.act_bits < FULL_PRECISION}
    return QuantizeConfig(layers) if layers else None


@register("quantize", QuantizeConfig, order=20, from_plan=_from_plan)
def quantize(model, config: QuantizeConfig, context: Context | None = None):
    """Swap each named plain Conv2d/Linear for its quantized twin (in place)."""
    from torch import nn

    from slimsearch.compress.quant.layers import quantized_twin, set_module

    for name, module in list(model.named_modules()):
        q = config.layers.get(name)
        if q is None or type(module) not in (nn.Conv2d, nn.Linear):
            continue
        set_module(model, name, quantized_twin(module, q.weight_bits, q.act_bits, group_size=q.group_size,
                                               symmetric=q.symmetric))
    return model


def quantize_layers(model, plan: CompressionPlan):
    """Quantize and sparsify ``model``'s layers (in place) as the plan's layer choices say."""
    from slimsearch.compress.registry import apply_config
    from slimsearch.compress.sparsity import from_plan as sparsity_from_plan

    for config in (_from_plan(plan), sparsity_from_plan(plan)):
        if config is not None:
            model = apply_config(model, config, None)
    return model
