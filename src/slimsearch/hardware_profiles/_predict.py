"""Latency, energy and cost of a model on a device, modelled from its layer costs.

Each layer is a roofline: the slower of its compute time and its memory time, plus a
fixed per-layer overhead; a profile may add a fixed per-call overhead. Energy is the dynamic energy of the MACs and bytes plus the
device's static power for the layer's time, never more than the device's full-load
power. Everything here is *modelled*, not measured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from slimsearch.exceptions import ConfigError, UnsupportedOnDevice
from slimsearch.hardware_profiles._enums import Bound, OpType, Precision
from slimsearch.hardware_profiles._layers import LayerCost, layer_costs
from slimsearch.hardware_profiles._profile import (
    HardwareProfile,
    load_profile,
    parse_sparsity_pattern,
)

if TYPE_CHECKING:
    import torch

__all__ = ["LayerPrediction", "Prediction", "predict", "predict_model"]


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

    Per layer: the precision is the narrowest one the device has kernels for that holds
    ``max(weight_bits, act_bits)``; compute time is ``2 * macs / (peak * efficiency[op] *
    clock_scale)``, with MACs cut to N/M only where the device accelerates the layer's
    ``N:M`` sparsity pattern; memory time is ``(weight_bytes + act_bytes) / bandwidth``;
    the layer takes the larger of the two plus the per-layer overhead. A profile's
    ``call_overhead_us`` (when set) is added once per inference, at static power.

    Energy is ``macs * e_mac * v_scale + bytes * e_byte + idle_power * time``, capped at
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
    reference = profile.default_power_mode
    clock_scale = mode.clock_mhz / reference.clock_mhz
    power_scale = mode.power_w / reference.power_w
    mac_energy_scale = power_scale / clock_scale
    static_w = profile.idle_power_w
    ceiling_w = max(profile.active_power_w * power_scale, static_w)
    bandwidth = profile.memory_bandwidth_gbps * 1e9
    overhead_s = profile.layer_overhead_us * 1e-6

    per_layer = []
    memo: dict[int, Precision] = {}
    peak, efficiency = profile.peak_gops, profile.efficiency
    for layer in layers:
        precision, macs = kernel_work(layer, profile, memo)
        throughput = peak[precision] * 1e9 * efficiency[layer.op] * clock_scale
        compute_s = 2.0 * macs / throughput
        memory_s = layer.total_bytes / bandwidth
        time_s = max(compute_s, memory_s) + overhead_s
        dynamic_j = (
            macs * profile.energy_pj_per_mac[precision] * mac_energy_scale
            + layer.total_bytes * profile.energy_pj_per_byte
        ) * 1e-12
        energy_j = min(dynamic_j + static_w * time_s, ceiling_w * time_s)
        bound = Bound.COMPUTE if compute_s >= memory_s else Bound.MEMORY
        per_layer.append(LayerPrediction(layer.name, time_s * 1e3, energy_j * 1e3, bound))

    call_s = (profile.call_overhead_us or 0.0) * 1e-6
    latency_ms = sum(entry.latency_ms for entry in per_layer) + call_s * 1e3
    energy_mj = sum(entry.energy_mj for entry in per_layer) + static_w * call_s * 1e3
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


def kernel_work(
    layer: LayerCost, profile: HardwareProfile, _memo: dict[int, Precision] | None = None
) -> tuple[Precision, float]:
    """The precision ``layer`` runs at on ``profile`` and the MACs it really executes.

    The precision is the narrowest kernel that holds ``max(weight_bits, act_bits)``;
    elementwise and pooling layers wider than every kernel run at the widest one. MACs
    are cut to N/M only where the device accelerates the layer's ``N:M`` pattern.
    ``_memo`` (bits to precision, for this profile only) saves repeating the lookup.

    Raises:
        ConfigError: ``layer`` is not a :class:`LayerCost`.
        UnsupportedOnDevice: A conv or linear layer is wider than every kernel of the device.
    """
    if not isinstance(layer, LayerCost):
        raise ConfigError(f"layers must be LayerCost values, got {type(layer).__name__}")
    bits = max(layer.weight_bits, layer.act_bits)
    memo = {} if _memo is None else _memo
    precision = memo.get(bits)
    if precision is None:
        widest = max(p.bits for p in profile.precisions)
        if bits > widest:
            if layer.op is not OpType.OTHER:
                raise UnsupportedOnDevice(
                    f"layer {layer.name!r} needs {bits}-bit kernels; {profile.name!r} has only "
                    f"{[p.value for p in profile.precisions]}: quantize it to run there")
            # Elementwise and pooling layers work on whatever their producer emits,
            # which on this device is at most its widest precision.
            precision = profile.kernel_precision(widest)
        else:
            precision = memo[bits] = profile.kernel_precision(bits)
    macs = float(layer.macs)
    if layer.sparsity_pattern is not None and layer.sparsity_pattern in profile.sparsity_patterns:
        kept, group = parse_sparsity_pattern(layer.sparsity_pattern)
        macs *= kept / group
    return precision, macs


def predict_model(
    model: torch.nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    profile: HardwareProfile | str | os.PathLike[str],
    *,
    power_mode: str | None = None,
) -> Prediction:
    """``predict(layer_costs(model, example_input), profile, power_mode=power_mode)``."""
    return predict(layer_costs(model, example_input), profile, power_mode=power_mode)
