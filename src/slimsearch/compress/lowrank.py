"""Low-rank factorisation: a Linear or 1x1 Conv2d becomes two thinner layers (truncated SVD).

``W ≈ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T)``: the first layer projects the input onto the
``r`` leading right singular vectors, the second maps back to the outputs and keeps
the bias. With ``r`` of the full rank ``min(out, in)`` kept (the rank ratio), the layer
holds ``r * (in + out)`` weights instead of ``in * out``, and its MACs shrink alike; the
two factors are ordinary layers, so costing, quantization, distillation and export
treat them as any other. A quantized layer's factors are quantized twins at its
settings (weights, input activations, group size, sparsity).

Layers of other kinds (a k x k or grouped convolution, anything not a Linear or a
1x1 Conv2d) are left whole: their rank ratio has no effect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from slimsearch.compress.registry import Context, register
from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import CompressionPlan


@dataclass(frozen=True)
class LowRankConfig:
    """Layer name -> share of its full rank kept, in (0, 1)."""

    ranks: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", {name: float(r) for name, r in self.ranks.items()})
        bad = {name: r for name, r in self.ranks.items() if not 0.0 < r < 1.0}
        if bad:
            raise ConfigError(f"rank ratios of factorised layers must be in (0, 1), got {bad}")


def _from_plan(plan: CompressionPlan) -> LowRankConfig | None:
    ranks = {name: lp.rank_ratio for name, lp in plan.layers.items() if lp.rank_ratio < 1.0}
    return LowRankConfig(ranks) if ranks else None


def rank_of(module, ratio: float) -> int:
    """The rank kept: ``ratio`` of ``min(out, in)``, rounded, at least 1."""
    weight = module.weight
    full = min(weight.shape[0], weight[0].numel())
    return max(1, min(full, round(ratio * full)))


def factorisable(module) -> bool:
    """A Linear, or a 1x1 ungrouped Conv2d (their quantized twins too)."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def low_rank(module, ratio: float):
    """``nn.Sequential(first, second)`` standing for ``module`` at rank ``rank_of(module, ratio)``."""
    import torch
    from torch import nn

    from slimsearch.compress.quant.layers import is_quantized, quantized_twin

    rank = rank_of(module, ratio)
    weight = module.weight.detach()
    out_features = weight.shape[0]
    u, s, vh = torch.linalg.svd(weight.reshape(out_features, -1).double(), full_matrices=False)
    root = s[:rank].sqrt()
    first_w = (root[:, None] * vh[:rank]).float()
    second_w = (u[:, :rank] * root[None, :]).float()
    bias = module.bias is not None
    where = {"device": weight.device}  # the factors live where the layer did
    if isinstance(module, nn.Linear):
        first = nn.Linear(weight.shape[1], rank, bias=False, **where)
        second = nn.Linear(rank, out_features, bias=bias, **where)
    else:
        first = nn.Conv2d(weight.shape[1], rank, 1, stride=module.stride, padding=module.padding,
                          dilation=module.dilation, bias=False, **where)
        second = nn.Conv2d(rank, out_features, 1, bias=bias, **where)
        first_w, second_w = first_w[:, :, None, None], second_w[:, :, None, None]
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if bias:
            second.bias.copy_(module.bias.detach())
    if is_quantized(module):
        settings = {"group_size": module.group_size, "symmetric": module.symmetric}
        first = quantized_twin(first, module.weight_bits, module.act_bits, **settings)
        second = quantized_twin(second, module.weight_bits, module.act_bits, **settings)
        if module.sparsity > 0:
            for part in (first, second):
                part.set_sparsity(module.sparsity, module.sparsity_pattern)
    return nn.Sequential(first, second).train(module.training)


@register("lowrank", LowRankConfig, order=30, from_plan=_from_plan)
def factorise(model, config: LowRankConfig, context: Context | None = None):
    """Replace each named factorisable layer by its two factors (in place); others stay whole."""
    from slimsearch.compress.quant.layers import set_module

    modules = dict(model.named_modules())
    unknown = sorted(set(config.ranks) - set(modules))
    if unknown:
        raise ConfigError(f"lowrank: unknown layer {unknown[0]!r}; the model's layers: "
                          f"{[n for n, m in modules.items() if factorisable(m)]}")
    for name, ratio in config.ranks.items():
        if factorisable(modules[name]):
            set_module(model, name, low_rank(modules[name], ratio))
    return model
