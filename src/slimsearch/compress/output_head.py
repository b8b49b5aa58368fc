"""The output projection (``lm_head``) of a decoder LLM rounded to nearest, and with it a tied input embedding.

Weight-only quantization (:mod:`slimsearch.compress.weight_only`) rounds the decoder's linears; the
output projection is not among them, and the field's uniform recipes (llm-compressor's W4A16 and
W8A8 schemes ignore ``lm_head``) leave it in float. In a small model it is most of the bytes a token
reads: SmolLM2-135M's tied 49,152 x 576 projection holds 113 MB in float32, the 30 blocks' linears
at 4 bits 57 MB. Rounded to 8 bits in blocks of 64 it reads about a quarter of that, and a tied
input embedding (the same tensor) reads the same packed bytes in the deployed graph
(onnxruntime's GatherBlockQuantized, :func:`~slimsearch.deploy.onnx_nbits.to_matmul_nbits`).

Blocks of 64 divide the usual hidden sizes, which GatherBlockQuantized needs; the codes are
symmetric (no zero points stored). The model keeps the de-quantized float values, as the linears
of weight-only quantization do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimsearch.exceptions import ConfigError
from slimsearch.spaces import choices

if TYPE_CHECKING:
    from torch import nn

    from slimsearch.compress.quant.grid import QuantizedWeight

__all__ = ["HEAD_BITS", "HEAD_GROUP_SIZE", "HeadConfig", "quantize_output_projection"]

# the widths GatherBlockQuantized reads, so a tied embedding shares the packed codes (the plan's head_bits)
HEAD_BITS = tuple(b for b in choices.HEAD_BITS if b < choices.FULL_PRECISION)
HEAD_GROUP_SIZE = 64


@dataclass(frozen=True)
class HeadConfig:
    """The output projection at ``bits`` (8 or 4), rounded to nearest in blocks of ``group_size``."""

    bits: int = 8
    group_size: int = HEAD_GROUP_SIZE

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in HEAD_BITS:
            raise ConfigError(f"HeadConfig.bits must be one of {list(HEAD_BITS)}, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 16:
            raise ConfigError(f"HeadConfig.group_size must be an integer >= 16, got {self.group_size!r}")


def quantize_output_projection(model: "nn.Module", *, bits: int = 8, group_size: int = HEAD_GROUP_SIZE,
                               symmetric: bool = True) -> "QuantizedWeight":
    """Round the output projection of ``model`` with plain RTN, write it back de-quantized (in place; a
    tied input embedding, the same tensor, changes too) and return its codes."""
    import torch

    from slimsearch.compress.quant.grid import quantize_weight

    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output projection (get_output_embeddings() is None)")
    qw = quantize_weight(head.weight.detach(), bits, group_size=group_size, symmetric=symmetric)
    with torch.no_grad():
        head.weight.copy_(qw.dequantize().to(head.weight.dtype))
    return qw
