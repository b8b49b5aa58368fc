"""Per-layer work of a PyTorch model: MACs, parameters and bytes at their bit-widths."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._enums import OpType
from slimsearch.hardware_profiles._schema import parse_sparsity_pattern

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_BITS", "LayerCost", "layer_costs"]

DEFAULT_BITS = 32
"""Bit-width of weights and activations on a module without ``weight_bits``/``act_bits``."""


def _check_bits(where: str, attribute: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
        raise ConfigError(f"{where}: {attribute} must be an int in [1, 32], got {value!r}")
    return value


@dataclass(frozen=True)
class LayerCost:
    """The work one layer does in one forward pass of the example input.

    Attributes:
        name: Qualified module name in the model (``"features.0"``).
        op: How the layer is costed (:class:`OpType`).
        macs: Multiply-accumulates for the whole example batch; nonzero only for the
            MAC types (convolutions, linear layers, matrix products).
        ops: Simple operations of the other types for the whole batch: one per output
            element (elementwise, normalisation, activation), one per window element
            per output (pooling), none for data movement (concatenation).
        params: Number of parameters.
        weight_bits: Bit-width the weights are stored and computed at.
        act_bits: Bit-width of the activations.
        weight_bytes: Weights packed at ``weight_bits`` (biases kept at 32 bits).
        act_bytes: Input plus output activations at ``act_bits``.
        sparsity: Fraction of weights that are exactly zero.
        sparsity_pattern: Structured pattern the zeros follow (``"2:4"``), or None.
        in_channels: Input channels of a convolution or pooling layer, else 0 (a
            device without a pooling unit runs pooling as a convolution across them).
        workspace_bytes: Bytes of the lowered input (im2col: every window of every
            input channel laid out as a matrix column) of a k x k convolution, at
            ``act_bits``; 0 for 1 x 1 and depthwise convolutions and other layers. A
            runtime that lowers convolutions to a matrix product writes and reads them
            (a profile without ``memory_overlap``).
        out_channels: Output channels of a convolution, else 0 (a runtime that works in
            blocks of channels rounds both counts up; see ``HardwareProfile.channel_block``).
        batch: Samples in the batch the layer ran on (the leading dimension of its first
            input), for costs paid once per sample.
    """

    name: str
    op: OpType
    macs: int
    params: int
    weight_bits: int
    act_bits: int
    weight_bytes: int
    act_bytes: int
    sparsity: float = 0.0
    sparsity_pattern: str | None = None
    ops: int = 0
    in_channels: int = 0
    workspace_bytes: int = 0
    out_channels: int = 0
    batch: int = 1

    def __post_init__(self) -> None:
        where = f"layer {self.name!r}"
        try:
            object.__setattr__(self, "op", OpType(self.op))
        except ValueError:
            raise ConfigError(f"{where}: op must be one of {[o.value for o in OpType]}, "
                              f"got {self.op!r}") from None
        for attribute in ("macs", "params", "weight_bytes", "act_bytes", "ops", "in_channels",
                          "workspace_bytes", "out_channels"):
            value = getattr(self, attribute)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: {attribute} must be an int >= 0, got {value!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"{where}: batch must be an int >= 1, got {self.batch!r}")
        _check_bits(where, "weight_bits", self.weight_bits)
        _check_bits(where, "act_bits", self.act_bits)
        if (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
                or not 0.0 <= self.sparsity <= 1.0):
            raise ConfigError(f"{where}: sparsity must be a number in [0, 1], got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", float(self.sparsity))
        if self.sparsity_pattern is not None:
            try:
                parse_sparsity_pattern(self.sparsity_pattern)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None

    @property
    def total_bytes(self) -> int:
        """Bytes moved to and from memory: weights plus activations."""
        return self.weight_bytes + self.act_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {
            "name": self.name, "op": self.op.value, "macs": self.macs, "params": self.params,
            "weight_bits": self.weight_bits, "act_bits": self.act_bits,
            "weight_bytes": self.weight_bytes, "act_bytes": self.act_bytes,
            "sparsity": self.sparsity, "sparsity_pattern": self.sparsity_pattern,
            "ops": self.ops, "in_channels": self.in_channels, "workspace_bytes": self.workspace_bytes,
            "out_channels": self.out_channels, "batch": self.batch,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerCost:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


@dataclass
class _Calls:
    """What the forward hooks saw of one module, summed over its calls."""

    module: Any
    name: str
    macs: int = 0
    ops: int = 0
    act_elements: int = 0
    in_channels: int = 0
    workspace_elements: int = 0
    batch: int = 1


@dataclass
class _Functional:
    """One call of a tensor function outside every costed module (``x + y``, ``torch.cat``)."""

    name: str
    op: OpType
    macs: int
    ops: int
    act_elements: int
    weight_elements: int
    act_bits: int
    batch: int = 1


# Tensor functions costed when a model calls them outside its costed modules (a residual
# ``x + y`` in a block's forward, attention's ``q @ k.T``); names with their leading and
# trailing underscores stripped. Shape and view functions are free and not listed.
_ELEMENTWISE_FUNCTIONS = frozenset({
    "add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "div", "truediv",
    "rtruediv", "itruediv", "true_divide", "maximum", "minimum", "neg", "pow", "rpow", "exp",
    "sqrt", "rsqrt", "erf", "clamp", "clip", "where", "relu", "relu6", "gelu", "silu", "sigmoid",
    "tanh", "elu", "leaky_relu", "hardswish", "hardsigmoid", "mish", "softmax", "log_softmax",
    "layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "normalize",
})
_MATMUL_FUNCTIONS = frozenset({"matmul", "rmatmul", "mm", "bmm", "linear", "scaled_dot_product_attention"})
_POOL_FUNCTIONS = frozenset({
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d",
})
_MOVE_FUNCTIONS = frozenset({"cat", "concat", "concatenate", "stack"})


def layer_costs(
    model: torch.nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...]
) -> list[LayerCost]:
    """Run one forward pass of ``example_input`` and cost every operation that ran, in call order.

    Modules: convolutions (dense k x k, 1 x 1, grouped) and linear layers get exact MACs;
    pooling gets one operation per window element per output; normalisation,
    activations and other leaf modules one operation per output element. Identity,
    dropout and flatten are free and left out. A module called several times is one
    entry with its work summed.

    Tensor functions a model calls outside those modules (a residual ``x + y``,
    ``torch.cat``, ``q @ k.transpose(-1, -2)``, ``F.relu``, ``softmax``) are costed too,
    one entry per call, named after the module whose ``forward`` called them (``"layer1.0.add"``,
    then ``"layer1.0.add_1"``, ...): they are nodes of the deployed graph and take time.
    Shape and view functions are free. A function's activations are at the ``act_bits``
    of the innermost enclosing module that has one (32 when none does).

    Bit-widths come from integer ``weight_bits``/``act_bits`` attributes on a module (32
    when absent) and the sparsity pattern from a ``sparsity_pattern`` attribute (None
    when absent).

    The model runs in eval mode under ``torch.no_grad()``; its train/eval flags are
    restored afterwards. Batch size is that of ``example_input``; a tuple is unpacked
    into positional arguments.

    Raises:
        ConfigError: A module carries a bit-width or sparsity pattern that is not allowed.
    """
    import torch
    from torch import nn
    from torch.overrides import TorchFunctionMode

    free = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)
    entries: list[_Calls | _Functional] = []
    by_module: dict[int, _Calls] = {}
    stack: list[tuple[str, Any]] = []  # modules whose forward is running, outermost first
    inside = [0]  # how many costed modules are running: their inner calls are theirs
    used_names: dict[str, int] = {}
    handles = []

    def record(record_name: str):
        def post(module: nn.Module, inputs: Any, output: Any) -> None:
            inside[0] -= 1
            entry = by_module.get(id(module))
            if entry is None:
                entry = by_module[id(module)] = _Calls(module, record_name)
                entries.append(entry)
            in_tensors, out_tensors = _tensors(inputs), _tensors(output)
            macs, ops = _module_work(module, in_tensors, out_tensors)
            entry.macs += macs
            entry.ops += ops
            entry.act_elements += sum(t.numel() for t in (*in_tensors, *out_tensors))
            if in_tensors and in_tensors[0].dim() >= 2:
                entry.in_channels = int(in_tensors[0].shape[1])
            entry.batch = _batch(in_tensors)
            entry.workspace_elements += _workspace(module, out_tensors)
        return post

    def enter(module: nn.Module, inputs: Any) -> None:
        inside[0] += 1

    def push(record_name: str):
        def pre(module: nn.Module, inputs: Any) -> None:
            stack.append((record_name, module))
        return pre

    def pop(module: nn.Module, inputs: Any, output: Any) -> None:
        stack.pop()

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if inside[0] == 0:
                call = _functional(func, args, kwargs or {}, out, stack, used_names)
                if call is not None:
                    entries.append(call)
            return out

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(push(name)))
        if "parametrizations" in name.split(".") or isinstance(module, free):
            handles.append(module.register_forward_hook(pop))
            continue
        costed = (
            isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
            or not any(True for _ in module.children())
            or any(True for _ in module.parameters(recurse=False))
        )
        if costed:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(record(name or type(module).__name__)))
        handles.append(module.register_forward_hook(pop))

    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), Functions():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags.items():
            module.training = training

    with torch.no_grad():
        return [_layer_cost(entry) if isinstance(entry, _Calls) else _functional_cost(entry)
                for entry in entries]


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _batch(tensors: list[Any]) -> int:
    """Samples in a call: the leading dimension of its first input of two or more dimensions."""
    for t in tensors:
        if t.dim() >= 2:
            return max(1, int(t.shape[0]))
    return 1


def _conv_type(module: Any) -> OpType:
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return OpType.CONV
    if module.groups > 1:
        return OpType.DWCONV
    if all(k == 1 for k in module.kernel_size):
        return OpType.CONV1X1
    return OpType.CONV


def _workspace(module: Any, outputs: list[Any]) -> int:
    """Elements of the im2col matrix of a k x k convolution call (0 for anything else)."""
    from torch import nn

    if (not isinstance(module, nn.modules.conv._ConvNd) or isinstance(module, nn.modules.conv._ConvTransposeNd)
            or not outputs or all(k == 1 for k in module.kernel_size)
            or (module.groups > 1 and module.groups == module.in_channels)):
        return 0
    positions = outputs[0].numel() // module.out_channels
    return positions * module.in_channels * math.prod(module.kernel_size)


def _is_pool(module: Any) -> bool:
    from torch.nn.modules import pooling

    return isinstance(module, (pooling._AvgPoolNd, pooling._MaxPoolNd, pooling._AdaptiveAvgPoolNd,
                               pooling._AdaptiveMaxPoolNd, pooling._LPPoolNd))


def _is_elementwise(module: Any) -> bool:
    from torch import nn

    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                           nn.LocalResponseNorm)):
        return True
    return (type(module).__module__ == "torch.nn.modules.activation"
            and not isinstance(module, nn.MultiheadAttention))


def _window_ops(inputs: list[Any], outputs: list[Any]) -> int:
    """Window elements read by a pooling call: each output reads in/out of its channel's input."""
    if not inputs or not outputs or outputs[0].numel() == 0:
        return 0
    inp, out = inputs[0], outputs[0]
    lead = 2 if inp.dim() >= 3 else 1  # batch and channel dimensions
    window_in = math.prod(inp.shape[lead:]) if inp.dim() > lead else 1
    window_out = math.prod(out.shape[lead:]) if out.dim() > lead else 1
    return out.numel() * max(1, round(window_in / max(window_out, 1)))


