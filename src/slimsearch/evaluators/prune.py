"""Structured channel pruning that physically removes channels and neurons.

Which channels are tied together (through residual additions, concatenations,
norms and depthwise convs) comes from :mod:`._channel_graph`. Removing a channel
shrinks every producer's weight rows, the norms and depthwise convs on the way and
every consumer's input columns, so the result is a smaller plain dense
``nn.Module`` with the same inputs and outputs.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Mapping, Union

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

from slimsearch.spaces.plan import IMPORTANCES as IMPORTANCE


def _trace(model: "nn.Module", example_input: "torch.Tensor"):
    from slimsearch.evaluators._channel_graph import trace

    return trace(model, example_input)


def prunable_layers(model: "nn.Module", example_input: "torch.Tensor") -> list[str]:
    """Names of the prunable channel groups, each named by its first Conv2d/Linear.

    Layers whose outputs are added together (a residual connection) form one group.
    """
    from slimsearch.evaluators._channel_graph import analyse

    return list(analyse(model, example_input).groups())


def prune_channels(
    model: "nn.Module",
    example_input: "torch.Tensor",
    ratio: Union[float, Mapping[str, float]],
    *,
    importance: str = "l1",
    batch: "tuple[torch.Tensor, torch.Tensor] | None" = None,
) -> "nn.Module":
    """Return a copy of ``model`` with the least important channels of each group removed.

    Args:
        model: the model to prune; it is not changed.
        example_input: an input the model accepts, used to trace shapes.
        ratio: share of channels to remove, in [0, 1): one float for every prunable
            group, or a mapping from group name (see :func:`prunable_layers`) to ratio;
            groups not named are kept whole.
        importance: ``"l1"`` or ``"l2"`` norm of each channel's weights, or ``"taylor"``
            (first-order Taylor, ``|weight x gradient|`` of the loss on ``batch``),
            summed over the layers of the group.
        batch: ``(inputs, targets)`` for ``"taylor"``: class labels (cross-entropy) or
            target outputs (mean squared error).

    Returns:
        A plain dense module with fewer parameters and the same output shape.
    """
    import torch

    from slimsearch.evaluators._channel_graph import analyse

    if importance not in IMPORTANCE:
        raise ConfigError(f"importance must be one of {list(IMPORTANCE)}, got {importance!r}")
    graph = analyse(model, example_input)
    groups = graph.groups()
    ratios = {name: float(ratio) for name in groups} if isinstance(ratio, (int, float)) else dict(ratio)
    unknown = sorted(set(ratios) - set(groups))
    if unknown:
        raise ConfigError(f"cannot prune layer {unknown[0]!r}; prunable layers: {list(groups)}")
    for name, r in ratios.items():
        if not 0.0 <= r < 1.0:
            raise ConfigError(f"prune ratio of layer {name!r} must be in [0, 1), got {r}")

    grads = _taylor_grads(model, batch) if importance == "taylor" else {}
    keep: dict[int, torch.Tensor] = {}  # root space -> kept channel indices
    for name, producers in groups.items():
        r = ratios.get(name, 0.0)
        space = graph.find(graph.producers[name])
        n = graph.sizes[graph.producers[name]]
        keep_n = max(1, int(round(n * (1.0 - r))))
        if r <= 0.0 or keep_n == n:
            continue
        scores = torch.zeros(n)
        for producer in producers:
            rows = model.get_submodule(producer).weight.detach().flatten(1)
            if importance == "taylor":
                scores += (rows * grads[producer].flatten(1)).abs().sum(1)
            else:
                scores += rows.abs().sum(1) if importance == "l1" else rows.pow(2).sum(1).sqrt()
        keep[space] = torch.sort(torch.topk(scores, keep_n).indices).values
    if not keep:
        return copy.deepcopy(model)

    def columns(segments) -> "torch.Tensor | None":
        """Kept indices of a dim made of ``segments``; None when nothing in it is pruned."""
        if not any(graph.find(seg.space) in keep for seg in segments):
            return None
        parts = []
        for seg in segments:
            idx = keep.get(graph.find(seg.space), torch.arange(seg.size))
            parts.append(seg.offset + (idx[:, None] * seg.per + torch.arange(seg.per)).flatten())
        return torch.cat(parts)

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name in dict.fromkeys([*graph.producers, *graph.consumers]):
            space = graph.producers.get(name)
            out_idx = keep.get(graph.find(space)) if space is not None else None
            in_idx = columns(graph.consumers.get(name, []))
            if out_idx is not None or in_idx is not None:
                old = pruned.get_submodule(name)
                _replace(pruned, name, _shrink(old, out_idx=out_idx, in_idx=in_idx).train(old.training))
        for name, segments in graph.members.items():
            idx = columns(segments)
            if idx is not None:
                old = pruned.get_submodule(name)
                _replace(pruned, name, _shrink_member(old, idx).train(old.training))
    return pruned


def _taylor_grads(model: "nn.Module", batch) -> dict[str, "torch.Tensor"]:
    """Weight gradients of the loss on ``batch``, computed on a copy (the model is untouched)."""
    import torch
    import torch.nn.functional as F

    if batch is None:
        raise ConfigError("importance 'taylor' needs a batch of (inputs, targets) to take gradients on")
    inputs, targets = batch
    probe = copy.deepcopy(model).eval()
    out = probe(inputs)
    loss = F.cross_entropy(out, targets) if targets.dtype == torch.long else F.mse_loss(out, targets)
    loss.backward()
    return {name: m.weight.grad.detach() for name, m in probe.named_modules()
            if getattr(m, "weight", None) is not None and m.weight.grad is not None}


def droppable_blocks(model: "nn.Module") -> list[str]:
    """Residual blocks that can be removed whole: ``f(x) = x + g(x)`` (optionally then an activation).

    Removing one leaves ``x`` (or the activation of ``x``): the depth choice of CNNs.
    """
    return list(_residual_blocks(model))


def _residual_blocks(model: "nn.Module") -> dict[str, "nn.Module"]:
    """Block name -> what replaces it when dropped (Identity, or the activation after the add)."""
    import operator

    import torch
    import torch.fx
    from torch import nn

    from slimsearch.evaluators._channel_graph import PASSTHROUGH_MODULES

    found: dict[str, nn.Module] = {}
    for name, block in model.named_modules():
        if not name or not any(True for _ in block.children()):
            continue
        if any(name.startswith(f"{other}.") for other in found):
            continue
        try:
            graph = torch.fx.symbolic_trace(block).graph
        except Exception:  # noqa: BLE001 - a block fx cannot trace is simply not droppable
            continue
        nodes = list(graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        output = nodes[-1]
        if len(placeholders) != 1 or output.op != "output":
            continue
        result = output.args[0]
        after = nn.Identity()
        if result.op == "call_module" and isinstance(block.get_submodule(result.target), PASSTHROUGH_MODULES):
            after = copy.deepcopy(block.get_submodule(result.target))
            result = result.args[0]
        elif result.op == "call_function" and result.target in (torch.relu, torch.nn.functional.relu):
            after = nn.ReLU()
            result = result.args[0]
        def is_input(node) -> bool:  # the block's input, possibly through an Identity shortcut
            while node.op == "call_module" and isinstance(block.get_submodule(node.target), nn.Identity):
                node = node.args[0]
            return node is placeholders[0]

        if (getattr(result, "op", None) == "call_function" and result.target in (operator.add, torch.add)
                and any(isinstance(a, torch.fx.Node) and is_input(a) for a in result.args)):
            found[name] = after
    return found


def drop_blocks(model: "nn.Module", names) -> "nn.Module":
    """A copy of ``model`` without the residual blocks ``names`` (see :func:`droppable_blocks`)."""
    blocks = _residual_blocks(model)
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise ConfigError(f"cannot drop {unknown[0]!r}; droppable blocks: {list(blocks)}")
    dropped = copy.deepcopy(model)
    for name in names:
        _replace(dropped, name, blocks[name])
    return dropped


class ChannelStructure:
    """The default :class:`~slimsearch.tasks.Structure`: channel groups and residual blocks."""

    def groups(self, model: "nn.Module", example_input: "torch.Tensor") -> list[str]:
        return prunable_layers(model, example_input)

    def droppable(self, model: "nn.Module") -> list[str]:
        return droppable_blocks(model)

    def prune(self, model, example_input, ratios, *, drop=(), importance="l1", batch=None):
        if drop:
            model = drop_blocks(model, drop)
            alive = set(prunable_layers(model, example_input))
            ratios = {k: v for k, v in ratios.items() if k in alive}
        if not any(r > 0 for r in ratios.values()):
            return copy.deepcopy(model) if not drop else model
        return prune_channels(model, example_input, ratios, importance=importance, batch=batch)


def _shrink_member(module, idx):
    """A norm or depthwise conv keeping channels ``idx``."""
    from torch import nn

    if isinstance(module, nn.Conv2d):  # depthwise: one filter per channel
        new = nn.Conv2d(len(idx), len(idx), module.kernel_size, stride=module.stride, padding=module.padding,
                        dilation=module.dilation, groups=len(idx), bias=module.bias is not None,
                        padding_mode=module.padding_mode)
        new.weight.data.copy_(module.weight.data[idx])
        if module.bias is not None:
            new.bias.data.copy_(module.bias.data[idx])
        return new
    new = type(module)(len(idx), eps=module.eps, momentum=module.momentum, affine=module.affine,
                       track_running_stats=module.track_running_stats)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        src = getattr(module, attr)
        if src is not None:
            getattr(new, attr).data.copy_(src.data[idx])
    if module.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(module.num_batches_tracked)
    return new


def _shrink(layer, *, out_idx=None, in_idx=None):
    """A copy of a Conv2d/Linear keeping the given output rows and/or input columns."""
    from torch import nn

    weight = layer.weight.data
    if out_idx is not None:
        weight = weight[out_idx]
    if in_idx is not None:
        weight = weight[:, in_idx]
    bias = layer.bias.data if layer.bias is not None else None
    if bias is not None and out_idx is not None:
        bias = bias[out_idx]
    if isinstance(layer, nn.Conv2d):
        groups = layer.groups  # grouped convs are never pruned, only copied (index sets are None)
        new = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], layer.kernel_size, stride=layer.stride,
                        padding=layer.padding, dilation=layer.dilation, groups=groups, bias=bias is not None,
                        padding_mode=layer.padding_mode)
    else:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _replace(root: "nn.Module", name: str, new: "nn.Module") -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def fold_batchnorm(model: "nn.Module", example_input: "torch.Tensor") -> "nn.Module":
    """A copy of ``model`` with every BatchNorm that directly follows a Conv2d folded into that conv.

    Uses the norms' running statistics. The conv may be a quantized twin
    (:class:`~slimsearch.evaluators.quantize.QConv2d`) that is not frozen yet: its
    float weights are rescaled and its grid is fitted at freeze, so the weights that
    are frozen, measured and exported are the folded ones. Deployment runtimes fold
    these norms anyway.
    """
    import torch
    from torch import nn

    gm = _trace(model, example_input)
    modules = dict(gm.named_modules())
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
                continue
            (src,) = node.all_input_nodes
            if src.op != "call_module" or not isinstance(modules[src.target], nn.Conv2d) or len(src.users) != 1:
                continue
            conv, bn = folded.get_submodule(src.target), folded.get_submodule(node.target)
            if bn.running_var is None:
                continue  # no running statistics: nothing fixed to fold
            if getattr(conv, "frozen", False):
                raise ValueError(f"cannot fold {node.target!r} into {src.target!r}: its weights are frozen on "
                                 "their integer grid already; fold before freeze()")
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            scale = gamma / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + beta)
            _replace(folded, node.target, nn.Identity())
    return folded
