"""Channel dependency analysis for structured pruning (torch.fx).

Every tensor's channel dimension (dim 1 of NCHW and of [N, C]) is described as a
list of *segments*, each a run of channels from one *space*. A Conv2d or Linear
starts a new space for its output channels. Channel-preserving layers (norms,
activations, pooling, depthwise convs) pass segments on; ``torch.cat`` along the
channel dim joins segment lists; an elementwise add (a residual connection) ties
the spaces of its two inputs together (union-find), because their channels are
summed index by index and must be kept or dropped together; a flatten turns each
channel into H*W features. A space that reaches the model's output, its input, or
an operation this analysis does not know is frozen (never pruned): the result is
always correct, at worst less pruned.

Pruning shrinks the layers in place (:func:`slice_channels`): each module keeps its
class, its forward and its children, and only its tensors get smaller. So a
Conv2d/Linear/BatchNorm, or a subclass with a forward of its own (TensorFlow-style
"same" padding, a quantized twin), counts as one only while every tensor it holds
is one pruning knows how to slice (:func:`can_slice`); any other layer is an
unknown operation, its channels frozen.

We write this ourselves because none of the project's dependencies offer it:
``torch.nn.utils.prune`` only masks weights (no smaller model), and torch-pruning
style dependency graphs are not among the allowed packages.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.exceptions import SlimSearchError

PASSTHROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Dropout2d, nn.Identity,
)
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
PASSTHROUGH_FUNCTIONS = (F.relu, torch.relu, F.gelu, F.silu, F.relu6, torch.sigmoid, torch.tanh,
                         F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout)
PASSTHROUGH_METHODS = ("relu", "sigmoid", "tanh", "contiguous", "clone")
ADD_TARGETS = (operator.add, operator.iadd, torch.add, operator.sub, torch.sub, operator.mul, torch.mul)


@dataclass(frozen=True)
class Segment:
    space: int
    offset: int  # where the run starts in the tensor's channel dim
    size: int  # channels in the run
    per: int = 1  # features per channel (H*W after a flatten)


@dataclass
class ChannelGraph:
    """Spaces, which are frozen, and how each module's dims map onto them."""

    sizes: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    frozen: set[int] = field(default_factory=set)
    producers: dict[str, int] = field(default_factory=dict)  # module -> space of its output rows
    consumers: dict[str, list[Segment]] = field(default_factory=dict)  # module -> its input columns
    members: dict[str, list[Segment]] = field(default_factory=dict)  # norms, depthwise convs: own params

    def new_space(self, size: int, *, frozen: bool = False) -> int:
        self.sizes.append(size)
        self.parent.append(len(self.parent))
        if frozen:
            self.frozen.add(len(self.sizes) - 1)
        return len(self.sizes) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.frozen or ra in self.frozen:
                self.frozen.add(ra)

    def freeze(self, segments) -> None:
        for seg in segments or ():
            self.frozen.add(self.find(seg.space))

    def is_frozen(self, s: int) -> bool:
        return self.find(s) in self.frozen or any(self.find(f) == self.find(s) for f in self.frozen)

    def groups(self) -> dict[str, list[str]]:
        """Prunable groups: name (first producer) -> producers whose outputs are tied together."""
        by_root: dict[int, list[str]] = {}
        for name, space in self.producers.items():
            if not self.is_frozen(space):
                by_root.setdefault(self.find(space), []).append(name)
        return {names[0]: names for names in by_root.values()}


