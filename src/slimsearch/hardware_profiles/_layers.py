"""Per-layer work of a PyTorch model: MACs, parameters and bytes at their bit-widths."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._enums import OpType
from slimsearch.hardware_profiles._profile import parse_sparsity_pattern

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
        op: How the layer is costed: conv, linear or other.
        macs: Multiply-accumulates for the whole example batch.
        params: Number of parameters.
        weight_bits: Bit-width the weights are stored and computed at.
        act_bits: Bit-width of the activations.
        weight_bytes: Weights packed at ``weight_bits`` (biases kept at 32 bits).
        act_bytes: Input plus output activations at ``act_bits``.
        sparsity: Fraction of weights that are exactly zero.
        sparsity_pattern: Structured pattern the zeros follow (``"2:4"``), or None.
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

    def __post_init__(self) -> None:
        where = f"layer {self.name!r}"
        try:
            object.__setattr__(self, "op", OpType(self.op))
        except ValueError:
            raise ConfigError(f"{where}: op must be one of {[o.value for o in OpType]}, "
                              f"got {self.op!r}") from None
        for attribute in ("macs", "params", "weight_bytes", "act_bytes"):
            value = getattr(self, attribute)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: {attribute} must be an int >= 0, got {value!r}")
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
    act_elements: int = 0


def layer_costs(
    model: torch.nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...]
) -> list[LayerCost]:
    """Run one forward pass of ``example_input`` and cost every layer that ran, in call order.

    Convolutions and linear layers get exact MACs; other leaf modules (normalisation,
    activations, pooling, ...) are costed as one MAC per output element. Identity,
    dropout and flatten are free and left out. A module called several times is one
    entry with its MACs and activations summed. Bit-widths come from integer
    ``weight_bits``/``act_bits`` attributes on a module (32 when absent) and the
    sparsity pattern from a ``sparsity_pattern`` attribute (None when absent).

    The model runs in eval mode under ``torch.no_grad()``; its train/eval flags are
    restored afterwards. Batch size is that of ``example_input``; a tuple is unpacked
    into positional arguments.

    Raises:
        ConfigError: A module carries a bit-width or sparsity pattern that is not allowed.
    """
    import torch
    from torch import nn

    free = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)
    calls: dict[int, _Calls] = {}
    handles = []

    def hook(record_name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            entry = calls.setdefault(id(module), _Calls(module, record_name))
            in_tensors, out_tensors = _tensors(inputs), _tensors(output)
            entry.macs += _macs(module, in_tensors, out_tensors)
            entry.act_elements += sum(t.numel() for t in (*in_tensors, *out_tensors))
        return record

    for name, module in model.named_modules():
        if "parametrizations" in name.split(".") or isinstance(module, free):
            continue
        costed = (
            isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
            or not any(True for _ in module.children())
            or any(True for _ in module.parameters(recurse=False))
        )
        if costed:
            handles.append(module.register_forward_hook(hook(name or type(module).__name__)))

    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
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
        return [_layer_cost(entry) for entry in calls.values()]


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _macs(module: Any, inputs: list[Any], outputs: list[Any]) -> int:
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvTransposeNd) and inputs:
        per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
        return inputs[0].numel() * per_input
    if isinstance(module, nn.modules.conv._ConvNd) and outputs:
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return outputs[0].numel() * per_output
    if isinstance(module, nn.Linear) and outputs:
        return outputs[0].numel() * module.in_features
    return sum(t.numel() for t in outputs)


def _layer_cost(entry: _Calls) -> LayerCost:
    import torch
    from torch import nn

    module, where = entry.module, f"layer {entry.name!r}"
    weight_bits = _bits(module, "weight_bits", where)
    act_bits = _bits(module, "act_bits", where)
    if isinstance(module, nn.modules.conv._ConvNd):
        op = OpType.CONV
    elif isinstance(module, nn.Linear):
        op = OpType.LINEAR
    else:
        op = OpType.OTHER
    # Conv/linear children are parametrizations of their own weights; anything else with
    # children has those children costed on their own.
    recurse = op is not OpType.OTHER
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
    )


def _bits(module: Any, attribute: str, where: str) -> int:
    value = getattr(module, attribute, None)
    return DEFAULT_BITS if value is None else _check_bits(where, attribute, value)
