"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): weights rounded one input column at a
time, each column's rounding error spread over the columns not yet rounded, weighted by
the inverse Hessian of the layer's squared output error, ``H = 2 X^T X / n``.

Blocks are calibrated in order (:mod:`._calibration`), each linear group on the inputs
of the model as quantized so far; members of a group that read one input (q, k, v)
share one Hessian and are solved as one stacked weight. Group scales are fitted from
the current, already error-updated weights when a group's first column comes up
(static column order; no act-order), the last group of a row possibly shorter.

One departure from the paper: the first token of each calibration window, the attention
sink, holds ``sink_weight`` (10%) of the Hessian rather than 1/seq_len (see
:func:`hessian`); on SmolLM2-135M this took GPTQ from worse than round-to-nearest to
well below it.

Written here rather than taken from llm-compressor or AutoGPTQ: those replace the
layers or need a GPU build, and the solver is ~60 lines on our grid.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

from slimsearch.compress._calibration import sequential_groups
from slimsearch.compress._weight_config import WeightOnlyConfig, store
from slimsearch.compress.quant.grid import code_range, effective_group_size, quantize_weight
from slimsearch.structures import llm

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimsearch.compress.quant.grid import QuantizedWeight

__all__ = ["gptq", "gptq_weight", "hessian"]


def hessian(inputs: Iterable["torch.Tensor"], sink_weight: float = 0.0) -> "torch.Tensor":
    """``2 X^T X / n`` over the tokens of every batch of layer inputs.

    With ``sink_weight`` 0 a batch may have any shape ``(..., in_features)``. Otherwise
    batches are ``(windows, seq_len, in_features)`` and the first tokens of the windows
    hold ``sink_weight`` of the sum, the other tokens the rest: ``2 ((1 - w) X_r^T X_r / n_r
    + w X_f^T X_f / n_f)``. The first token of a sequence becomes the attention sink
    of a trained LLM (massive activations, Sun et al. 2024), which every later query
    attends to: weighted as one token of 512 its q/k/v errors grow under GPTQ while all
    others shrink, and perplexity rises above round-to-nearest's (SmolLM2-135M, 4 bits).
    """
    import torch

    sums = [None, None]  # first tokens, other tokens
    counts = [0, 0]
    for x in inputs:
        x = x.to(torch.float32)
        if sink_weight:
            if x.dim() != 3:
                raise ValueError(f"with a sink weight, inputs must be (windows, seq_len, in), got {tuple(x.shape)}")
            parts = (x[:, 0], x[:, 1:].reshape(-1, x.shape[-1]))
        else:
            parts = (x[:0].reshape(0, x.shape[-1]), x.reshape(-1, x.shape[-1]))
        for i, part in enumerate(parts):
            if part.shape[0]:
                product = part.t() @ part
                sums[i] = product if sums[i] is None else sums[i] + product
                counts[i] += part.shape[0]
    if sums[0] is None and sums[1] is None:
        raise ValueError("no calibration inputs reached the layer")
    if sums[0] is None or sums[1] is None:  # plain, or windows of one token
        total = sums[0] if sums[1] is None else sums[1]
        return total * (2.0 / (counts[0] + counts[1]))
    return 2.0 * ((1.0 - sink_weight) * sums[1] / counts[1] + sink_weight * sums[0] / counts[0])


def _inverse_cholesky(h: "torch.Tensor", damp: float) -> "torch.Tensor":
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, damping more until it exists."""
    import torch

    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h + eye * (damp * 10**attempt * mean_diag))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("the layer's Hessian stayed singular after damping; are its calibration inputs all zero?")


def gptq_weight(weight: "torch.Tensor", hess: "torch.Tensor", *, bits: int, group_size: int = 0,
                symmetric: bool = True, damp: float = 0.01, block_size: int = 128) -> "QuantizedWeight":
    """One ``(out, in)`` weight quantized by GPTQ against the Hessian ``hess`` ``(in, in)``.

    Scales are float32 per group (no two-level codes). Columns the inputs never reach
    (zero Hessian diagonal) are set to zero.
    """
    import torch

    w = weight.detach().to(torch.float32).clone()
    h = hess.detach().to(device=w.device, dtype=torch.float32).clone()
    rows, cols = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, damp)
    g = effective_group_size(cols, group_size) or cols
    step = math.ceil(block_size / g) * g if g < cols else block_size  # no group straddles two batches
    lo, hi = code_range(bits, symmetric)
    n_groups = math.ceil(cols / g)
    scale = torch.zeros(rows, n_groups, dtype=torch.float32, device=w.device)
    zero = torch.zeros(rows, n_groups, dtype=torch.int32, device=w.device)
    q = torch.zeros_like(w)
    s = z = None
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                fit = quantize_weight(w1[:, i:i + g], bits, symmetric=symmetric, two_level=False)
                s, z = fit.scale[:, 0], fit.zero_point[:, 0].to(torch.float32)
                scale[:, col // g], zero[:, col // g] = fit.scale[:, 0], fit.zero_point[:, 0]
            x = w1[:, i]
            rounded = (torch.clamp(torch.round(x / s) + z, lo, hi) - z) * s
            q[:, col] = rounded
            e = (x - rounded) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return quantize_weight(q, bits, group_size=group_size, symmetric=symmetric, scale=scale, zero_point=zero,
                           two_level=False)


def _rows(qw: "QuantizedWeight", start: int, stop: int) -> "QuantizedWeight":
    return qw._replace(codes=qw.codes[start:stop], scale=qw.scale[start:stop], zero_point=qw.zero_point[start:stop])


def gptq(model: "nn.Module", config: WeightOnlyConfig, calib: "torch.Tensor") -> dict[str, "QuantizedWeight"]:
    """Quantize the selected decoder linears by GPTQ, block by block, in place.

    Args:
        model: a Hugging Face causal LM of a known decoder family.
        config: grid and groups (``method`` is not read), ``damp``, ``block_size`` and
            ``sink_weight``.
        calib: token windows ``(n, seq_len)``.

    Returns:
        Full module path -> its quantized weight, ``(out, in)``.
    """
    import torch

    config.check_blocks(model)
    out: dict[str, "QuantizedWeight"] = {}

    def process(index: int, group: llm.LinearGroup, paths: list[str], inputs) -> None:
        bits = config.bits_for(index, group.name)
        if bits is None:
            return
        hess = hessian(inputs(), config.sink_weight)
        weights = [llm.weight_of(llm.get(model, path)).to(torch.float32) for path in paths]
        stacked = gptq_weight(torch.cat(weights), hess, bits=bits, group_size=config.group_size,
                              symmetric=config.symmetric, damp=config.damp, block_size=config.block_size)
        start = 0
        for path, weight in zip(paths, weights):
            store(model, path, _rows(stacked, start, start + weight.shape[0]), out)
            start += weight.shape[0]

    sequential_groups(model, calib, process, groups=config.active_groups(), batch_size=config.batch_size)
    return out