def _module_work(module: Any, inputs: list[Any], outputs: list[Any]) -> tuple[int, int]:
    """``(macs, ops)`` of one call of ``module``."""
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvTransposeNd) and inputs:
        per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
        return inputs[0].numel() * per_input, 0
    if isinstance(module, nn.modules.conv._ConvNd) and outputs:
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return outputs[0].numel() * per_output, 0
    if isinstance(module, nn.Linear) and outputs:
        return outputs[0].numel() * module.in_features, 0
    if _is_pool(module):
        kernel = getattr(module, "kernel_size", None)
        if kernel is not None and outputs:
            size = kernel if isinstance(kernel, (tuple, list)) else (kernel,) * max(outputs[0].dim() - 2, 1)
            return 0, outputs[0].numel() * math.prod(size)
        return 0, _window_ops(inputs, outputs)
    return 0, sum(t.numel() for t in outputs)


def _functional(func: Any, args: tuple, kwargs: dict, out: Any, stack: list, used: dict) -> _Functional | None:
    """The cost of one tensor-function call, or None when the function is free."""
    name = getattr(func, "__name__", "").strip("_")
    if name not in _ELEMENTWISE_FUNCTIONS | _MATMUL_FUNCTIONS | _POOL_FUNCTIONS | _MOVE_FUNCTIONS:
        return None
    inputs = _tensors(list(args) + list(kwargs.values()))
    outputs = _tensors(out)
    if not outputs:
        return None
    macs = ops = weight_elements = 0
    if name in _MATMUL_FUNCTIONS and inputs:
        op = OpType.MATMUL
        if name == "scaled_dot_product_attention" and len(inputs) >= 3:
            q, k = inputs[0], inputs[1]
            macs = 2 * q.numel() * k.shape[-2]  # scores q k^T, then scores @ v
        elif name == "linear" and len(inputs) >= 2:
            weight_elements = sum(t.numel() for t in inputs[1:])
            inputs = inputs[:1]
            macs = outputs[0].numel() * inputs[0].shape[-1]
        else:
            macs = outputs[0].numel() * (inputs[0].shape[-1] if inputs[0].dim() else 1)
    elif name in _POOL_FUNCTIONS:
        op, ops = OpType.POOL, _window_ops(inputs, outputs)
    elif name in _MOVE_FUNCTIONS:
        op = OpType.OTHER
    else:
        op, ops = OpType.ELEMENTWISE, sum(t.numel() for t in outputs)
    prefix = next((n for n, _ in reversed(stack) if n), "")
    base = f"{prefix}.{name}" if prefix else name
    count = used.get(base, 0)
    used[base] = count + 1
    act_bits = next((m.act_bits for _, m in reversed(stack) if isinstance(getattr(m, "act_bits", None), int)),
                    DEFAULT_BITS)
    return _Functional(
        name=base if count == 0 else f"{base}_{count}", op=op, macs=int(macs), ops=int(ops),
        act_elements=sum(t.numel() for t in (*inputs, *outputs)), weight_elements=weight_elements,
        act_bits=act_bits, batch=_batch(inputs or outputs),
    )


