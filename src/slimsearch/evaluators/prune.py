"""Structured channel pruning that physically removes channels and neurons.

The model is traced with torch.fx to find, for every Conv2d/Linear, the path its
output channels take to the next Conv2d/Linear through channel-preserving layers
(BatchNorm, activations, pooling, dropout, flatten). Removing a channel shrinks the
producer's weight rows, the BatchNorm in between and the consumer's input columns,
so the result is a smaller plain dense ``nn.Module`` with the same inputs and
outputs. Coupled channels (residual additions, concatenations) are not pruned
here; such layers are reported as not prunable.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Union

from slimsearch.exceptions import ConfigError, SlimSearchError

if TYPE_CHECKING:
    import torch
    from torch import nn

IMPORTANCE = ("l1", "l2")


@dataclass(frozen=True)
class _Chain:
    producer: str
    norms: tuple[str, ...]
    consumer: str
    per_channel: int  # consumer input features per producer channel (H*W after a flatten)


def _trace(model: "nn.Module", example_input: "torch.Tensor"):
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise SlimSearchError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "structured pruning needs a traceable model"
        ) from exc
    ShapeProp(gm).propagate(example_input)
    return gm


def _chains(model: "nn.Module", example_input: "torch.Tensor") -> dict[str, _Chain]:
    import operator

    import torch
    import torch.nn.functional as F
    from torch import nn

    passthrough_modules = (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU,
        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity, nn.Flatten,
    )
    passthrough_functions = (F.relu, torch.relu, F.gelu, F.silu, torch.flatten, F.max_pool2d, F.avg_pool2d)
    gm = _trace(model, example_input)
    modules = dict(gm.named_modules())
    chains: dict[str, _Chain] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            continue
        producer = modules[node.target]
        if isinstance(producer, nn.Conv2d) and producer.groups != 1:
            continue
        norms: list[str] = []
        current, channels, per_channel = node, node.meta["tensor_meta"].shape[1], 1
        chain = None
        while len(current.users) == 1:
            (user,) = current.users
            if user.op == "call_module" and isinstance(modules[user.target], (nn.Conv2d, nn.Linear)):
                consumer = modules[user.target]
                fan_in = consumer.in_channels if isinstance(consumer, nn.Conv2d) else consumer.in_features
                if fan_in == channels * per_channel and getattr(consumer, "groups", 1) == 1:
                    chain = _Chain(node.target, tuple(norms), user.target, per_channel)
                break
            is_module = user.op == "call_module" and isinstance(modules[user.target], passthrough_modules)
            is_function = user.op == "call_function" and user.target in passthrough_functions
            if not (is_module or is_function) or user.target is operator.add:
                break
            if is_module and isinstance(modules[user.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
                norms.append(user.target)
            shape = user.meta["tensor_meta"].shape
            if len(shape) == 2 and per_channel == 1 and len(current.meta["tensor_meta"].shape) == 4:
                in_shape = current.meta["tensor_meta"].shape
                per_channel = int(in_shape[2] * in_shape[3])  # a flatten: each channel is H*W features
            current = user
        if chain is not None:
            chains[node.target] = chain
    return chains


def prunable_layers(model: "nn.Module", example_input: "torch.Tensor") -> list[str]:
    """Names of the Conv2d/Linear layers whose output channels can be removed."""
    return list(_chains(model, example_input))


def prune_channels(
    model: "nn.Module",
    example_input: "torch.Tensor",
    ratio: Union[float, Mapping[str, float]],
    *,
    importance: str = "l1",
) -> "nn.Module":
    """Return a copy of ``model`` with the least important output channels removed.

    Args:
        model: the model to prune; it is not changed.
        example_input: an input the model accepts, used to trace shapes.
        ratio: share of channels to remove, in [0, 1): one float for every prunable
            layer, or a mapping from layer name to ratio (others are kept whole).
        importance: ``"l1"`` or ``"l2"`` norm of each channel's weights.

    Returns:
        A plain dense module with fewer parameters and the same output shape.
    """
    import torch

    if importance not in IMPORTANCE:
        raise ConfigError(f"importance must be one of {list(IMPORTANCE)}, got {importance!r}")
    chains = _chains(model, example_input)
    ratios = {name: float(ratio) for name in chains} if isinstance(ratio, (int, float)) else dict(ratio)
    unknown = sorted(set(ratios) - set(chains))
    if unknown:
        raise ConfigError(f"cannot prune layer {unknown[0]!r}; prunable layers: {list(chains)}")
    for name, r in ratios.items():
        if not 0.0 <= r < 1.0:
            raise ConfigError(f"prune ratio of layer {name!r} must be in [0, 1), got {r}")
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, chain in chains.items():
            r = ratios.get(name, 0.0)
            if r > 0.0:
                _prune_chain(pruned, chain, r, importance)
    return pruned


def _prune_chain(model: "nn.Module", chain: _Chain, ratio: float, importance: str) -> None:
    import torch

    producer = model.get_submodule(chain.producer)
    weight = producer.weight.detach().flatten(1)
    n_out = weight.shape[0]
    keep_n = max(1, int(round(n_out * (1.0 - ratio))))
    if keep_n == n_out:
        return
    scores = weight.abs().sum(1) if importance == "l1" else weight.pow(2).sum(1).sqrt()
    keep = torch.sort(torch.topk(scores, keep_n).indices).values

    _replace(model, chain.producer, _shrink(producer, out_idx=keep))
    for norm_name in chain.norms:
        norm = model.get_submodule(norm_name)
        new = type(norm)(keep_n, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=norm.track_running_stats)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(norm, attr)
            if src is not None:
                getattr(new, attr).data.copy_(src.data[keep])
        if norm.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(norm.num_batches_tracked)
        _replace(model, norm_name, new)
    consumer = model.get_submodule(chain.consumer)
    in_idx = (keep[:, None] * chain.per_channel + torch.arange(chain.per_channel)).flatten()
    _replace(model, chain.consumer, _shrink(consumer, in_idx=in_idx))


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
    """Fold every BatchNorm that directly follows a Conv2d into that conv (eval statistics).

    Deployment runtimes fold these anyway; folding before quantization means the
    weights that are quantized are the weights that run.
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
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            scale = gamma / torch.sqrt(bn.running_var + bn.eps)
            new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                            padding_mode=conv.padding_mode)
            bias = conv.bias.data if conv.bias is not None else torch.zeros(conv.out_channels)
            new.weight.data.copy_(conv.weight.data * scale.reshape(-1, 1, 1, 1))
            new.bias.data.copy_((bias - bn.running_mean) * scale + beta)
            _replace(folded, src.target, new)
            _replace(folded, node.target, nn.Identity())
    return folded
