"""Hardware profiles: one data file per device, loaded into a validated dataclass."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._correction import Correction
from slimsearch.hardware_profiles._enums import DeviceKind, OpType, Precision
from slimsearch.hardware_profiles._schema import (
    _NAME_RE,
    MAX_EFFICIENCY,
    SCHEMA_VERSION,
    OpAtPrecision,
    OpKey,
    _check_keys,
    _check_number,
    _coerce_enum,
    _enum_mapping,
    _FieldError,
    _op_mapping,
    _parse_text,
    parse_sparsity_pattern,
)

__all__ = ["HardwareProfile", "PowerMode"]

@dataclass(frozen=True)
class PowerMode:
    """One DVFS operating point of a device.

    Attributes:
        name: The mode's name as the vendor tool knows it (e.g. ``"15W"`` for nvpmodel).
        clock_mhz: Clock of the engine the profile's peak throughput belongs to.
        power_w: Power budget (or measured full-load draw) at this operating point.
        default: Whether this is the mode the device boots in; peaks are quoted at it.
    """

    name: str
    clock_mhz: float
    power_w: float
    default: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise _FieldError(
                "power_modes.name",
                f"must be a name of letters, digits, '-' or '_', got {self.name!r}",
            )
        prefix = f"power_modes.{self.name}"
        object.__setattr__(self, "clock_mhz", _check_number(
            f"{prefix}.clock_mhz", self.clock_mhz, low=0, low_inclusive=False))
        object.__setattr__(self, "power_w", _check_number(
            f"{prefix}.power_w", self.power_w, low=0, low_inclusive=False))
        if not isinstance(self.default, bool):
            raise _FieldError(f"{prefix}.default", f"must be true or false, got {self.default!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {"name": self.name, "clock_mhz": self.clock_mhz, "power_w": self.power_w,
                "default": self.default}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PowerMode:
        """Inverse of :meth:`to_dict`."""
        _check_keys("power_modes[]", data, required=("name", "clock_mhz", "power_w"),
                    optional=("default",))
        return cls(**data)



@dataclass(frozen=True)
class HardwareProfile:
    """What slimsearch knows about one device, and where each number comes from.

    Peak throughput counts two operations per multiply-accumulate and is quoted at the
    default power mode's clock. Mappings are plain dicts for pickling; treat them as
    read-only.

    Attributes:
        name: Profile name, equal to its file name without ``.yaml``.
        kind: The engine that runs the model (cpu, gpu, npu, fpga, asic).
        description: One paragraph: the part, its memory, the runtime assumed.
        peak_gops: Peak dense throughput in GOPS per precision the device has kernels for.
        memory_bandwidth_gbps: Sustained off-chip memory bandwidth in GB/s.
        on_chip_memory_bytes: Last-level on-chip memory (cache or SRAM) in bytes.
        sparsity_patterns: Structured patterns (``"N:M"``) the hardware skips zeros for.
        power_modes: DVFS operating points; exactly one is the default.
        idle_power_w: Static draw while powered on, paid for every second of inference.
        active_power_w: Sustained full-load draw at the default mode; caps modelled power.
        energy_pj_per_mac: Dynamic energy per multiply-accumulate, by precision.
        energy_pj_per_byte: Dynamic energy per byte moved to or from off-chip memory.
        efficiency: Fraction of peak compute really reached, per op type. ``conv``,
            ``linear`` and ``other`` are required; a finer type left out uses its
            :attr:`OpType.fallback` (see :meth:`op_efficiency`). At most 1 in a profile
            from specs; a calibrated profile may exceed 1 (up to ``MAX_EFFICIENCY``)
            where the device beat the peak on that op type, i.e. where ``peak_gops``
            (a datasheet figure or a measured GEMM rate) is not that kernel's ceiling.
            A key ``"<op type>@<precision>"`` (``"conv@int8"``) gives that op type's
            efficiency at one precision, where the runtime's kernels for it differ.
        layer_overhead_us: Fixed cost per layer (dispatch, kernel launch, sync).
        op_overhead_us: Fixed cost per layer of a given op type (or ``op@precision``),
            overriding ``layer_overhead_us`` for it (empty: every type pays ``layer_overhead_us``).
        sample_overhead_us: Fixed cost per layer *per sample of the batch*, by op type (or
            ``op@precision``): kernels that loop over the batch (im2col and a GEMM per
            image, per-image quantization of activations) pay it once per image. Empty:
            none.
        channel_block: By precision, the block of channels the runtime's convolution
            kernels work in (e.g. 16 floats for onnxruntime's NCHWc kernels with
            AVX-512): a convolution whose channel counts are not multiples of it costs
            as if they were rounded up to one (input channels only when there are at
            least a block of them; fewer are read directly). Empty: no rounding.
        pool_as_conv: The device has no pooling unit and runs a k x k pooling layer as
            a k x k convolution across all its channels (a fixed kernel with the
            averaging weights on the channel diagonal), at ``channels`` times the
            window MACs. False: pooling costs one operation per window element.
        float_narrow_weights: The runtime has no integer kernel for weights narrower
            than its narrowest integer precision and runs such layers in float (weights
            dequantized, activations quantized and dequantized around the float op), as
            onnxruntime does with slimsearch's deployable graph. False: narrow weights
            are widened to the next integer kernel (the DESIGN rule for a bit-width the
            device has no kernel for).
        memory_overlap: A layer's memory traffic overlaps its compute (DMA and double
            buffering, as on accelerators and GPUs): the layer takes the larger of the
            two times (a roofline). False: it takes their sum, as a CPU kernel that first
            rearranges its input (im2col, packing) and then multiplies does.
        call_overhead_us: Fixed cost per inference call (runtime entry, input and output
            handling), or None when the profile does not model one (counted as 0).
        correction: A learned factor on the roofline's latency (:class:`Correction`, fitted by
            ``calibrate``; its own ``source`` says from what), or None: the roofline alone.
        sources: Field path (e.g. ``"peak_gops.int8"``) to a short citation, for every number.
        price_usd_per_hour: Rental price, or None when the device is owned, not rented.
        schema_version: Version of the file format.
    """

    name: str
    kind: DeviceKind
    description: str
    peak_gops: Mapping[Precision, float]
    memory_bandwidth_gbps: float
    on_chip_memory_bytes: int
    sparsity_patterns: tuple[str, ...]
    power_modes: tuple[PowerMode, ...]
    idle_power_w: float
    active_power_w: float
    energy_pj_per_mac: Mapping[Precision, float]
    energy_pj_per_byte: float
    efficiency: Mapping[OpKey, float]
    layer_overhead_us: float
    sources: Mapping[str, str]
    price_usd_per_hour: float | None = None
    call_overhead_us: float | None = None
    op_overhead_us: Mapping[OpKey, float] | None = None
    sample_overhead_us: Mapping[OpKey, float] | None = None
    channel_block: Mapping[Precision, int] | None = None
    pool_as_conv: bool = False
    float_narrow_weights: bool = False
    memory_overlap: bool = True
    correction: Correction | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        try:
            self._normalise_and_check()
        except _FieldError as exc:
            raise _FieldError(exc.path, exc.message, where=f"hardware profile {self.name!r}") from None

    def _normalise_and_check(self) -> None:
        put = object.__setattr__
        if self.schema_version != SCHEMA_VERSION or isinstance(self.schema_version, bool):
            raise _FieldError("schema_version", f"{self.schema_version!r} is not supported; "
                              f"allowed: [{SCHEMA_VERSION}]")
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise _FieldError("name", f"must be letters, digits, '-' or '_', got {self.name!r}")
        put(self, "kind", _coerce_enum("kind", self.kind, DeviceKind))
        if not isinstance(self.description, str) or not self.description.strip():
            raise _FieldError("description", "must be a non-empty string")

        peak = _enum_mapping("peak_gops", self.peak_gops, Precision, low=0, low_inclusive=False)
        if not peak:
            raise _FieldError("peak_gops", "must list at least one precision; allowed: "
                              f"{[p.value for p in Precision]}")
        put(self, "peak_gops", peak)
        put(self, "memory_bandwidth_gbps", _check_number(
            "memory_bandwidth_gbps", self.memory_bandwidth_gbps, low=0, low_inclusive=False))
        on_chip = self.on_chip_memory_bytes
        if isinstance(on_chip, bool) or not isinstance(on_chip, int) or on_chip < 0:
            raise _FieldError("on_chip_memory_bytes", f"must be an int >= 0, got {on_chip!r}")

        patterns = self.sparsity_patterns
        if isinstance(patterns, str) or not isinstance(patterns, Sequence):
            raise _FieldError("sparsity_patterns", f"must be a list such as [] or ['2:4'], got {patterns!r}")
        for pattern in patterns:
            try:
                parse_sparsity_pattern(pattern)
            except ConfigError as exc:
                raise _FieldError("sparsity_patterns", str(exc)) from None
        if len(set(patterns)) != len(patterns):
            raise _FieldError("sparsity_patterns", f"lists a pattern twice: {list(patterns)}")
        put(self, "sparsity_patterns", tuple(patterns))

        modes = tuple(self.power_modes)
        if not modes or not all(isinstance(mode, PowerMode) for mode in modes):
            raise _FieldError("power_modes", "must be a non-empty list of power modes")
        names = [mode.name for mode in modes]
        if len(set(names)) != len(names):
            raise _FieldError("power_modes", f"names must be unique, got {names}")
        defaults = [mode.name for mode in modes if mode.default]
        if len(defaults) != 1:
            raise _FieldError("power_modes", f"exactly one mode must be default, got {defaults}")
        put(self, "power_modes", modes)

        idle = _check_number("idle_power_w", self.idle_power_w, low=0)
        active = _check_number("active_power_w", self.active_power_w, low=0, low_inclusive=False)
        if idle > active:
            raise _FieldError("idle_power_w", f"must be <= active_power_w ({active:g}), got {idle:g}")
        put(self, "idle_power_w", idle)
        put(self, "active_power_w", active)

        energy = _enum_mapping("energy_pj_per_mac", self.energy_pj_per_mac, Precision, low=0)
        if set(energy) != set(peak):
            raise _FieldError("energy_pj_per_mac", "must have exactly the precisions of peak_gops "
                              f"{[p.value for p in peak]}, got {[p.value for p in energy]}")
        put(self, "energy_pj_per_mac", energy)
        put(self, "energy_pj_per_byte", _check_number(
            "energy_pj_per_byte", self.energy_pj_per_byte, low=0))

        efficiency = _op_mapping("efficiency", self.efficiency, low=0, low_inclusive=False,
                                 high=MAX_EFFICIENCY)
        missing = [o.value for o in OpType.base() if o not in efficiency]
        if missing:
            raise _FieldError("efficiency", f"must give the base op types {[o.value for o in OpType.base()]} "
                              f"(the others are optional), missing {missing}")
        put(self, "efficiency", efficiency)
        put(self, "layer_overhead_us", _check_number(
            "layer_overhead_us", self.layer_overhead_us, low=0))
        put(self, "op_overhead_us", _op_mapping("op_overhead_us", self.op_overhead_us or {}, low=0))
        put(self, "sample_overhead_us", _op_mapping("sample_overhead_us", self.sample_overhead_us or {}, low=0))
        blocks = _enum_mapping("channel_block", self.channel_block or {}, Precision, low=1)
        for precision, block in blocks.items():
            if not float(block).is_integer():
                raise _FieldError(f"channel_block.{precision.value}", f"must be an int >= 1, got {block!r}")
        put(self, "channel_block", {precision: int(block) for precision, block in blocks.items()})
        for flag in ("pool_as_conv", "float_narrow_weights", "memory_overlap"):
            if not isinstance(getattr(self, flag), bool):
                raise _FieldError(flag, f"must be true or false, got {getattr(self, flag)!r}")
        if self.price_usd_per_hour is not None:
            put(self, "price_usd_per_hour", _check_number(
                "price_usd_per_hour", self.price_usd_per_hour, low=0))
        if self.call_overhead_us is not None:
            put(self, "call_overhead_us", _check_number(
                "call_overhead_us", self.call_overhead_us, low=0))
        if self.correction is not None and not isinstance(self.correction, Correction):
            raise _FieldError("correction", f"must be a Correction or None, got {type(self.correction).__name__}")
        self._check_sources()

    def _check_sources(self) -> None:
        if not isinstance(self.sources, Mapping):
            raise _FieldError("sources", f"must be a mapping of field path to citation, "
                              f"got {type(self.sources).__name__}")
        numbers = self.numeric_fields()
        for path, citation in self.sources.items():
            if path not in numbers:
                raise _FieldError(f"sources.{path}", "names no number in this profile; allowed keys "
                                  f"are the numeric field paths {list(numbers)}")
            if not isinstance(citation, str) or not citation.strip():
                raise _FieldError(f"sources.{path}", "must be a non-empty citation string")
        for path in numbers:
            if path not in self.sources:
                raise _FieldError(f"sources.{path}", "is missing; every number needs a source "
                                  "(datasheet, paper, or 'estimate: <reasoning>')")
        object.__setattr__(self, "sources", dict(self.sources))

    def numeric_fields(self) -> dict[str, float]:
        """Every number in the profile by field path, the keys ``sources`` must cover."""
        out: dict[str, float] = {}
        for precision, value in self.peak_gops.items():
            out[f"peak_gops.{precision.value}"] = value
        out["memory_bandwidth_gbps"] = self.memory_bandwidth_gbps
        out["on_chip_memory_bytes"] = self.on_chip_memory_bytes
        for mode in self.power_modes:
            out[f"power_modes.{mode.name}.clock_mhz"] = mode.clock_mhz
            out[f"power_modes.{mode.name}.power_w"] = mode.power_w
        out["idle_power_w"] = self.idle_power_w
        out["active_power_w"] = self.active_power_w
        for precision, value in self.energy_pj_per_mac.items():
            out[f"energy_pj_per_mac.{precision.value}"] = value
        out["energy_pj_per_byte"] = self.energy_pj_per_byte
        for op, value in self.efficiency.items():
            out[f"efficiency.{op.value}"] = value
        out["layer_overhead_us"] = self.layer_overhead_us
        for op, value in self.op_overhead_us.items():
            out[f"op_overhead_us.{op.value}"] = value
        for op, value in self.sample_overhead_us.items():
            out[f"sample_overhead_us.{op.value}"] = value
        for precision, block in self.channel_block.items():
            out[f"channel_block.{precision.value}"] = block
        if self.call_overhead_us is not None:
            out["call_overhead_us"] = self.call_overhead_us
        if self.price_usd_per_hour is not None:
            out["price_usd_per_hour"] = self.price_usd_per_hour
        return out

    def op_efficiency(self, op: OpType, precision: Precision | None = None) -> float:
        """Efficiency of ``op`` (at ``precision``): the most specific entry there is.

        Tried in turn: ``op@precision``, ``op``, then the same two for ``op``'s fallback
        type (``conv1x1@int8``, ``conv1x1``, ``conv@int8``, ``conv``).
        """
        op = _coerce_enum("op", op, OpType)
        for kind in (op, op.fallback):
            if precision is not None:
                value = self.efficiency.get(OpAtPrecision(kind, precision))
                if value is not None:
                    return value
            if kind in self.efficiency:
                return self.efficiency[kind]
        raise AssertionError("unreachable: every fallback type is a base type")  # pragma: no cover

    def op_overhead(self, op: OpType, precision: Precision | None = None) -> float:
        """Fixed cost in us of one layer of type ``op`` (at ``precision``).

        ``op@precision``'s entry, else ``op``'s, else ``layer_overhead_us``.
        """
        return self._op_entry(self.op_overhead_us, op, precision, self.layer_overhead_us)

    def sample_overhead(self, op: OpType, precision: Precision | None = None) -> float:
        """Fixed cost in us of one layer of type ``op`` (at ``precision``) per sample of the batch.

        ``op@precision``'s entry, else ``op``'s, else 0.
        """
        return self._op_entry(self.sample_overhead_us, op, precision, 0.0)

    @staticmethod
    def _op_entry(table: Mapping, op: OpType, precision: Precision | None, default: float) -> float:
        op = _coerce_enum("op", op, OpType)
        if precision is not None:
            value = table.get(OpAtPrecision(op, precision))
            if value is not None:
                return value
        return table.get(op, default)

    @property
    def precisions(self) -> tuple[Precision, ...]:
        """Precisions the device has kernels for, narrowest first."""
        return tuple(p for p in Precision.ascending() if p in self.peak_gops)

    @property
    def default_power_mode(self) -> PowerMode:
        """The mode the peaks are quoted at."""
        return next(mode for mode in self.power_modes if mode.default)

    def power_mode(self, name: str | None = None) -> PowerMode:
        """The power mode called ``name``, or the default one when ``name`` is None.

        Raises:
            ConfigError: No mode has that name; the message lists the modes.
        """
        if name is None:
            return self.default_power_mode
        for mode in self.power_modes:
            if mode.name == name:
                return mode
        raise ConfigError(f"hardware profile {self.name!r} has no power mode {name!r}; "
                          f"must be one of {[mode.name for mode in self.power_modes]}")

    def kernel_precision(self, bits: int) -> Precision:
        """The narrowest precision this device has kernels for that holds ``bits``-bit values.

        A width the device has no kernel for runs at the next wider supported precision.

        Raises:
            ConfigError: No supported precision is wide enough.
        """
        needed = Precision.from_bits(bits)
        for precision in self.precisions:
            if precision.bits >= needed.bits:
                return precision
        raise ConfigError(f"hardware profile {self.name!r} has no kernel for {bits}-bit values; "
                          f"it supports {[p.value for p in self.precisions]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values in the layout of a profile file (optional keys only when set)."""
        out = {
            "schema_version": self.schema_version,
            "name": self.name,
            "kind": self.kind.value,
            "description": self.description,
            "peak_gops": {p.value: v for p, v in self.peak_gops.items()},
            "memory_bandwidth_gbps": self.memory_bandwidth_gbps,
            "on_chip_memory_bytes": self.on_chip_memory_bytes,
            "sparsity_patterns": list(self.sparsity_patterns),
            "power_modes": [mode.to_dict() for mode in self.power_modes],
            "idle_power_w": self.idle_power_w,
            "active_power_w": self.active_power_w,
            "energy_pj_per_mac": {p.value: v for p, v in self.energy_pj_per_mac.items()},
            "energy_pj_per_byte": self.energy_pj_per_byte,
            "price_usd_per_hour": self.price_usd_per_hour,
            "efficiency": {op.value: v for op, v in self.efficiency.items()},
            "layer_overhead_us": self.layer_overhead_us,
            "sources": dict(self.sources),
        }
        if self.call_overhead_us is not None:
            out["call_overhead_us"] = self.call_overhead_us
        if self.op_overhead_us:
            out["op_overhead_us"] = {op.value: v for op, v in self.op_overhead_us.items()}
        if self.sample_overhead_us:
            out["sample_overhead_us"] = {op.value: v for op, v in self.sample_overhead_us.items()}
        if self.channel_block:
            out["channel_block"] = {p.value: v for p, v in self.channel_block.items()}
        if self.pool_as_conv:
            out["pool_as_conv"] = True
        if self.float_narrow_weights:
            out["float_narrow_weights"] = True
        if not self.memory_overlap:
            out["memory_overlap"] = False
        if self.correction is not None:
            out["correction"] = self.correction.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "<dict>") -> HardwareProfile:
        """Build and validate a profile from the values of a profile file.

        Args:
            data: The parsed file.
            origin: Where ``data`` came from (a file path); starts every error message.

        Raises:
            ConfigError: One line naming ``origin``, the field path and what is allowed.
        """
        try:
            _check_keys("", data, required=_REQUIRED_KEYS, optional=_OPTIONAL_KEYS)
            modes = data["power_modes"]
            if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
                raise _FieldError("power_modes", f"must be a list of modes, got {modes!r}")
            parsed_modes = []
            for index, mode in enumerate(modes):
                try:
                    parsed_modes.append(PowerMode.from_dict(mode))
                except _FieldError as exc:
                    path = exc.path.replace("power_modes[]", f"power_modes[{index}]")
                    raise _FieldError(path, exc.message) from None
            values = {key: data[key] for key in (*_REQUIRED_KEYS, *_OPTIONAL_KEYS) if key in data}
            values["power_modes"] = tuple(parsed_modes)
            if values.get("sparsity_patterns") is None:
                values["sparsity_patterns"] = ()
            if values.get("correction") is not None:
                values["correction"] = Correction.from_dict(values["correction"])
            return cls(**values)
        except _FieldError as exc:
            raise ConfigError(f"{origin}: {exc.path}: {exc.message}") from None

    def to_json(self, *, indent: int | None = 2) -> str:
        """The profile as JSON text; :meth:`from_json` reads it back equal."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str, *, origin: str = "<json>") -> HardwareProfile:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(_parse_text(text, origin=origin, suffix=".json"), origin=origin)


_REQUIRED_KEYS = (
    "name", "kind", "description", "peak_gops", "memory_bandwidth_gbps",
    "on_chip_memory_bytes", "sparsity_patterns", "power_modes", "idle_power_w",
    "active_power_w", "energy_pj_per_mac", "energy_pj_per_byte", "efficiency",
    "layer_overhead_us", "sources",
)
_OPTIONAL_KEYS = ("price_usd_per_hour", "call_overhead_us", "op_overhead_us", "sample_overhead_us",
                  "channel_block", "pool_as_conv", "float_narrow_weights", "memory_overlap", "correction", "schema_version")


