"""Modelled cost of a decoder LLM's text generation on a profile: decode and prefill apart.

Generating one token at batch 1 reads every weight once and the key/value cache of the
context so far, and does about one multiply-accumulate per weight: on every device in
the catalogue that is far below the compute roof, so decode is **memory-bound**:
``time = max(bytes / bandwidth, MACs / compute)``, and the bytes term wins. Prefill of a
prompt reuses each weight for all its tokens, so it is **compute-bound** at the
precision of the kernels that run it. Both figures are *modelled* (DESIGN.md, "Honesty
rules"); the measured ones come from timing the deployed graph on this machine.

Energy per token follows the per-layer predictor's model (:class:`ModeScale`): the MACs at
their precision's energy (scaled by the power mode's power over its clock) plus the bytes
moved at the profile's energy per byte, plus static power for the decode time, never more
than the mode's full-load power; so a power mode changes both the speed and the energy.
Money per million tokens is the device's hourly price for the decode time. The per-layer
predictor (:func:`~slimsearch.hardware_profiles.predict`) costs CNNs layer by layer; a decoder's
two phases are simpler and are costed here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._enums import Bound, OpType
from slimsearch.hardware_profiles._predict import ModeScale
from slimsearch.hardware_profiles._profile import HardwareProfile

__all__ = ["DecoderFootprint", "DecoderPrediction", "predict_decoder"]


@dataclass(frozen=True)
class DecoderFootprint:
    """What one generated token costs a decoder, independent of the device.

    Attributes:
        weight_bytes: bytes of the weights read per token (packed linears with their
            scales, the output projection, norms); the input embedding reads one row.
        macs: multiply-accumulates per token in the linear layers (output projection
            included), at context 0.
        kv_bytes_per_token: bytes the key/value cache holds per token of context (all layers).
        attention_macs_per_token: MACs per token of context of the attention scores and
            the weighted sum (all layers), so a long context costs more.
        weight_bits: width of the weights' kernels (4, 8, 16 or 32): with ``act_bits``
            it picks the compute precision.
        act_bits: width of the activations the matmuls run at (32 = float).
        sparsity: a structured sparsity pattern of the weights (``"2:4"``) or ``None``;
            it lowers cost only on profiles that accelerate that pattern.
    """

    weight_bytes: int
    macs: int
    kv_bytes_per_token: int
    attention_macs_per_token: int
    weight_bits: int = 32
    act_bits: int = 32
    sparsity: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "macs", "kv_bytes_per_token", "attention_macs_per_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"DecoderFootprint.{name} must be an int >= 0, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecoderPrediction:
    """Modelled figures of one footprint on one profile (all *modelled*)."""

    profile: str
    decode_ms_per_token: float
    decode_tok_s: float
    decode_bound: Bound
    prefill_ms: float
    energy_mj_per_token: float
    usd_per_1m_tokens: Optional[float]  # None: the profile has no price

    def to_dict(self) -> dict:
        data = asdict(self)
        data["decode_bound"] = self.decode_bound.value
        data["provenance"] = "modelled"
        return data


def predict_decoder(profile: HardwareProfile, footprint: DecoderFootprint, *, prompt_tokens: int = 128,
                    context_tokens: int = 128, power_mode: Optional[str] = None) -> DecoderPrediction:
    """Modelled decode (per token, at ``context_tokens`` of context) and prefill (of a
    ``prompt_tokens`` prompt) on ``profile``, batch 1."""
    if prompt_tokens < 1 or context_tokens < 0:
        raise ConfigError(f"prompt_tokens must be >= 1 and context_tokens >= 0, got {prompt_tokens}, "
                          f"{context_tokens}")
    scales = ModeScale.of(profile, profile.power_mode(power_mode))
    clock = scales.clock
    # weight-only kernels de-quantize to the activations' precision and compute there
    precision = profile.kernel_precision(min(max(footprint.weight_bits, footprint.act_bits), 32))
    compute_ops_s = profile.peak_gops[precision] * 1e9 * clock * profile.op_efficiency(OpType.LINEAR, precision)
    accelerated = footprint.sparsity is not None and footprint.sparsity in profile.sparsity_patterns
    dense_share = 0.5 if accelerated and footprint.sparsity == "2:4" else 1.0
    bandwidth = profile.memory_bandwidth_gbps * 1e9

    def phase_s(tokens: int, context: int) -> tuple[float, Bound]:
        macs = tokens * (footprint.macs * dense_share + footprint.attention_macs_per_token * context)
        bytes_read = footprint.weight_bytes * (dense_share if accelerated else 1.0) \
            + footprint.kv_bytes_per_token * (context + tokens)
        compute_s, memory_s = 2 * macs / compute_ops_s, bytes_read / bandwidth
        return max(compute_s, memory_s), (Bound.COMPUTE if compute_s >= memory_s else Bound.MEMORY)

    decode_s, bound = phase_s(1, context_tokens)
    prefill_s, _ = phase_s(prompt_tokens, prompt_tokens // 2)
    macs_token = footprint.macs * dense_share + footprint.attention_macs_per_token * context_tokens
    bytes_token = footprint.weight_bytes + footprint.kv_bytes_per_token * (context_tokens + 1)
    dynamic_j = (macs_token * profile.energy_pj_per_mac[precision] * scales.mac_energy
                 + bytes_token * profile.energy_pj_per_byte) * 1e-12
    price = profile.price_usd_per_hour
    return DecoderPrediction(
        profile=profile.name,
        decode_ms_per_token=decode_s * 1e3,
        decode_tok_s=1.0 / decode_s,
        decode_bound=bound,
        prefill_ms=prefill_s * 1e3,
        energy_mj_per_token=scales.energy_j(dynamic_j, decode_s) * 1e3,
        usd_per_1m_tokens=None if price is None else price / 3600.0 * decode_s * 1e6,
    )
