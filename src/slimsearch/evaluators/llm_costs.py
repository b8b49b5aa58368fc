"""What a decoder LLM costs per generated token and on disk, from the model and its packed weights.

:func:`decoder_footprint` counts the bytes read and the MACs done per token
(:class:`~slimsearch.hardware_profiles.DecoderFootprint`), which
:func:`~slimsearch.hardware_profiles.predict_decoder` turns into modelled decode and
prefill times, energy and money per profile. :func:`weight_bytes` is the size of the
deployed weights. Both follow the layout the deploy code writes: a quantized linear is
its codes plus one float32 scale per group (and a zero point per group when asymmetric,
as onnxruntime's MatMulNBits and compressed-tensors store them); everything else float32.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Optional

from slimsearch.hardware_profiles import DecoderFootprint
from slimsearch.structures import llm

if TYPE_CHECKING:
    from torch import nn

    from slimsearch.compress.quant.grid import QuantizedWeight

FLOAT_BYTES = 4


def quantized_linear_bytes(in_features: int, out_features: int, bits: int, group_size: int,
                           symmetric: bool) -> int:
    """Packed bytes of one quantized linear: codes, float32 scales, zero points when asymmetric."""
    groups = math.ceil(in_features / group_size) if 0 < group_size < in_features else 1
    codes = math.ceil(in_features * out_features * bits / 8)
    zero_points = 0 if symmetric else math.ceil(out_features * groups * bits / 8)
    return codes + out_features * groups * FLOAT_BYTES + zero_points


def _linear_bytes(path: str, module: "nn.Module", quantized: Mapping[str, "QuantizedWeight"]) -> int:
    in_features, out_features = llm.in_out(module)
    bias = FLOAT_BYTES * out_features if getattr(module, "bias", None) is not None else 0
    q = quantized.get(path)
    if q is None:
        return in_features * out_features * FLOAT_BYTES + bias
    return quantized_linear_bytes(in_features, out_features, q.bits, q.group_size, q.symmetric) + bias


def lm_head_bytes(vocab: int, hidden: int, bits: int, group_size: int) -> int:
    """The output projection's bytes: float32, or symmetric codes and scales (what
    :func:`~slimsearch.compress.output_head.quantize_output_projection` writes; no zero points)."""
    if bits >= 32:
        return vocab * hidden * FLOAT_BYTES
    return quantized_linear_bytes(hidden, vocab, bits, group_size, symmetric=True)


def head_kwargs(head: Optional["QuantizedWeight"]) -> dict[str, int]:
    """The ``lm_head_bits`` and ``lm_head_group`` keywords of :func:`decoder_footprint` and
    :func:`weight_bytes` for a rounded output projection's codes (none for a float one)."""
    return {} if head is None else {"lm_head_bits": int(head.bits), "lm_head_group": int(head.group_size)}


def decoder_footprint(model: "nn.Module", *, quantized: Optional[Mapping[str, "QuantizedWeight"]] = None,
                      kv_bits: int = 32, lm_head_bits: int = 32, lm_head_group: int = 32, act_bits: int = 32,
                      sparsity: Optional[str] = None) -> DecoderFootprint:
    """Bytes read and MACs done per generated token by ``model`` deployed with ``quantized``
    linears, a ``kv_bits`` key/value cache (32: float32, as the float graph keeps it) and an
    output projection at ``lm_head_bits``."""
    quantized = quantized or {}
    linears = llm.decoder_linears(model)
    weight_bytes = sum(_linear_bytes(path, m, quantized) for path, m in linears.items())
    macs = sum(a * b for a, b in (llm.in_out(m) for m in linears.values()))
    vocab, hidden = model.get_input_embeddings().weight.shape
    weight_bytes += lm_head_bytes(vocab, hidden, lm_head_bits, lm_head_group) + hidden * FLOAT_BYTES
    macs += vocab * hidden
    weight_bytes += _norm_bytes(model)
    n_heads, n_kv, head_dim = llm.heads(model)
    layers = len(llm.blocks(model))
    kv_scales = 0 if kv_bits >= 16 else 2 * layers * n_kv * 2 * 2  # fp16 scale + zero point per token, head
    weight_bits = max((q.bits for q in quantized.values()), default=32)
    return DecoderFootprint(
        weight_bytes=int(weight_bytes), macs=int(macs),
        kv_bytes_per_token=int(math.ceil(2 * layers * n_kv * head_dim * kv_bits / 8) + kv_scales),
        attention_macs_per_token=int(2 * layers * n_heads * head_dim),
        weight_bits=int(weight_bits), act_bits=int(act_bits), sparsity=sparsity)


def _norm_bytes(model: "nn.Module") -> int:
    """Bytes of the parameters outside the linears and embeddings (norms, biases of norms)."""
    from torch import nn

    skip = {id(m.weight) for m in llm.decoder_linears(model).values()}
    skip |= {id(getattr(m, "bias", None)) for m in llm.decoder_linears(model).values()}
    skip.add(id(model.get_input_embeddings().weight))
    out = model.get_output_embeddings()
    if out is not None:
        skip.add(id(out.weight))
    return sum(p.numel() * FLOAT_BYTES for p in model.parameters() if id(p) not in skip
               and not isinstance(p, nn.UninitializedParameter))


def weight_bytes(model: "nn.Module", *, quantized: Optional[Mapping[str, "QuantizedWeight"]] = None,
                 lm_head_bits: int = 32, lm_head_group: int = 32) -> int:
    """Bytes of the deployed weights: packed linears, float32 norms, the output projection at
    ``lm_head_bits`` and the input embedding. A tied embedding is the output projection's own
    bytes, read packed too when the projection is quantized (onnxruntime's GatherBlockQuantized,
    as :func:`slimsearch.deploy.onnx_nbits.to_matmul_nbits` writes it); an untied one is a
    float32 table of its own."""
    quantized = quantized or {}
    vocab, hidden = model.get_input_embeddings().weight.shape
    total = sum(_linear_bytes(path, m, quantized) for path, m in llm.decoder_linears(model).items())
    total += _norm_bytes(model) + lm_head_bytes(vocab, hidden, lm_head_bits, lm_head_group)
    if not llm.tied(model):
        total += vocab * hidden * FLOAT_BYTES
    return int(total)
