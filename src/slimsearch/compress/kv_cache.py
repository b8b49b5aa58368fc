"""KV-cache precision of decoder LLMs: keys and values rounded as a cache would store them.

At 8 or 4 bits each token's key (and value) vector of each key/value head is stored as
unsigned codes along ``head_dim`` with a float16 scale and minimum (asymmetric, per
token and head, as KIVI's and onnxruntime-genai's per-token modes do); at 16 bits it is
stored as float16. Simulated by forward hooks on ``k_proj``/``v_proj`` outputs (the key
and value parts of a fused ``qkv_proj`` or GPT-2's ``c_attn``), which see each new
token once, as a cache does.

Keys are rounded *before* the rotary embedding, the hook point; a real cache holds them
after it. Acceptable: the rotary embedding rotates pairs of coordinates, an orthogonal
map, so the rounding error of a key keeps its size (the attention score error
``q . R e`` has the same distribution as ``q . e``), and the per-token range it is
fitted on changes only by that rotation; GPT-2 has no rotary embedding at all. Doing
it after would mean replacing the attention function of every family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimsearch.compress._calibration import Hooks
from slimsearch.exceptions import ConfigError
from slimsearch.structures import llm

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["KVCacheConfig", "KV_BITS", "fake_quant_kv", "kv_cache_bytes", "quantize_kv_cache"]

KV_BITS = (16, 8, 4)
META_BYTES = 4  # float16 scale + float16 minimum per token, head and tensor, below 16 bits


def _check_bits(bits, where: str = "KVCacheConfig.bits") -> int:
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise ConfigError(f"{where} must be one of {list(KV_BITS)}, got {bits!r}")
    return int(bits)


@dataclass(frozen=True)
class KVCacheConfig:
    """Bits a KV-cache entry is stored in: 16 (float16), 8 or 4 (codes + float16 scale and minimum)."""

    bits: int = 16

    def __post_init__(self) -> None:
        _check_bits(self.bits)


def fake_quant_kv(x: "torch.Tensor", head_dim: int, bits: int) -> "torch.Tensor":
    """``x`` (``(..., heads * head_dim)``) rounded as a ``bits``-bit cache stores it."""
    import torch

    if bits == 16:
        return x.to(torch.float16).to(x.dtype)
    shape = x.shape
    heads = x.reshape(*shape[:-1], shape[-1] // head_dim, head_dim).to(torch.float32)
    lo = heads.amin(-1, keepdim=True).to(torch.float16).to(torch.float32)
    hi = heads.amax(-1, keepdim=True)
    top = 2**bits - 1
    scale = ((hi - lo) / top).clamp_min(1e-8).to(torch.float16).to(torch.float32).clamp_min(1e-8)
    codes = torch.clamp(torch.round((heads - lo) / scale), 0, top)
    return (codes * scale + lo).reshape(shape).to(x.dtype)


def quantize_kv_cache(model: "nn.Module", config: KVCacheConfig) -> Hooks:
    """Round every block's keys and values to the cache precision; ``.remove()`` undoes it."""
    import torch

    bits = _check_bits(config.bits)
    family = llm.family_of(model)
    n_heads, n_kv, head_dim = llm.heads(model)
    qkv = next(g for g in family.groups if g.name == "qkv")
    handles = []
    for block in llm.blocks(model):
        if len(qkv.members) == 1:  # fused: [q | k | v] along the output features
            q_size, kv_size = n_heads * head_dim, n_kv * head_dim

            def fused(_module, _args, output, q_size=q_size, kv_size=kv_size):
                q, kv = output[..., :q_size], output[..., q_size:q_size + 2 * kv_size]
                k, v = kv[..., :kv_size], kv[..., kv_size:]
                rest = output[..., q_size + 2 * kv_size:]
                return torch.cat([q, fake_quant_kv(k, head_dim, bits), fake_quant_kv(v, head_dim, bits), rest], -1)

            handles.append(llm.get(block, qkv.members[0]).register_forward_hook(fused))
            continue
        for member in qkv.members:
            if member.endswith(("k_proj", "v_proj")):
                handles.append(llm.get(block, member).register_forward_hook(
                    lambda _m, _a, output: fake_quant_kv(output, head_dim, bits)))
    return Hooks(handles)


def kv_cache_bytes(model: "nn.Module", tokens: int, bits: int, batch: int = 1) -> int:
    """Bytes of the KV cache holding ``tokens`` tokens of ``batch`` sequences at ``bits``.

    ``2 (K and V) x layers x kv_heads x tokens x batch x (head_dim x bits / 8``, plus a
    float16 scale and minimum per token and head below 16 bits).
    """
    bits = _check_bits(bits, "kv_cache_bytes bits")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ConfigError(f"kv_cache_bytes tokens must be an integer >= 0, got {tokens!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"kv_cache_bytes batch must be an integer >= 1, got {batch!r}")
    _, n_kv, head_dim = llm.heads(model)
    per_head = math.ceil(head_dim * bits / 8) + (META_BYTES if bits < 16 else 0)
    return 2 * len(llm.blocks(model)) * n_kv * per_head * tokens * batch
