"""Latency, energy and cost of a model on a device, modelled from its layer costs.

Each layer is a roofline: the slower of its compute time and its memory time, plus a
fixed per-layer overhead and a fixed overhead per sample of the batch; a profile may
add a fixed per-call overhead. Energy is the dynamic energy of the MACs and bytes plus the
device's static power for the layer's time, never more than the device's full-load
power. Everything here is *modelled*, not measured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from slimsearch.exceptions import ConfigError, UnsupportedOnDevice
from slimsearch.hardware_profiles._correction import LayerTime, feature_values
from slimsearch.hardware_profiles._enums import Bound, OpType, Precision
from slimsearch.hardware_profiles._layers import LayerCost, layer_costs
from slimsearch.hardware_profiles._catalogue import load_profile
from slimsearch.hardware_profiles._profile import HardwareProfile, PowerMode
from slimsearch.hardware_profiles._schema import parse_sparsity_pattern

if TYPE_CHECKING:
    import torch

__all__ = ["LayerPrediction", "ModeScale", "Prediction", "correction_features", "predict", "predict_model"]


@dataclass(frozen=True)
class ModeScale:
    """What a power mode changes, relative to the profile's default mode: the clock (compute
    rates scale by ``clock``), the dynamic energy per MAC (``mac_energy``: power over frequency),
    and the energy bounds: static power ``static_w`` for the whole time, at most ``ceiling_w``."""

    clock: float
    mac_energy: float
    static_w: float
    ceiling_w: float

    @classmethod
    def of(cls, profile: HardwareProfile, mode: PowerMode) -> "ModeScale":
        reference = profile.default_power_mode
        clock = mode.clock_mhz / reference.clock_mhz
        power = mode.power_w / reference.power_w
        return cls(clock, power / clock, profile.idle_power_w,
                   max(profile.active_power_w * power, profile.idle_power_w))

    def energy_j(self, dynamic_j: float, time_s: float) -> float:
        """Energy of ``time_s`` of work whose MACs and bytes take ``dynamic_j``: plus static power, capped."""
        return min(dynamic_j + self.static_w * time_s, self.ceiling_w * time_s)


class LayerPrediction(NamedTuple):
    """One layer's share of a prediction."""

    name: str
    latency_ms: float
    energy_mj: float
    bound: Bound


