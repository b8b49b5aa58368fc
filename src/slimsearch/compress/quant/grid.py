"""Weight grids: ``bits`` in 2..8 or 16 (32 = left in float), one scale per output channel
or per group of ``group_size`` consecutive input elements of each output row,
symmetric (codes in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``) or asymmetric (codes
in ``[0, 2**bits - 1]`` with a zero point per group). Per-group scales are stored as
8-bit multiples of one float32 step per tensor (two-level scales, as GGUF's k-quants
and NVFP4 do), so that scales cost 8 bits per group, not 32; ``two_level=False`` keeps
them as plain float32 per group, as GPTQ, AWQ, compressed-tensors and onnxruntime's
MatMulNBits store them (the LLM path).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from slimsearch.exceptions import ConfigError

SCALE_CODE_MAX = 255  # per-group scales are stored as 8-bit multiples of a per-tensor step


class QuantizedWeight(NamedTuple):
    """A weight tensor as integer codes and the parameters that map them back to floats.

    Attributes:
        codes: int32 codes, in the weight's shape.
        scale: float32 scale per output channel and group, shape ``(out, groups)``.
        zero_point: int32 code of 0.0 per output channel and group, ``(out, groups)``
            (all zero when symmetric).
        scale_step: two-level per-group scales only: the float32 step the scales are
            8-bit multiples of (``scale == scale_codes * scale_step``); None per channel
            or with plain float32 scales per group.
        bits: code width.
        group_size: input elements per scale; 0 = one scale per output channel.
        symmetric: symmetric (signed codes) or asymmetric (unsigned codes).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    scale_step: Optional[torch.Tensor]
    bits: int
    group_size: int
    symmetric: bool

    @property
    def groups(self) -> int:
        return int(self.scale.shape[1])

    def scale_codes(self) -> torch.Tensor:
        """Per-group scales as their 8-bit codes (int32, ``(out, groups)``)."""
        if self.scale_step is None:
            raise ValueError("these scales are stored as float32, not as codes")
        return torch.round(self.scale / self.scale_step).to(torch.int32)

    def dequantize(self) -> torch.Tensor:
        """``(codes - zero_point) * scale`` in float32, in the weight's shape."""
        rows = self.codes.reshape(self.codes.shape[0], -1)
        k = rows.shape[1]
        grouped = _grouped(rows, self.group_size)
        values = (grouped - self.zero_point.unsqueeze(-1)).to(torch.float32) * self.scale.unsqueeze(-1)
        return values.reshape(rows.shape[0], -1)[:, :k].reshape(self.codes.shape)


def effective_group_size(row_length: int, group_size: int) -> int:
    """``group_size``, or 0 (per channel) when it is 0 or covers the whole row."""
    return group_size if 0 < group_size < row_length else 0


def num_groups(row_length: int, group_size: int) -> int:
    g = effective_group_size(row_length, group_size)
    return math.ceil(row_length / g) if g else 1


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest code of a ``bits``-bit weight grid."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2**bits - 1


def _grouped(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(out, k)`` rows as ``(out, groups, g)``, the last group padded with zeros."""
    k = rows.shape[1]
    g = effective_group_size(k, group_size) or k
    n = math.ceil(k / g)
    if n * g != k:
        rows = F.pad(rows, (0, n * g - k))
    return rows.reshape(rows.shape[0], n, g)


def _two_level(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round per-group scales up to 8-bit multiples of one per-tensor step.

    Rounding up keeps every weight inside its group's range, so nothing is clipped.
    """
    step = (scale.max() / SCALE_CODE_MAX).clamp_min(1e-30)
    codes = torch.ceil(scale / step).clamp(1, SCALE_CODE_MAX)
    return codes.to(torch.float32) * step, step


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    *,
    group_size: int = 0,
    symmetric: bool = True,
    scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
    scale_step: Optional[torch.Tensor] = None,
    two_level: bool = True,
) -> QuantizedWeight:
    """Round ``weight`` to its integer grid.

    With ``scale`` (and ``zero_point``, ``scale_step``) given, the codes are taken on
    that grid; otherwise the grid is fitted: symmetric scale ``max|w| / qmax``, or
    asymmetric over ``[min(w, 0), max(w, 0)]`` so that 0.0 is always exactly a code
    (pruned weights stay exactly zero). ``two_level`` stores fitted per-group scales as
    8-bit multiples of a per-tensor step; without it they stay plain float32.
    """
    if not 2 <= bits <= 16:
        raise ConfigError(f"weight bits must be in [2, 16], got {bits}")
    w = weight.detach().to(torch.float32)
    rows = w.reshape(w.shape[0], -1)
    k = rows.shape[1]
    g = effective_group_size(k, group_size)
    grouped = _grouped(rows, g)
    lo_code, hi_code = code_range(bits, symmetric)
    if scale is None:
        if symmetric:
            scale = grouped.abs().amax(-1).clamp_min(1e-12) / hi_code
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            lo = grouped.amin(-1).clamp_max(0.0)
            hi = grouped.amax(-1).clamp_min(0.0)
            scale = ((hi - lo) / hi_code).clamp_min(1e-12)
        scale_step = None
        if g and two_level:
            scale, scale_step = _two_level(scale)
        if not symmetric:
            zero_point = torch.clamp(torch.round(-lo / scale), lo_code, hi_code).to(torch.int32)
    elif zero_point is None:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    codes = torch.round(grouped / scale.unsqueeze(-1)) + zero_point.unsqueeze(-1)
    codes = torch.clamp(codes, lo_code, hi_code).to(torch.int32)
    codes = codes.reshape(rows.shape[0], -1)[:, :k].reshape(weight.shape)
    return QuantizedWeight(codes, scale, zero_point, scale_step, int(bits), g, bool(symmetric))


def weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale: max |w| of the channel over ``2**(bits-1) - 1``."""
    return quantize_weight(weight, bits).scale[:, 0]


def quantize_weight_int(weight: torch.Tensor, bits: int, *, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer codes and their scales: ``(out,)`` per channel, ``(out, groups)`` per group."""
    qw = quantize_weight(weight, bits, group_size=group_size)
    return qw.codes, (qw.scale if qw.group_size else qw.scale[:, 0])


def fake_quant_weight(weight: torch.Tensor, bits: int, *, group_size: int = 0, symmetric: bool = True) -> torch.Tensor:
    """``weight`` rounded to its grid in the forward pass, identity in the backward pass."""
    quantized = quantize_weight(weight, bits, group_size=group_size, symmetric=symmetric).dequantize()
    return weight + (quantized.to(weight.dtype) - weight).detach()
