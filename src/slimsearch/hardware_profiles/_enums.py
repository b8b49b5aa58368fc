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
    """How a layer's work is costed: its own efficiency factor per device."""

    CONV = "conv"
    LINEAR = "linear"
    OTHER = "other"


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