def _functional_cost(call: _Functional) -> LayerCost:
    where = f"layer {call.name!r}"
    act_bits = _check_bits(where, "act_bits", call.act_bits)
    return LayerCost(
        name=call.name, op=call.op, macs=call.macs, params=0, weight_bits=act_bits, act_bits=act_bits,
        weight_bytes=math.ceil(call.weight_elements * act_bits / 8),
        act_bytes=math.ceil(call.act_elements * act_bits / 8), ops=call.ops, batch=call.batch,
    )


def _layer_cost(entry: _Calls) -> LayerCost:
    import torch
    from torch import nn

    module, where = entry.module, f"layer {entry.name!r}"
    weight_bits = _bits(module, "weight_bits", where)
    act_bits = _bits(module, "act_bits", where)
    in_channels = out_channels = 0
    if isinstance(module, nn.modules.conv._ConvNd):
        op, in_channels, out_channels = _conv_type(module), module.in_channels, module.out_channels
    elif isinstance(module, nn.Linear):
        op = OpType.LINEAR
    elif _is_pool(module):
        op, in_channels = OpType.POOL, entry.in_channels
    elif _is_elementwise(module):
        op = OpType.ELEMENTWISE
    else:
        op = OpType.OTHER
    # Conv/linear children are parametrizations of their own weights; anything else with
    # children has those children costed on their own.
    recurse = op.counts_macs
    params, weight_bits_total = 0, 0
    for param_name, param in module.named_parameters(recurse=recurse):
        params += param.numel()
        bits = DEFAULT_BITS if param_name.rsplit(".", 1)[-1] == "bias" else weight_bits
        weight_bits_total += param.numel() * bits

    weight = getattr(module, "weight", None)
    sparsity = 0.0
    if isinstance(weight, torch.Tensor) and weight.numel() > 0:
        sparsity = float((weight == 0).sum().item()) / weight.numel()
    pattern = getattr(module, "sparsity_pattern", None)
    if pattern is not None:
        try:
            parse_sparsity_pattern(pattern)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    return LayerCost(
        name=entry.name,
        op=op,
        macs=int(entry.macs),
        params=int(params),
        weight_bits=weight_bits,
        act_bits=act_bits,
        weight_bytes=math.ceil(weight_bits_total / 8),
        act_bytes=math.ceil(entry.act_elements * act_bits / 8),
        sparsity=sparsity,
        sparsity_pattern=pattern,
        ops=int(entry.ops),
        in_channels=int(in_channels),
        workspace_bytes=math.ceil(entry.workspace_elements * act_bits / 8),
        out_channels=int(out_channels),
        batch=int(entry.batch),
    )


def _bits(module: Any, attribute: str, where: str) -> int:
    value = getattr(module, attribute, None)
    return DEFAULT_BITS if value is None else _check_bits(where, attribute, value)
