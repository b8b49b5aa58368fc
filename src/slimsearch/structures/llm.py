"""Decoder-only language models: where their linear layers, norms and blocks are.

One :class:`DecoderFamily` per Hugging Face architecture says, relative to each decoder
block, which linear layers read the same input (a :class:`LinearGroup`: q/k/v after the
attention norm, gate/up after the MLP norm, ...) and what precedes them. Quantization
(per-input-channel scales of AWQ and SmoothQuant fold into that predecessor), structured
cuts and the ONNX export all read the model through these few functions, so a new family
is one entry in :data:`FAMILIES`.

GPT-2 stores its linears as ``transformers.pytorch_utils.Conv1D``, whose weight is
``(in, out)``; :func:`weight_of` and :func:`set_weight` always speak ``(out, in)``, as
``nn.Linear`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers of one block that read the same input.

    Attributes:
        name: ``qkv``, ``o``, ``gate_up`` or ``down``: precision is chosen per group.
        members: module paths inside the block.
        norm: path of the norm whose output they read (its scale can absorb a
            per-input-channel factor), or ``None``.
        prev: path of the linear whose output rows they read directly (``v_proj`` for
            ``o_proj`` when no key/value head is shared, ``up_proj`` for ``down_proj``),
            or ``None`` when nothing linear precedes them.
    """

    name: str
    members: tuple[str, ...]
    norm: Optional[str] = None
    prev: Optional[str] = None


@dataclass(frozen=True)
class DecoderFamily:
    """Where a decoder family keeps its parts (paths from the ``*ForCausalLM`` model)."""

    model_types: tuple[str, ...]
    layers: str  # the ModuleList of decoder blocks
    embed: str
    final_norm: str
    groups: tuple[LinearGroup, ...]
    attention: str  # the attention module inside a block
    mlp: str


_LLAMA_GROUPS = (
    LinearGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), norm="input_layernorm"),
    LinearGroup("o", ("self_attn.o_proj",), prev="self_attn.v_proj"),
    LinearGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), norm="post_attention_layernorm"),
    LinearGroup("down", ("mlp.down_proj",), prev="mlp.up_proj"),
)

FAMILIES = (
    DecoderFamily(("llama", "mistral", "qwen2", "qwen3"), "model.layers", "model.embed_tokens", "model.norm",
                  _LLAMA_GROUPS, "self_attn", "mlp"),
    DecoderFamily(("phi3",), "model.layers", "model.embed_tokens", "model.norm", (
        LinearGroup("qkv", ("self_attn.qkv_proj",), norm="input_layernorm"),
        LinearGroup("o", ("self_attn.o_proj",)),
        LinearGroup("gate_up", ("mlp.gate_up_proj",), norm="post_attention_layernorm"),
        LinearGroup("down", ("mlp.down_proj",)),
    ), "self_attn", "mlp"),
    DecoderFamily(("gpt2",), "transformer.h", "transformer.wte", "transformer.ln_f", (
        LinearGroup("qkv", ("attn.c_attn",), norm="ln_1"),
        LinearGroup("o", ("attn.c_proj",)),
        LinearGroup("gate_up", ("mlp.c_fc",), norm="ln_2"),
        LinearGroup("down", ("mlp.c_proj",)),
    ), "attn", "mlp"),
)
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(model: "nn.Module") -> DecoderFamily:
    """The family of a Hugging Face causal LM, from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ConfigError(f"model_type {model_type!r} is not a supported decoder family; "
                      f"allowed: {list(SUPPORTED_MODEL_TYPES)}")


def get(root: "nn.Module", path: str) -> "nn.Module":
    """The submodule at dotted ``path`` (list indices included)."""
    return root.get_submodule(path)


def blocks(model: "nn.Module") -> "nn.ModuleList":
    """The model's decoder blocks, in order."""
    return get(model, family_of(model).layers)


def group_linears(model: "nn.Module") -> Iterator[tuple[int, LinearGroup, list[str]]]:
    """``(block index, group, full paths of its members)`` for every linear group of every block."""
    family = family_of(model)
    for i in range(len(blocks(model))):
        prefix = f"{family.layers}.{i}."
        for group in family.groups:
            yield i, group, [prefix + m for m in group.members]


def block_group_names(model: "nn.Module") -> tuple[str, ...]:
    """Every block's linear groups by name, ``"<block>.<group>"`` (``"3.down"``), in block order: the
    keys of per-block choices."""
    return tuple(f"{i}.{g.name}" for i, g, _ in group_linears(model))


def decoder_linears(model: "nn.Module") -> dict[str, "nn.Module"]:
    """Full path -> module of every linear layer inside the decoder blocks (not the embedding
    or output projection), in block order."""
    return {path: get(model, path) for _, _, paths in group_linears(model) for path in paths}


def is_conv1d(module: "nn.Module") -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): a linear layer stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_of(module: "nn.Module") -> "torch.Tensor":
    """The layer's weight as ``(out, in)`` (a view of the parameter for ``nn.Linear``)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight(module: "nn.Module", weight: "torch.Tensor") -> None:
    """Write an ``(out, in)`` weight of the layer's current shape into it, in place."""
    import torch

    with torch.no_grad():
        target = module.weight
        value = weight.t() if is_conv1d(module) else weight
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"weight of shape {tuple(weight.shape)} (out, in) does not fit a layer of "
                             f"shape {tuple(weight_of(module).shape)}")
        target.copy_(value.to(target.dtype))


def in_out(module: "nn.Module") -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D."""
    out_features, in_features = weight_of(module).shape
    return int(in_features), int(out_features)


def heads(model: "nn.Module") -> tuple[int, int, int]:
    """``(attention heads, key/value heads, head size)`` from the model's config."""
    config = model.config
    n_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_heads)
    return n_heads, n_kv, head_dim


def tied(model: "nn.Module") -> bool:
    """Whether the output projection shares its weight with the input embedding."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def ffn_width(model: "nn.Module") -> int:
    """The FFN's inner width from the model's config (GPT-2's ``n_inner``, ``4 * n_embd`` when unset)."""
    config = model.config
    width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return int(width or 4 * config.n_embd)


def final_hidden(model: "nn.Module", input_ids: "torch.Tensor") -> "torch.Tensor":
    """The decoder's last hidden states ``(batch, seq, hidden)``, after the final norm: what the
    output projection (:meth:`get_output_embeddings`) turns into logits. No key/value cache."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
