"""Unstructured or 2:4 magnitude sparsity per layer: a fixed mask on the layer's weights.

The stored bytes shrink only with a sparse format, and the latency only on a profile that
accelerates the pattern (DESIGN.md, "Honesty rules"): the costing reads the mask's pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from slimsearch.compress.quant.sparsity import NM_PATTERN
from slimsearch.compress.registry import Context, register
from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import SPARSITY_PATTERNS, CompressionPlan


@dataclass(frozen=True)
class SparsityConfig:
    """Layer name -> (share of weights zeroed, pattern)."""

    layers: Mapping[str, tuple[float, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers = {name: (float(s), str(p)) for name, (s, p) in self.layers.items()}
        for name, (sparsity, pattern) in layers.items():
            if pattern not in SPARSITY_PATTERNS:
                raise ConfigError(f"layer {name!r}: sparsity_pattern must be one of {list(SPARSITY_PATTERNS)}, "
                                  f"got {pattern!r}")
            if not 0.0 < sparsity < 1.0 or (pattern == NM_PATTERN and sparsity != 0.5):
                raise ConfigError(f"layer {name!r}: sparsity must be in (0, 1), and 0.5 with pattern "
                                  f"{NM_PATTERN!r} (two of every four kept), got {sparsity}")
        object.__setattr__(self, "layers", layers)


def from_plan(plan: CompressionPlan) -> SparsityConfig | None:
    layers = {name: (lp.sparsity, lp.sparsity_pattern) for name, lp in plan.layers.items() if lp.sparsity > 0}
    return SparsityConfig(layers) if layers else None


@register("sparsity", SparsityConfig, order=25, from_plan=from_plan)
def sparsify(model, config: SparsityConfig, context: Context | None = None):
    """Fix each named layer's mask from its current weights (a plain layer becomes a float twin first)."""
    from torch import nn

    from slimsearch.compress.quant.layers import is_quantized, quantized_twin, set_module

    for name, module in list(model.named_modules()):
        if name not in config.layers:
            continue
        if type(module) in (nn.Conv2d, nn.Linear):
            module = quantized_twin(module)
            set_module(model, name, module)
        if is_quantized(module):
            module.set_sparsity(*config.layers[name])
    return model
