"""Sparsity masks: a fixed magnitude mask (unstructured, or 2:4 -- the two largest of every
four consecutive input weights) computed once from the float weights when a layer is set up.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

NM_PATTERN = "2:4"
NM_KEEP, NM_GROUP = 2, 4


def nm_rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as ``(out, k)`` rows in the order 2:4 groups run along.

    Linear: the input features. Conv: the input channels at each kernel position
    (``(out, kh, kw, in)``), the layout sparse tensor cores take for convolutions.
    """
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)


def from_nm_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`nm_rows`."""
    if len(shape) == 4:
        out, cin, kh, kw = shape
        return rows.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    return rows.reshape(shape)


def nm_groups(rows: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``(out, k)`` rows as ``(out, ceil(k/4), 4)``, the last group padded with ``fill``."""
    k = rows.shape[1]
    n = math.ceil(k / NM_GROUP)
    if n * NM_GROUP != k:
        rows = F.pad(rows, (0, n * NM_GROUP - k), value=fill)
    return rows.reshape(rows.shape[0], n, NM_GROUP)


def nm_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive input weights (see :func:`nm_rows`)."""
    rows = nm_rows(weight.detach().abs())
    groups = nm_groups(rows, fill=-1.0)  # padding is never kept over a real weight
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(NM_KEEP, dim=-1).indices, True)
    keep = keep.reshape(rows.shape[0], -1)[:, : rows.shape[1]]
    return from_nm_rows(keep, weight.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``round(sparsity * numel)`` smallest |w| of the tensor (unstructured)."""
    flat = weight.detach().abs().flatten()
    drop = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:drop]] = False
    return keep.reshape(weight.shape)


def sparsity_mask(weight: torch.Tensor, sparsity: float, pattern: Optional[str]) -> torch.Tensor:
    """The fixed mask of a layer: 2:4 when ``pattern == "2:4"``, else unstructured magnitude."""
    return nm_mask(weight) if pattern == NM_PATTERN else magnitude_mask(weight, sparsity)
