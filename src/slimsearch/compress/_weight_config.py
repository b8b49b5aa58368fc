"""The weight-only quantization config of decoder LLMs and the round-to-nearest step
that every method (RTN, GPTQ, AWQ) ends with; public through :mod:`.weight_only`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from slimsearch.compress._calibration import GROUP_NAMES
from slimsearch.exceptions import ConfigError
from slimsearch.structures import llm

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimsearch.compress.quant.grid import QuantizedWeight

BITS = (2, 3, 4, 8)
GROUP_SIZES = (0, 32, 64, 128)
FLOAT = 16  # an override of 16 bits leaves that block's group in float


class WeightMethod(str, Enum):
    """How weights are rounded: to nearest, GPTQ's error feedback, or AWQ's scaled RTN."""

    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"


def _one_of(field_name: str, value, allowed: Sequence) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"WeightOnlyConfig.{field_name} must be one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Weight-only post-training quantization of a decoder LLM's linear layers.

    Attributes:
        method: ``rtn``, ``gptq`` or ``awq``.
        bits: code width, one of 2, 3, 4, 8.
        group_size: input elements per scale (0 = one scale per output channel).
        symmetric: signed codes and no zero point, or unsigned codes with one.
        groups: linear groups quantized in every block (``qkv``, ``o``, ``gate_up``, ``down``).
        overrides: ``"block.group"`` (e.g. ``"11.down"``) -> bits for that group of that
            block; 16 leaves it in float.
        damp: GPTQ: damping added to the Hessian's diagonal, a share of its mean.
        sink_weight: GPTQ and AWQ: share of the calibration objective held by the first
            token of each window (the attention sink, which every later query reads);
            0 weighs it as one token of many, as plain GPTQ does.
        block_size: GPTQ: columns per lazy batch update.
        grid: AWQ: steps of the scale exponent searched in [0, 1).
        clip: AWQ: also search a clipping range per output channel and group.
        max_tokens: AWQ: calibration tokens (sampled evenly) its searches score on.
        batch_size: calibration windows per forward pass.
    """

    method: str = WeightMethod.RTN.value
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    groups: tuple[str, ...] = GROUP_NAMES
    overrides: Mapping[str, int] = field(default_factory=dict)
    damp: float = 0.01
    sink_weight: float = 0.1
    block_size: int = 128
    grid: int = 20
    clip: bool = True
    max_tokens: int = 4096
    batch_size: int = 1

    def __post_init__(self) -> None:
        methods = [m.value for m in WeightMethod]
        _one_of("method", self.method.value if isinstance(self.method, WeightMethod) else self.method, methods)
        object.__setattr__(self, "method", WeightMethod(self.method).value)
        _one_of("bits", self.bits, BITS)
        _one_of("group_size", self.group_size, GROUP_SIZES)
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"WeightOnlyConfig.symmetric must be true or false, got {self.symmetric!r}")
        groups = (self.groups,) if isinstance(self.groups, str) else tuple(self.groups)
        for name in groups:
            _one_of("groups", name, GROUP_NAMES)
        object.__setattr__(self, "groups", groups)
        overrides = dict(self.overrides)
        for key, bits in overrides.items():
            block, _, group = str(key).partition(".")
            if not block.isdigit() or group not in GROUP_NAMES:
                raise ConfigError(f"WeightOnlyConfig.overrides keys must be 'block.group' with group one of "
                                  f"{list(GROUP_NAMES)} (e.g. '11.down'), got {key!r}")
            _one_of(f"overrides[{key!r}]", bits, BITS + (FLOAT,))
        object.__setattr__(self, "overrides", overrides)
        if not 0.0 < float(self.damp) < 1.0:
            raise ConfigError(f"WeightOnlyConfig.damp must be in (0, 1), got {self.damp!r}")
        if isinstance(self.sink_weight, bool) or not 0.0 <= float(self.sink_weight) < 1.0:
            raise ConfigError(f"WeightOnlyConfig.sink_weight must be in [0, 1), got {self.sink_weight!r}")
        for name in ("block_size", "grid", "max_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"WeightOnlyConfig.{name} must be an integer >= 1, got {value!r}")

    def bits_for(self, block: int, group: str) -> Optional[int]:
        """Bits of ``group`` in ``block``, or None when it stays in float."""
        if group not in self.groups and f"{block}.{group}" not in self.overrides:
            return None
        bits = self.overrides.get(f"{block}.{group}", self.bits)
        return None if bits == FLOAT else int(bits)

    def active_groups(self) -> tuple[str, ...]:
        """Group names quantized in some block (by ``groups`` or an override), in block order."""
        named = set(self.groups) | {key.partition(".")[2] for key in self.overrides}
        return tuple(name for name in GROUP_NAMES if name in named)

    def check_blocks(self, model: "nn.Module") -> None:
        """Overrides must name blocks the model has."""
        n = len(llm.blocks(model))
        bad = sorted(k for k in self.overrides if int(k.partition(".")[0]) >= n)
        if bad:
            raise ConfigError(f"WeightOnlyConfig.overrides name blocks the model lacks (it has blocks 0..{n - 1}): "
                              f"{bad}")


def quantize_rows(weight: "torch.Tensor", config: WeightOnlyConfig, bits: int, **grid) -> "QuantizedWeight":
    """``(out, in)`` weight on the config's grid (float32 scales per group, as MatMulNBits keeps them)."""
    from slimsearch.compress.quant.grid import quantize_weight

    return quantize_weight(weight, bits, group_size=config.group_size, symmetric=config.symmetric,
                           two_level=False, **grid)


def store(model: "nn.Module", path: str, qw: "QuantizedWeight", out: dict) -> None:
    """Write ``qw``'s float values into the layer at ``path`` and record it under ``path``."""
    llm.set_weight(llm.get(model, path), qw.dequantize())
    out[path] = qw


def rtn_group(model: "nn.Module", config: WeightOnlyConfig, bits: int, paths: Sequence[str], out: dict) -> None:
    """Round each member of a linear group to nearest, in place."""
    for path in paths:
        weight = llm.weight_of(llm.get(model, path))
        store(model, path, quantize_rows(weight, config, bits), out)