@dataclass(frozen=True)
class Prediction:
    """Modelled cost of one inference of the example input on one device and power mode.

    Attributes:
        latency_ms: Sum of the layers' times plus the profile's per-call overhead (if any).
        energy_mj: Sum of the layers' energies plus static power over the per-call overhead.
        cost_usd_per_1m: Rental cost of a million inferences, or None if the device has no price.
        per_layer: One entry per layer, in call order.
        profile: Name of the hardware profile.
        power_mode: Name of the power mode.
    """

    latency_ms: float
    energy_mj: float
    cost_usd_per_1m: float | None
    per_layer: tuple[LayerPrediction, ...]
    profile: str
    power_mode: str

    @property
    def average_power_w(self) -> float:
        """Mean power over the inference (mJ per ms is W); 0 for an empty model."""
        return self.energy_mj / self.latency_ms if self.latency_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {
            "latency_ms": self.latency_ms,
            "energy_mj": self.energy_mj,
            "cost_usd_per_1m": self.cost_usd_per_1m,
            "per_layer": [[l.name, l.latency_ms, l.energy_mj, l.bound.value] for l in self.per_layer],
            "profile": self.profile,
            "power_mode": self.power_mode,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Prediction:
        """Inverse of :meth:`to_dict`."""
        per_layer = tuple(
            LayerPrediction(name, latency, energy, Bound(bound))
            for name, latency, energy, bound in data["per_layer"]
        )
        return cls(**{**data, "per_layer": per_layer})


def predict(
    layers: Sequence[LayerCost],
    profile: HardwareProfile | str | os.PathLike[str],
    *,
    power_mode: str | None = None,
) -> Prediction:
    """Model latency, energy and cost of ``layers`` on ``profile``.

    Per layer: the precision is the one :func:`kernel_work` picks; compute time is the
    layer's operations (2 per MAC, with MACs cut to N/M only where the device
    accelerates the layer's ``N:M`` sparsity pattern, plus its simple operations)
    over ``peak * efficiency * clock_scale``, the efficiency of the layer's op type at
    its precision (:meth:`HardwareProfile.op_efficiency`); memory time is ``(weight_bytes
    + act_bytes) / bandwidth``; the layer takes the larger of the two (their sum on a
    profile without ``memory_overlap``) plus its op type's overhead
    (:meth:`HardwareProfile.op_overhead`) plus ``batch`` times its per-sample overhead
    (:meth:`HardwareProfile.sample_overhead`). A profile's ``call_overhead_us`` (when
    set) is added once per inference, at static power.

    Energy is ``(macs + ops) * e_mac * v_scale + bytes * e_byte + idle_power * time``, capped at
    the mode's full-load power times the time. A power mode scales the clock by
    ``clock_mhz / default.clock_mhz`` and power by ``power_w / default.power_w``; energy
    per MAC scales by their ratio (dynamic energy per operation goes as power over
    frequency). Memory bandwidth and the per-layer overhead do not change with the mode.

    Args:
        layers: Layer costs, e.g. from :func:`layer_costs`.
        profile: A profile, or a shipped profile's name, or a profile file's path.
        power_mode: Name of a power mode of the profile; None means the default one.

    Raises:
        ConfigError: Unknown profile or power mode.
        UnsupportedOnDevice: A conv or linear layer is wider than every kernel of the device.
    """
    profile = load_profile(profile)
    mode = profile.power_mode(power_mode)
    scales = ModeScale.of(profile, mode)
    timed = _roofline(layers, profile, mode)
    call_s = (profile.call_overhead_us or 0.0) * 1e-6
    scale = 1.0  # the learned correction, the same factor on every layer's time
    if profile.correction is not None and not profile.correction.is_identity:
        scale = profile.correction.factor(feature_values(
            [t for t, _, _ in timed], sum(t.time_s for t, _, _ in timed) + call_s))
    per_layer = []
    for t, layer, dynamic_j in timed:
        time_s = t.time_s * scale
        energy_j = scales.energy_j(dynamic_j, time_s)
        bound = Bound.MEMORY if t.memory_bound else Bound.COMPUTE
        per_layer.append(LayerPrediction(layer.name, time_s * 1e3, energy_j * 1e3, bound))

    call_s *= scale
    latency_ms = sum(entry.latency_ms for entry in per_layer) + call_s * 1e3
    energy_mj = sum(entry.energy_mj for entry in per_layer) + scales.static_w * call_s * 1e3
    cost = None
    if profile.price_usd_per_hour is not None:
        cost = profile.price_usd_per_hour / 3600.0 * (latency_ms / 1e3) * 1e6
    return Prediction(
        latency_ms=latency_ms,
        energy_mj=energy_mj,
        cost_usd_per_1m=cost,
        per_layer=tuple(per_layer),
        profile=profile.name,
        power_mode=mode.name,
    )


def _roofline(layers: Sequence[LayerCost], profile: HardwareProfile,
              mode: PowerMode) -> list[tuple[LayerTime, LayerCost, float]]:
    """Each layer's roofline time (without the correction) and its dynamic energy in J."""
    scales = ModeScale.of(profile, mode)
    clock_scale, mac_energy_scale = scales.clock, scales.mac_energy
    bandwidth = profile.memory_bandwidth_gbps * 1e9
    rates: dict = {}  # (op, precision) -> (ops per second, overhead s, overhead s per sample)
    memo: dict = {}
    peak = profile.peak_gops
    timed = []
    for layer in layers:
        precision, work = kernel_work(layer, profile, memo)
        rate = rates.get((layer.op, precision))
        if rate is None:
            rate = rates[(layer.op, precision)] = (
                peak[precision] * 1e9 * profile.op_efficiency(layer.op, precision) * clock_scale,
                profile.op_overhead(layer.op, precision) * 1e-6,
                profile.sample_overhead(layer.op, precision) * 1e-6)
        compute_s = work / rate[0]
        memory_s = (layer.total_bytes + (0 if profile.memory_overlap else 2 * layer.workspace_bytes)) / bandwidth
        busy_s = max(compute_s, memory_s) if profile.memory_overlap else compute_s + memory_s
        time_s = busy_s + rate[1] + layer.batch * rate[2]
        dynamic_j = (work / 2.0 * profile.energy_pj_per_mac[precision] * mac_energy_scale
                     + layer.total_bytes * profile.energy_pj_per_byte) * 1e-12
        timed.append((LayerTime(layer.op, precision, time_s, compute_s < memory_s,
                                2.0 * layer.macs + layer.ops, work, layer.total_bytes), layer, dynamic_j))
    return timed


def correction_features(
    layers: Sequence[LayerCost], profile: HardwareProfile, *, power_mode: str | None = None
) -> tuple[dict[str, float], float]:
    """The correction's features of ``layers`` on ``profile``'s roofline, and that latency in ms.

    The profile's own correction (if any) is left out: these are what a new one is fitted on.
    """
    profile = load_profile(profile)
    timed = _roofline(layers, profile, profile.power_mode(power_mode))
    latency_s = sum(t.time_s for t, _, _ in timed) + (profile.call_overhead_us or 0.0) * 1e-6
    return feature_values([t for t, _, _ in timed], latency_s), latency_s * 1e3


def kernel_work(
    layer: LayerCost, profile: HardwareProfile, _memo: dict | None = None
) -> tuple[Precision, float]:
    """The precision ``layer`` runs at on ``profile`` and the operations it really executes.

    The precision is the narrowest kernel that holds ``max(weight_bits, act_bits)``
    (for the simple op types, ``act_bits``); simple layers wider than every kernel run
    at the widest one. On a ``float_narrow_weights`` profile a MAC layer whose weights
    are narrower than its activations' precision (W4A8) runs in fp32. Operations are 2 per
    MAC, with MACs cut to N/M only where the device accelerates the layer's ``N:M``
    pattern, plus the layer's simple operations; on a ``pool_as_conv`` device a pooling
    layer does 2 operations per window element per input channel instead. Where the
    profile gives a ``channel_block`` for the precision, a dense convolution's MACs
    grow as its channel counts are rounded up to the block (input channels only when
    there are at least a block of them). ``_memo`` (for this profile only) saves
    repeating lookups.

    Raises:
        ConfigError: ``layer`` is not a :class:`LayerCost`.
        UnsupportedOnDevice: A MAC layer is wider than every kernel of the device.
    """
    if not isinstance(layer, LayerCost):
        raise ConfigError(f"layers must be LayerCost values, got {type(layer).__name__}")
    macs_layer = layer.op.counts_macs
    bits = max(layer.weight_bits, layer.act_bits) if macs_layer else layer.act_bits
    if (macs_layer and profile.float_narrow_weights and layer.weight_bits < 32
            and Precision.from_bits(layer.weight_bits) != Precision.from_bits(bits)):
        bits = 32  # no integer kernel takes these weights: the layer runs in float
    memo = {} if _memo is None else _memo
    precision = memo.get(bits)
    if precision is None:
        widest = max(p.bits for p in profile.precisions)
        if bits > widest:
            if macs_layer:
                raise UnsupportedOnDevice(
                    f"layer {layer.name!r} needs {bits}-bit kernels; {profile.name!r} has only "
                    f"{[p.value for p in profile.precisions]}: quantize it to run there")
            # Elementwise and pooling layers work on whatever their producer emits,
            # which on this device is at most its widest precision.
            precision = profile.kernel_precision(widest)
        else:
            precision = memo[bits] = profile.kernel_precision(bits)
    macs = float(layer.macs)
    block = profile.channel_block.get(precision)
    if block and layer.op in (OpType.CONV, OpType.CONV1X1) and layer.out_channels and layer.in_channels:
        macs *= _rounded_up(layer.out_channels, block) / layer.out_channels
        if layer.in_channels >= block:
            macs *= _rounded_up(layer.in_channels, block) / layer.in_channels
    if layer.sparsity_pattern is not None and layer.sparsity_pattern in profile.sparsity_patterns:
        kept, group = parse_sparsity_pattern(layer.sparsity_pattern)
        macs *= kept / group
    ops = float(layer.ops)
    if profile.pool_as_conv and layer.op is OpType.POOL and layer.in_channels:
        ops *= 2 * layer.in_channels
    return precision, 2.0 * macs + ops


def _rounded_up(count: int, block: int) -> int:
    return -(-count // block) * block


def predict_model(
    model: torch.nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    profile: HardwareProfile | str | os.PathLike[str],
    *,
    power_mode: str | None = None,
) -> Prediction:
    """``predict(layer_costs(model, example_input), profile, power_mode=power_mode)``."""
    return predict(layer_costs(model, example_input), profile, power_mode=power_mode)
