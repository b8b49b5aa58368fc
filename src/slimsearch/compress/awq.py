"""AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware scaling before rounding.

The few input channels that carry large activations matter most, so each linear group
whose input comes from a foldable predecessor (a norm, or a linear whose output rows
are the group's input columns) gets per-input-channel scales ``s = mean|x|^alpha``
(normalised), ``alpha`` chosen on a grid in [0, 1) to minimise the squared error of the
group's outputs, ``||x W^T - (x / s) Q(W diag(s))^T||``. The scales fold into the
predecessor (its weight and bias divided by ``s``) and the members' columns (multiplied
by ``s``), so the float model computes the same function and stays standard. Then,
optionally, AWQ's clipping search: per output channel and group, the shrunk range of
the weights that minimises the error of that group's partial outputs. Groups with no
foldable predecessor (``o_proj`` under grouped-query attention, GPT-2's projections)
are rounded to nearest (after the clipping search). As in :mod:`.gptq`, the first token
of each window (the attention sink) holds ``sink_weight`` of the scale search's loss.

Written here rather than taken from llm-compressor or AutoAWQ: both replace the layers
with packed kernels (or need a GPU); this keeps the model a plain float HF model and
uses our grid.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from slimsearch.compress._calibration import fold_scales, foldable, predecessor, sequential_groups
from slimsearch.compress._weight_config import WeightOnlyConfig, quantize_rows, store
from slimsearch.compress.quant.grid import effective_group_size
from slimsearch.structures import llm

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimsearch.compress.quant.grid import QuantizedWeight

__all__ = ["awq", "clip_weight", "search_scales"]

MAX_SHRINK = 0.5  # the clipping search shrinks a range by at most half (AWQ's default)
CLIP_TOKENS = 512  # tokens the clipping search scores on, as in AWQ


def search_scales(x: "torch.Tensor", weight: "torch.Tensor", config: WeightOnlyConfig, bits: int,
                  token_weights: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """Per-input-channel scales ``mean|x|^alpha`` (normalised) with the best ``alpha`` on the grid.

    Args:
        x: the group's inputs ``(tokens, in)``.
        weight: the members' weights stacked ``(out, in)``.
        token_weights: weight of each token's squared output error ``(tokens,)``; equal if None.
    """
    import torch

    if token_weights is None:
        token_weights = torch.full((x.shape[0],), 1.0 / x.shape[0], device=x.device)
    reference = x @ weight.t()
    mean_abs = x.abs().mean(0)
    best, best_scales = math.inf, torch.ones_like(mean_abs)
    for step in range(config.grid):
        alpha = step / config.grid
        scales = mean_abs.pow(alpha).clamp_min(1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        rounded = quantize_rows(weight * scales[None, :], config, bits).dequantize() / scales[None, :]
        loss = float(((x @ rounded.t() - reference).pow(2).mean(1) * token_weights).sum())
        if loss < best:
            best, best_scales = loss, scales
    return best_scales


def clip_weight(x: "torch.Tensor", weight: "torch.Tensor", config: WeightOnlyConfig, bits: int,
                grid: int = 20) -> "torch.Tensor":
    """``weight`` clamped per output channel and group to the range (shrunk by up to half)
    whose rounding best keeps that group's partial outputs on ``x``."""
    import torch
    import torch.nn.functional as F

    rows, cols = weight.shape
    g = effective_group_size(cols, config.group_size) or cols
    n = math.ceil(cols / g)
    if x.shape[0] > CLIP_TOKENS:
        x = x[torch.linspace(0, x.shape[0] - 1, CLIP_TOKENS, device=x.device).long()]
    xg = F.pad(x, (0, n * g - cols)).reshape(-1, n, g).transpose(0, 1)  # (groups, tokens, g)
    wg = F.pad(weight, (0, n * g - cols)).reshape(rows, n, g)
    reference = torch.bmm(xg, wg.permute(1, 2, 0))  # (groups, tokens, out)
    full = wg.abs().amax(-1, keepdim=True)  # (out, groups, 1)
    best_err = torch.full((n, rows), math.inf, device=weight.device)
    best_max = full.clone()
    for step in range(int(MAX_SHRINK * grid)):
        max_val = full * (1 - step / grid)
        clamped = torch.maximum(torch.minimum(wg, max_val), -max_val).reshape(rows, -1)[:, :cols]
        rounded = quantize_rows(clamped, config, bits).dequantize()
        rounded = F.pad(rounded, (0, n * g - cols)).reshape(rows, n, g)
        err = (torch.bmm(xg, rounded.permute(1, 2, 0)) - reference).pow(2).mean(1)  # (groups, out)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.t().unsqueeze(-1), max_val, best_max)
    return torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(rows, -1)[:, :cols]


