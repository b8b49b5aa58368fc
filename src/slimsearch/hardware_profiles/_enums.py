"""Fixed choices shared by profiles, layer costs and predictions."""

from __future__ import annotations

from enum import Enum

from slimsearch.exceptions import ConfigError

__all__ = ["Bound", "DeviceKind", "OpType", "Precision"]


class Precision(str, Enum):
    """A numeric format a device has compute kernels for, narrowest last."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        """Width of one value in bits."""
        return _BITS[self]

    @classmethod
    def from_bits(cls, bits: int) -> Precision:
        """The smallest precision that holds a value of ``bits`` bits.

        ``bits <= 4`` is int4, ``<= 8`` int8, ``<= 16`` fp16, anything wider fp32.
        """
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
            raise ConfigError(f"bits must be an int in [1, 32], got {bits!r}")
        for precision in sorted(cls, key=lambda p: p.bits):
            if bits <= precision.bits:
                return precision
        raise AssertionError("unreachable: fp32 holds every width up to 32")  # pragma: no cover

    @classmethod
    def ascending(cls) -> tuple[Precision, ...]:
        """All precisions from narrowest to widest."""
        return tuple(sorted(cls, key=lambda p: p.bits))


_BITS = {Precision.FP32: 32, Precision.FP16: 16, Precision.INT8: 8, Precision.INT4: 4}


class OpType(str, Enum):
    """How a layer's work is costed: its own efficiency factor and overhead per device.

    ``conv``, ``linear`` and ``other`` are the base types every profile gives; the
    finer types fall back to a base type on a profile that does not list them
    (:attr:`fallback`). MAC types (:attr:`counts_macs`) do multiply-accumulates;
    ``pool``, ``elementwise`` and ``other`` do simple operations (one per output
    element, or per window element for pooling).
    """

    CONV = "conv"  # dense k x k convolution (k > 1), transposed convolutions too
    CONV1X1 = "conv1x1"  # pointwise (1 x 1) dense convolution
    DWCONV = "dwconv"  # grouped or depthwise convolution
    LINEAR = "linear"  # fully connected layer (weights x activations)
    MATMUL = "matmul"  # activation x activation product (attention scores, ...)
    POOL = "pool"  # average/max pooling over a window
    ELEMENTWISE = "elementwise"  # add, multiply, activation, normalisation, softmax
    OTHER = "other"  # anything else (concatenation, unknown modules)

    @property
    def fallback(self) -> OpType:
        """The base type whose efficiency and overhead apply when a profile omits this one."""
        return _FALLBACK.get(self, self)

    @property
    def counts_macs(self) -> bool:
        """Whether this type's work is multiply-accumulates (2 operations each)."""
        return self in _MAC_TYPES

    @classmethod
    def base(cls) -> tuple[OpType, ...]:
        """The types every profile must give an efficiency for."""
        return (cls.CONV, cls.LINEAR, cls.OTHER)


_FALLBACK = {
    OpType.CONV1X1: OpType.CONV, OpType.DWCONV: OpType.CONV, OpType.MATMUL: OpType.LINEAR,
    OpType.POOL: OpType.OTHER, OpType.ELEMENTWISE: OpType.OTHER,
}
_MAC_TYPES = frozenset({OpType.CONV, OpType.CONV1X1, OpType.DWCONV, OpType.LINEAR, OpType.MATMUL})


class DeviceKind(str, Enum):
    """What kind of engine a profile describes."""

    CPU = "cpu"
    GPU = "gpu"
    NPU = "npu"
    FPGA = "fpga"
    ASIC = "asic"


class Bound(str, Enum):
    """Which roofline limit sets a layer's predicted time."""

    COMPUTE = "compute"
    MEMORY = "memory"
