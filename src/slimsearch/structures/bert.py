"""Structured pruning of BERT-style encoders: attention heads, FFN neurons, whole layers.

The layout is Hugging Face's BERT family (BERT, RoBERTa, MiniLM, ...): a
``ModuleList`` of layers, each with ``attention.self.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense`` and ``output.dense``. Removing
a head drops its rows of Q, K and V and its columns of the attention output;
removing an FFN neuron drops a row of the intermediate dense and a column of the
output dense; a dropped layer is replaced by ``nn.Identity``. The hidden size is
never changed, so what comes out of the model keeps its shape.

Dropped layers become ``nn.Identity`` placeholders rather than leaving the list, so
that every later layer keeps its name: plans set bit-widths by layer name after
pruning, packed files are rebuilt against the teacher by name, and CNN blocks are
dropped the same way. The model's forward must skip them (``isinstance(layer,
nn.Identity)``), as the ``minilm`` task's encoder does; they hold no weights and
add nothing to the exported graph.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from slimsearch.structures._channel_graph import can_slice, slice_channels
from slimsearch.structures.channels import check_pruned
from slimsearch.exceptions import ConfigError

IMPORTANCE = ("l1", "l2")
HEADS = "attention"  # group suffix: the layer's attention heads
FFN = "ffn"  # group suffix: the layer's feed-forward neurons


class BertStructure:
    """:class:`~slimsearch.tasks.Structure` of a model whose ``layers`` is a list of BERT layers.

    Args:
        layers: dotted path of the layer ``ModuleList`` inside the model (for a bare
            ``BertModel`` or a wrapper holding its ``encoder``: ``"encoder.layer"``).

    Group names are ``<layers>.<i>.attention`` (heads) and ``<layers>.<i>.ffn``
    (FFN neurons); droppable blocks are ``<layers>.<i>``. A layer already dropped
    (an ``nn.Identity``) has neither.
    """

    def __init__(self, layers: str = "encoder.layer") -> None:
        self.layers = layers

    def groups(self, model: nn.Module, example_input: torch.Tensor | None = None) -> list[str]:
        """Names of the prunable groups, two per layer (heads, then FFN neurons).

        A group is left out when one of its Linear layers holds tensors pruning cannot
        slice (see :func:`~slimsearch.structures._channel_graph.can_slice`).
        """
        layer_list = self._layer_list(model)
        return [f"{block}.{kind}" for block in self.droppable(model) for kind in (HEADS, FFN)
                if _sliceable(layer_list[int(block.rsplit(".", 1)[1])], kind)]

    def droppable(self, model: nn.Module) -> list[str]:
        """Names of the layers that can be removed whole."""
        return [f"{self.layers}.{i}" for i, layer in enumerate(self._layer_list(model))
                if not isinstance(layer, nn.Identity)]

    def prune(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        ratios: Mapping[str, float],
        *,
        drop: Sequence[str] = (),
        importance: str = "l1",
        batch=None,
    ) -> nn.Module:
        """A smaller copy of ``model``; ``model`` is not changed.

        Args:
            model: the encoder to prune.
            example_input: an input ``model`` accepts: the pruned model is run on it once
                and refused if it fails or its output shape changed.
            ratios: group name (see :meth:`groups`) -> share of its heads or neurons to
                remove, in [0, 1); at least one head and one neuron always stay.
            drop: layer names (see :meth:`droppable`) to remove whole; all of them may
                go (what is left pools the token embeddings).
            importance: ``"l1"`` or ``"l2"`` norm of the weights that go with each
                head (Q, K, V rows and output columns) or neuron (its row and column).
            batch: unused: ``"taylor"`` importance is not supported here.

        Returns:
            The same kind of module with smaller Linear layers (same classes, so a
            quantized layer stays quantized) and dropped layers replaced by ``nn.Identity``.
            Ratios of groups inside dropped layers are ignored.

        Raises:
            ConfigError: an unknown group or layer, a ratio outside [0, 1), an
                importance other than ``"l1"``/``"l2"``.
            SlimSearchError: the pruned model fails on ``example_input`` or its output
                shape differs from ``model``'s (see :func:`~slimsearch.structures.channels.check_pruned`).
        """
        if importance not in IMPORTANCE:
            raise ConfigError(
                f"importance {importance!r} is not supported for transformer pruning "
                f"(it ranks heads and neurons by weight norm); allowed: {list(IMPORTANCE)}"
            )
        groups = self.groups(model)
        unknown = sorted(set(ratios) - set(groups))
        if unknown:
            raise ConfigError(f"cannot prune group {unknown[0]!r}; prunable groups: {groups}")
        for name, r in ratios.items():
            if not 0.0 <= float(r) < 1.0:
                raise ConfigError(f"prune ratio of group {name!r} must be in [0, 1), got {r}")
        blocks = self.droppable(model)
        unknown = sorted(set(drop) - set(blocks))
        if unknown:
            raise ConfigError(f"cannot drop {unknown[0]!r}; droppable layers: {blocks}")

        pruned = copy.deepcopy(model)
        layer_list = self._layer_list(pruned)
        with torch.no_grad():
            for block in blocks:
                i = int(block.rsplit(".", 1)[1])
                if block in drop:
                    layer_list[i] = nn.Identity()
                    continue
                _prune_heads(layer_list[i], float(ratios.get(f"{block}.{HEADS}", 0.0)), importance, block)
                _prune_ffn(layer_list[i], float(ratios.get(f"{block}.{FFN}", 0.0)), importance, block)
        check_pruned(model, pruned, example_input, channel_dims=(1, -1))  # heads, hidden units
        return pruned

    def _layer_list(self, model: nn.Module) -> nn.ModuleList:
        try:
            layers = model.get_submodule(self.layers)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"model has no layer list {self.layers!r} (an nn.ModuleList of BERT layers)")
        return layers


def _keep(n: int, ratio: float) -> int:
    return max(1, int(round(n * (1.0 - ratio))))


def _norm(parts: Sequence[torch.Tensor], importance: str) -> torch.Tensor:
    """Per-unit norm of weights given as [units, ...] tensors, one per layer involved."""
    if importance == "l1":
        return sum(p.abs().flatten(1).sum(1) for p in parts)
    return sum(p.pow(2).flatten(1).sum(1) for p in parts).sqrt()


def _linear(layer: nn.Module, path: str, block: str) -> nn.Linear:
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"{block} is not a BERT-style layer: it has no Linear {path!r}")
    return module


def _sliceable(layer: nn.Module, kind: str) -> bool:
    """Whether the Linear layers of group ``kind`` can lose heads or neurons.

    True where they are missing, so that pruning says the layer is not BERT-style.
    """
    paths = ((("attention.self.query", "attention.self.key", "attention.self.value"), "attention.output.dense")
             if kind == HEADS else (("intermediate.dense",), "output.dense"))
    rows, columns = paths
    try:
        return (all(can_slice(layer.get_submodule(p), rows=True, columns=False) for p in rows)
                and can_slice(layer.get_submodule(columns), rows=False, columns=True))
    except AttributeError:
        return True


def _prune_heads(layer: nn.Module, ratio: float, importance: str, block: str) -> None:
    attn = layer.attention.self if hasattr(layer, "attention") else None
    if attn is None or not hasattr(attn, "num_attention_heads"):
        raise ConfigError(f"{block} is not a BERT-style layer: it has no attention.self with num_attention_heads")
    qkv = [_linear(layer, f"attention.self.{name}", block) for name in ("query", "key", "value")]
    out = _linear(layer, "attention.output.dense", block)
    heads, size = int(attn.num_attention_heads), int(attn.attention_head_size)
    keep_n = _keep(heads, ratio)
    if ratio <= 0.0 or keep_n == heads:
        return
    per_head = [lin.weight.reshape(heads, size, -1) for lin in qkv]
    per_head.append(out.weight.reshape(out.out_features, heads, size).transpose(0, 1))
    kept = torch.sort(torch.topk(_norm(per_head, importance), keep_n).indices).values
    idx = (kept[:, None] * size + torch.arange(size, device=kept.device)).flatten()
    for lin in qkv:
        _keep_rows(lin, idx)
    _keep_columns(out, idx)
    attn.num_attention_heads = keep_n
    attn.all_head_size = keep_n * size


def _prune_ffn(layer: nn.Module, ratio: float, importance: str, block: str) -> None:
    up = _linear(layer, "intermediate.dense", block)
    down = _linear(layer, "output.dense", block)
    n = up.out_features
    keep_n = _keep(n, ratio)
    if ratio <= 0.0 or keep_n == n:
        return
    scores = _norm([up.weight, down.weight.t()], importance)
    idx = torch.sort(torch.topk(scores, keep_n).indices).values
    _keep_rows(up, idx)
    _keep_columns(down, idx)


def _keep_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    """Keep output rows ``idx`` of ``lin`` in place (the module object and its class stay)."""
    slice_channels(lin, rows=idx)


def _keep_columns(lin: nn.Linear, idx: torch.Tensor) -> None:
    """Keep input columns ``idx`` of ``lin`` in place."""
    slice_channels(lin, columns=idx)


@contextlib.contextmanager
def capture_hidden(model: nn.Module, layers: str = "encoder.layer") -> Iterator[dict[int, torch.Tensor]]:
    """Record each layer's output hidden states during the forward passes run inside.

    Yields a dict filled as the model runs: layer index -> its output ``[N, L, hidden]``
    (of the last call). Dropped layers (``nn.Identity``) are left out; the others keep
    their index through pruning, so student and teacher states of the same key belong
    together.
    """
    layer_list = BertStructure(layers)._layer_list(model)
    hidden: dict[int, torch.Tensor] = {}

    def hook(key: int):
        def record(module, inputs, output) -> None:
            hidden[key] = output[0] if isinstance(output, tuple) else output
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layer_list)
               if not isinstance(layer, nn.Identity)]
    try:
        yield hidden
    finally:
        for handle in handles:
            handle.remove()


def hidden_state_loss(student: Mapping[int, torch.Tensor], teacher: Mapping[int, torch.Tensor],
                      mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the hidden states of the layers both models have, over real tokens.

    ``student`` and ``teacher`` come from :func:`capture_hidden`; ``mask`` is ``[N, L]``,
    true for tokens that are not padding. The hidden sizes agree because pruning
    never changes them. Sequences may differ in length (the student may run on a
    batch trimmed of padding columns): both are cut to the shorter.
    """
    keys = sorted(set(student) & set(teacher))
    if not keys:
        raise ConfigError("hidden-state matching: student and teacher share no layer")
    total = torch.zeros((), device=mask.device)
    for key in keys:
        s, t = student[key], teacher[key]
        width = min(s.shape[1], t.shape[1], mask.shape[1])
        m = mask[:, :width].unsqueeze(-1).to(s.dtype)
        diff = (s[:, :width] - t[:, :width].detach()).pow(2) * m
        total = total + diff.sum() / (m.sum() * s.shape[-1]).clamp_min(1.0)
    return total / len(keys)
