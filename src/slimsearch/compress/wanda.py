"""2:4 sparsity of a decoder LLM's linear layers by Wanda (Sun et al. 2023).

Each weight is scored by its magnitude times the L2 norm of its input feature over
calibration tokens, ``|W_ij| * ||X_j||``, and the two highest-scoring of every four
consecutive input weights are kept, the pattern sparse tensor cores accelerate. No
weight is updated (Wanda's point: as good as SparseGPT at 2:4 for a fraction of the
work). The zeros make the model no faster on a device that does not accelerate 2:4:
the modelled cost (:func:`~slimsearch.hardware_profiles.predict_decoder`) lowers only on
profiles that list the pattern, and this CPU has no such kernel.

Why not llm-compressor's ``WandaPruningModifier``: llm-compressor 0.14 pins transformers
<= 5.17 and compressed-tensors 0.19 (see pyproject.toml); the method is a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from slimsearch.exceptions import ConfigError
from slimsearch.structures import llm

if TYPE_CHECKING:
    import torch
    from torch import nn

GROUP_NAMES = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class WandaConfig:
    """2:4 sparsity of the decoder linears of the named groups."""

    pattern: str = "2:4"
    groups: Sequence[str] = GROUP_NAMES

    def __post_init__(self) -> None:
        if self.pattern != "2:4":
            raise ConfigError(f"WandaConfig.pattern must be '2:4', got {self.pattern!r}")
        object.__setattr__(self, "groups", tuple(self.groups))
        unknown = sorted(set(self.groups) - set(GROUP_NAMES))
        if unknown:
            raise ConfigError(f"WandaConfig.groups: unknown group(s) {unknown}; allowed: {list(GROUP_NAMES)}")


def input_norms(model: "nn.Module", calib: "torch.Tensor", paths: Sequence[str]) -> dict[str, "torch.Tensor"]:
    """L2 norm of each input feature of each linear at ``paths`` over the calibration tokens."""
    import torch

    sums = {p: None for p in paths}
    hooks = []

    def hook_for(path):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            square = (x * x).sum(0)
            sums[path] = square if sums[path] is None else sums[path] + square
        return hook

    for path in paths:
        hooks.append(model.get_submodule(path).register_forward_pre_hook(hook_for(path)))
    try:
        with torch.no_grad():
            for window in calib:
                model(input_ids=window.unsqueeze(0), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {p: s.sqrt() for p, s in sums.items()}


def sparsify(model: "nn.Module", config: WandaConfig, calib: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """Zero half the weights of each chosen decoder linear in a 2:4 pattern (in place); returns
    path -> its keep mask, ``(out, in)``."""
    from slimsearch.compress.quant.sparsity import nm_mask

    paths = [p for _, group, members in llm.group_linears(model) if group.name in config.groups for p in members]
    norms = input_norms(model, calib, paths)
    masks = {}
    for path in paths:
        module = model.get_submodule(path)
        weight = llm.weight_of(module).detach()
        mask = nm_mask(weight.abs() * norms[path].unsqueeze(0))
        llm.set_weight(module, weight * mask)
        masks[path] = mask
    return masks
