"""Structured channel pruning that physically removes channels and neurons.

Which channels are tied together (through residual additions, concatenations,
norms and depthwise convs) comes from :mod:`._channel_graph`. Removing a channel
shrinks every producer's weight rows, the norms and depthwise convs on the way and
every consumer's input columns, in place (each layer keeps its class, forward and
children), so the result is the same kind of model with fewer parameters and the
same inputs and outputs. Every pruned model is run once on the example input
before it is handed back (:func:`check_pruned`): one that fails, or whose output
shape changed, is refused with an error naming the layer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Union

from slimsearch._device import device_of
from slimsearch.exceptions import ConfigError, SlimSearchError

if TYPE_CHECKING:
    import torch
    from torch import nn

from slimsearch.spaces.plan import IMPORTANCES as IMPORTANCE


def _trace(model: "nn.Module", example_input: "torch.Tensor"):
    from slimsearch.structures._channel_graph import trace

    return trace(model, example_input)


def prunable_layers(model: "nn.Module", example_input: "torch.Tensor") -> list[str]:
    """Names of the prunable channel groups, each named by its first Conv2d/Linear.

    Layers whose outputs are added together (a residual connection) form one group.
    """
    from slimsearch.structures._channel_graph import analyse

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
        A module of the same kind (each layer keeps its class and forward) with
        fewer parameters and the same output shape.

    Raises:
        SlimSearchError: the pruned model fails on ``example_input`` or its output
            shape differs from ``model``'s (see :func:`check_pruned`).
    """
    pruned = _prune_channels(model, example_input, ratio, importance=importance, batch=batch)
    check_pruned(model, pruned, example_input)
    return pruned


def _prune_channels(model, example_input, ratio, *, importance, batch):
    """:func:`prune_channels` without the final check."""
    import torch

    from slimsearch.structures._channel_graph import analyse, slice_channels

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
    at = device_of(model)  # scores and kept indices live beside the weights
    keep: dict[int, torch.Tensor] = {}  # root space -> kept channel indices
    for name, producers in groups.items():
        r = ratios.get(name, 0.0)
        space = graph.find(graph.producers[name])
        n = graph.sizes[graph.producers[name]]
        keep_n = max(1, int(round(n * (1.0 - r))))
        if r <= 0.0 or keep_n == n:
            continue
        scores = torch.zeros(n, device=at)
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
            idx = keep.get(graph.find(seg.space), torch.arange(seg.size, device=at))
            parts.append(seg.offset + (idx[:, None] * seg.per + torch.arange(seg.per, device=at)).flatten())
        return torch.cat(parts)

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name in dict.fromkeys([*graph.producers, *graph.consumers]):
            space = graph.producers.get(name)
            out_idx = keep.get(graph.find(space)) if space is not None else None
            in_idx = columns(graph.consumers.get(name, []))
            if out_idx is not None or in_idx is not None:
                slice_channels(pruned.get_submodule(name), rows=out_idx, columns=in_idx)
        for name, segments in graph.members.items():
            idx = columns(segments)
            if idx is not None:
                slice_channels(pruned.get_submodule(name), rows=idx)
    return pruned