def trace(model: nn.Module, example_input: torch.Tensor):
    """``model`` traced by torch.fx with tensor shapes attached; a clear error if it cannot be."""
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    class _Tracer(torch.fx.Tracer):
        # Conv2d/Linear subclasses (slimsearch's quantized layers, users' own) are
        # single operations here, as nn.Conv2d/nn.Linear are: their forward holds
        # quantization arithmetic that fx cannot (and need not) trace through.
        def is_leaf_module(self, m, qualname):
            return isinstance(m, (nn.Conv2d, nn.Linear)) or super().is_leaf_module(m, qualname)

    try:
        gm = torch.fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as exc:
        raise SlimSearchError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {str(exc)[:200]}); "
            "structured pruning needs a traceable model"
        ) from exc
    # Shapes come from one forward pass: in eval mode and without gradients, so the
    # user's model (whose modules the trace shares) keeps its BatchNorm statistics.
    flags = {m: m.training for m in model.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    finally:
        for m, flag in flags.items():
            m.training = flag
    return gm


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def analyse(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """Build the ChannelGraph of ``model`` for ``example_input``."""
    gm = trace(model, example_input)
    modules = dict(gm.named_modules())
    g = ChannelGraph()
    layout: dict = {}  # node -> list[Segment] of its channel dim

    def fresh(node, *, frozen: bool) -> list[Segment] | None:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return [Segment(g.new_space(shape[1], frozen=frozen), 0, shape[1])]

    def inputs(node) -> list:
        return [layout.get(a) for a in node.all_input_nodes]

    for node in gm.graph.nodes:
        ins = inputs(node)
        first = ins[0] if ins else None
        shape = _shape(node)
        if node.op == "placeholder":
            layout[node] = fresh(node, frozen=True)
            continue
        if node.op == "output":
            for segs in ins:
                g.freeze(segs)
            continue
        if node.op == "call_module":
            mod = modules[node.target]
            in_shape = _shape(node.all_input_nodes[0]) if node.all_input_nodes else None
            if _is_dense(mod) and _channels_match(mod, in_shape, shape):
                if isinstance(mod, nn.Linear) and len(in_shape) != 2:
                    g.freeze(first)  # a Linear over a sequence: channel dim is not dim 1
                    layout[node] = fresh(node, frozen=True)
                    continue
                if not can_slice(mod, rows=False, columns=True):
                    g.freeze(first)
                g.consumers[node.target] = list(first or [])
                out = shape[1]
                space = g.new_space(out, frozen=not can_slice(mod, rows=True, columns=False))
                g.producers[node.target] = space
                layout[node] = [Segment(space, 0, out)]
                continue
            if (_is_depthwise(mod) and first and _channels_match(mod, in_shape, shape)
                    and can_slice(mod, rows=True, columns=False)):
                g.members[node.target] = list(first)  # depthwise: its rows follow its input channels
                layout[node] = first
                continue
            if (isinstance(mod, NORM_MODULES) and first and shape is not None and shape[1] == mod.num_features
                    and can_slice(mod, rows=True, columns=False)):
                g.members[node.target] = list(first)
                layout[node] = first
                continue
            if isinstance(mod, PASSTHROUGH_MODULES):
                layout[node] = first
                continue
            if isinstance(mod, nn.Flatten):
                layout[node] = _flatten(node, first, g)
                continue
        if node.op == "call_function":
            if node.target in PASSTHROUGH_FUNCTIONS:
                layout[node] = first
                continue
            if node.target is torch.flatten:
                layout[node] = _flatten(node, first, g)
                continue
            if node.target in ADD_TARGETS:
                tensors = [s for s in ins if s is not None]
                if len(tensors) == 1 and len(node.all_input_nodes) == 1:
                    layout[node] = tensors[0]  # tensor with a scalar
                    continue
                if len(tensors) == 2 and _same_cut(*tensors) and all(_shape(a) == shape for a in node.all_input_nodes):
                    for a, b in zip(*tensors):
                        g.union(a.space, b.space)
                    layout[node] = tensors[0]
                    continue
            if node.target is torch.cat and _cat_dim(node) == 1 and all(s is not None for s in ins):
                segs, offset = [], 0
                for part in ins:
                    for seg in part:
                        segs.append(Segment(seg.space, offset + seg.offset, seg.size, seg.per))
                    offset += sum(seg.size for seg in part)
                layout[node] = segs
                continue
        if node.op == "call_method":
            if node.target in PASSTHROUGH_METHODS:
                layout[node] = first
                continue
            if node.target in ("flatten", "view", "reshape") and shape is not None and len(shape) == 2:
                layout[node] = _flatten(node, first, g)
                continue
            if node.target == "mean" and shape is not None and len(shape) == 2 and first:
                layout[node] = first  # global average over the spatial dims
                continue
        # Anything else: its channels are frozen, its output starts a frozen space.
        for segs in ins:
            g.freeze(segs)
        layout[node] = fresh(node, frozen=True)
    return g


def _is_dense(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or isinstance(mod, nn.Conv2d) and mod.groups == 1


def _is_depthwise(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels == mod.out_channels


def _channels_match(mod: nn.Module, in_shape, out_shape) -> bool:
    """Whether a Conv2d/Linear (maybe a subclass with its own forward) maps its channels as its class says."""
    if in_shape is None or out_shape is None or len(in_shape) < 2 or len(out_shape) < 2:
        return False
    if isinstance(mod, nn.Conv2d):
        return len(in_shape) == len(out_shape) == 4 and (in_shape[1], out_shape[1]) == (
            mod.in_channels, mod.out_channels)
    return (in_shape[-1], out_shape[-1]) == (mod.in_features, mod.out_features)


# Tensors pruning knows how to slice. A norm holds only these:
_NORM_TENSORS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
# slimsearch's quantized twins (compress/quant/layers.py) add per-tensor scalars, a
# sparsity mask shaped like the weight, and a weight grid of one row per output channel.
_QUANT_SCALARS = frozenset({"act_min", "act_max", "act_scale", "act_zero_point", "weight_scale_step"})
_QUANT_ROWS = frozenset({"weight_scale", "weight_zero_point"})


def can_slice(module: nn.Module, *, rows: bool, columns: bool) -> bool:
    """Whether :func:`slice_channels` keeps ``module`` what it was with fewer output ``rows``/input ``columns``.

    True for a Conv2d (dense or depthwise), Linear or BatchNorm, or a subclass of
    one, whose tensors (its children's included) are all ones pruning knows how to
    slice; for a norm or depthwise conv, ``rows`` are its channels. Whatever else a
    layer holds (a child norm, a parametrization, a buffer of its own) has a meaning
    pruning cannot know, so the answer is False and the layer's channels stay.
    """
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    if isinstance(module, NORM_MODULES):
        return not columns and set(tensors) <= _NORM_TENSORS
    if not (_is_dense(module) or _is_depthwise(module)):
        return False
    if _is_depthwise(module) and columns:
        return False
    weight = module.weight
    for name, tensor in tensors.items():
        if name in ("weight", "bias") or name in _QUANT_SCALARS and tensor.dim() == 0:
            continue
        if name == "weight_mask" and tensor.shape == weight.shape:
            if columns and getattr(module, "sparsity_pattern", None):
                return False  # an N:M pattern runs along the input columns
            continue
        if name in _QUANT_ROWS and tensor.dim() == 2 and tensor.shape[0] == weight.shape[0]:
            if columns and (tensor.shape[1] != 1 or "weight_scale_step" in tensors):
                return False  # grid groups run along the input columns
            continue
        return False
    return True


def slice_channels(module: nn.Module, *, rows: torch.Tensor | None = None,
                   columns: torch.Tensor | None = None) -> None:
    """Keep output channels ``rows`` and input channels ``columns`` of ``module``, in place.

    Only the module's own tensors and its channel counts change: its class, forward,
    children and training flag stay. For a norm or a depthwise conv, ``rows`` are
    its channels. Check :func:`can_slice` first.
    """
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    for name, tensor in tensors:
        if tensor is None or tensor.dim() == 0:
            continue
        new = tensor.detach()
        if rows is not None:
            new = new[rows]
        if columns is not None and name in ("weight", "weight_mask"):
            new = new[:, columns]
        new = new.clone()
        if isinstance(tensor, nn.Parameter):
            new = nn.Parameter(new, requires_grad=tensor.requires_grad)
        setattr(module, name, new)
    if isinstance(module, nn.Conv2d) and module.groups > 1:  # depthwise
        module.groups = module.in_channels = module.out_channels = len(rows)
    elif isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = module.weight.shape[:2]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif rows is not None:
        module.num_features = len(rows)


def _same_cut(a: list[Segment], b: list[Segment]) -> bool:
    return len(a) == len(b) and all(x.offset == y.offset and x.size == y.size and x.per == y.per for x, y in zip(a, b))


def _cat_dim(node) -> int:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim


def _flatten(node, first, g: ChannelGraph):
    src = _shape(node.all_input_nodes[0])
    if first is None or src is None:
        return None
    if len(src) == 2:
        return first
    if len(src) == 4 and _shape(node) == (src[0], src[1] * src[2] * src[3]):
        per = src[2] * src[3]
        return [Segment(s.space, s.offset * per, s.size, s.per * per) for s in first]
    g.freeze(first)
    shape = _shape(node)
    return [Segment(g.new_space(shape[1], frozen=True), 0, shape[1])]