def _sample(batches: Iterable["torch.Tensor"], stride: int, sink_weight: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Tokens ``(n, in)`` the searches score on (every first token of a window, every
    ``stride``-th other) and their weights: the first tokens share ``sink_weight``."""
    import torch

    firsts, others = [], []
    for batch in batches:
        firsts.append(batch[:, 0])
        others.append(batch[:, 1:].reshape(-1, batch.shape[-1])[::stride])
    first, other = torch.cat(firsts), torch.cat(others)
    if not sink_weight or not other.shape[0]:
        x = torch.cat([first, other])
        return x, torch.full((x.shape[0],), 1.0 / x.shape[0], device=x.device)
    weights = torch.cat([torch.full((first.shape[0],), sink_weight / first.shape[0], device=first.device),
                         torch.full((other.shape[0],), (1 - sink_weight) / other.shape[0], device=first.device)])
    return torch.cat([first, other]), weights


def _clips(path: str, paths: Sequence[str]) -> bool:
    """AWQ leaves queries and keys unclipped: their error matters through the attention
    scores, not the layer output (a fused q/k/v layer likewise)."""
    return not (path.endswith(("q_proj", "k_proj")) or len(paths) == 1 and path.endswith(("qkv_proj", "c_attn")))


def awq(model: "nn.Module", config: WeightOnlyConfig, calib: "torch.Tensor") -> dict[str, "QuantizedWeight"]:
    """Scale (where foldable), clip (if ``config.clip``) and round the selected decoder
    linears, block by block, in place.

    Args:
        model: a Hugging Face causal LM of a known decoder family.
        config: grid and groups (``method`` is not read), ``grid``, ``clip``, ``max_tokens``
            and ``sink_weight``.
        calib: token windows ``(n, seq_len)``.

    Returns:
        Full module path -> its quantized weight, ``(out, in)``.
    """
    import torch

    config.check_blocks(model)
    out: dict[str, "QuantizedWeight"] = {}
    stride = max(1, math.ceil(calib.numel() / config.max_tokens))

    def process(index: int, group: llm.LinearGroup, paths: list[str], inputs) -> None:
        bits = config.bits_for(index, group.name)
        if bits is None:
            return
        x, token_weights = _sample(inputs(), stride, config.sink_weight)
        weights = [llm.weight_of(llm.get(model, path)).to(torch.float32, copy=True) for path in paths]
        if foldable(model, group):
            scales = search_scales(x, torch.cat(weights), config, bits, token_weights)
            if not bool((scales == 1).all()):
                fold_scales(model, index, group, paths, scales)
                prev = predecessor(model, index, group)
                if prev in out:  # already rounded: its rows' scales take the division exactly
                    qw = out[prev]
                    store(model, prev, qw._replace(scale=qw.scale / scales.to(qw.scale.device)[:, None]), out)
                x = x / scales[None, :]
                weights = [w * scales[None, :] for w in weights]
        for path, weight in zip(paths, weights):
            if config.clip and _clips(path, paths):
                weight = clip_weight(x, weight, config, bits)
            store(model, path, quantize_rows(weight, config, bits), out)

    sequential_groups(model, calib, process, groups=config.active_groups(), batch_size=config.batch_size)
    return out