def check_pruned(model: "nn.Module", pruned: "nn.Module", example_input: Any, *,
                 channel_dims: tuple[int, ...] = (1,)) -> None:
    """Run ``model`` and ``pruned`` once on ``example_input``; refuse a pruned model that is broken.

    Both run without gradients in eval mode, their modules' training flags restored
    afterwards. Pruning may change the channel dims of what layers give, nothing
    else: a layer whose forward pruning does not preserve (a spatial size that
    changed, a hard-coded width) is caught here, even where a global pooling would
    hide it from the model's output.

    Args:
        model: the model before pruning.
        pruned: the model pruning made of it.
        example_input: an input ``model`` accepts.
        channel_dims: the dims of layer outputs that pruning may shrink (``(1,)`` for
            NCHW and [N, C]; a transformer's hidden and head dims).

    Raises:
        SlimSearchError: one line naming the layer, if ``pruned`` fails, a layer's
            output changed in another dim, or the model's output shape changed.
    """
    expected, reference, failure = _run_recording(model, example_input)
    if failure is not None:
        where, exc = failure
        raise SlimSearchError(
            f"cannot check the pruned model: {_describe(model, where)} fails on the example input before "
            f"pruning ({type(exc).__name__}: {_first_line(exc)})") from exc
    got, layers, failure = _run_recording(pruned, example_input)
    changed = _first_changed_layer(reference, layers, channel_dims)
    change = ""
    if changed is not None:
        name, before, after = changed
        change = (f"{_describe(pruned, name)} gives {_shape_text(after)} where it gave {_shape_text(before)} "
                  "before pruning")
    if failure is not None:
        where, exc = failure
        raise SlimSearchError(
            f"pruning {type(model).__name__} broke it: {_describe(pruned, where)} fails on the example input "
            f"({type(exc).__name__}: {_first_line(exc)})" + (f"; first change: {change}" if change else "")
        ) from exc
    if change:
        raise SlimSearchError(f"pruning {type(model).__name__} changed more than channel counts: {change}")
    if got != expected:
        raise SlimSearchError(f"pruning {type(model).__name__} changed its output shape from "
                              f"{_shape_text(expected)} to {_shape_text(got)}")


def _run_recording(model: "nn.Module", example_input: Any):
    """``(output shapes, [(layer, output shapes)] in call order, (innermost layer, error) or None)``."""
    import torch

    stack: list[str] = []
    layers: list[tuple[str, list]] = []

    def enter(name: str):
        return lambda module, args: stack.append(name)

    def leave(name: str):
        def hook(module, args, output) -> None:
            stack.pop()
            layers.append((name, _shapes(output)))
        return hook

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave(name)))
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return _shapes(model(example_input)), layers, None
    except Exception as exc:  # noqa: BLE001 - any failure of the forward is reported with its layer
        return None, layers, (stack[-1] if stack else "", exc)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag


def _shapes(value) -> list[tuple[int, ...]]:
    """Shapes of the tensors in ``value`` (a tensor, or tuples, lists and dicts of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [tuple(value.shape)]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [shape for item in value for shape in _shapes(item)]
    return []


def _first_changed_layer(reference, layers, channel_dims: tuple[int, ...]):
    """The first call of a layer whose outputs differ from that call's before pruning outside ``channel_dims``.

    Layers that ran only before pruning (inside a dropped block) or only after are skipped.
    """
    before: dict[str, list] = {}
    for name, shapes in reference:
        before.setdefault(name, []).append(shapes)
    calls: dict[str, int] = {}
    for name, shapes in layers:
        i = calls[name] = calls.get(name, -1) + 1
        if i < len(before.get(name, [])) and not _same_but_channels(before[name][i], shapes, channel_dims):
            return name, before[name][i], shapes
    return None


def _same_but_channels(a: list, b: list, channel_dims: tuple[int, ...]) -> bool:
    def others(shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) < 2:
            return shape
        free = {d % len(shape) for d in channel_dims}
        return tuple(size for d, size in enumerate(shape) if d not in free)

    return len(a) == len(b) and all(len(x) == len(y) and others(x) == others(y) for x, y in zip(a, b))


def _describe(model: "nn.Module", name: str) -> str:
    if not name:
        return f"the forward of {type(model).__name__} itself"
    return f"layer {name!r} ({type(model.get_submodule(name)).__name__})"


def _shape_text(shapes: list) -> str:
    return ", ".join(str(list(shape)) for shape in shapes) if shapes else "no tensor"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else "no message"


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

    from slimsearch.structures._channel_graph import PASSTHROUGH_MODULES

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
        """A smaller copy of ``model``, checked to run on ``example_input`` (see :func:`check_pruned`)."""
        pruned = model
        if drop:
            pruned = drop_blocks(model, drop)
            alive = set(prunable_layers(pruned, example_input))
            ratios = {k: v for k, v in ratios.items() if k in alive}
        if any(r > 0 for r in ratios.values()):
            pruned = _prune_channels(pruned, example_input, ratios, importance=importance, batch=batch)
        elif not drop:
            return copy.deepcopy(model)
        check_pruned(model, pruned, example_input)
        return pruned


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
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + beta)
            _replace(folded, node.target, nn.Identity())
    return folded
