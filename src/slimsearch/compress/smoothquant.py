"""SmoothQuant W8A8 (Xiao et al. 2022, arXiv:2211.10438) for decoder LLMs.

A few input channels of an LLM's linears carry activations 10-100x larger than the
rest, which per-token int8 cannot hold. SmoothQuant moves that range into the weights:
per input channel ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (the weight maximum
over the group's members), ``X / s`` folded into the predecessor (a norm, or a linear
whose output rows are the group's input columns) and ``W diag(s)`` into the members, so
the float model computes the same function. Then weights are int8, symmetric per output
channel, and the input of every decoder linear is fake-quantized to int8 per token,
dynamically (scale ``max|x| / 127``), by forward pre-hooks.

Three steps, so that deploy can take the smoothed float model: :func:`smooth`,
:func:`quantize_weights_int8`, :func:`add_activation_quant`; :func:`smoothquant` runs all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from slimsearch.compress._calibration import (
    Hooks,
    capture_block_inputs,
    check_calibration,
    fold_scales,
    foldable,
    inference,
    run_block,
)
from slimsearch.exceptions import ConfigError
from slimsearch.structures import llm

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimsearch.compress.quant.grid import QuantizedWeight

__all__ = ["SmoothQuantConfig", "W8A8", "add_activation_quant", "quantize_weights_int8", "smooth", "smoothquant"]

ACT_BITS = 8
WEIGHT_BITS = 8


@dataclass(frozen=True)
class SmoothQuantConfig:
    """W8A8 with SmoothQuant's scales.

    Attributes:
        alpha: migration strength in [0, 1]: 0 leaves activations as they are, 1 moves
            their whole range into the weights.
        batch_size: calibration windows per forward pass.
    """

    alpha: float = 0.5
    batch_size: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"SmoothQuantConfig.alpha must be a number in [0, 1], got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"SmoothQuantConfig.batch_size must be an integer >= 1, got {self.batch_size!r}")


class W8A8(NamedTuple):
    """What :func:`smoothquant` made: the int8 weights and the activation hooks."""

    weights: dict[str, "QuantizedWeight"]
    hooks: Hooks


def _activation_max(model: "nn.Module", calib: "torch.Tensor", batch_size: int) -> dict[str, "torch.Tensor"]:
    """First member path of every foldable group -> max |input| per channel over the calibration tokens."""
    import torch

    check_calibration(calib)
    maxima: dict[str, torch.Tensor] = {}
    handles = []
    for index, group, paths in llm.group_linears(model):
        if not foldable(model, group):
            continue

        def grab(_module, args, path=paths[0]):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).to(torch.float32)
            maxima[path] = x if path not in maxima else torch.maximum(maxima[path], x)

        handles.append(llm.get(model, paths[0]).register_forward_pre_hook(grab))
    try:
        with inference(model):
            blocks = llm.blocks(model)
            for args, kwargs in capture_block_inputs(model, calib, batch_size):
                for block in blocks:
                    args, kwargs = run_block(block, args, kwargs)
    finally:
        Hooks(handles).remove()
    return maxima


def smooth(model: "nn.Module", config: SmoothQuantConfig, calib: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """Fold SmoothQuant's per-input-channel scales into every foldable linear group, in place.

    The float model computes the same function. Returns ``"block.group"`` -> its scales.
    """
    import torch

    llm.family_of(model)
    maxima = _activation_max(model, calib, config.batch_size)
    scales_of: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for index, group, paths in llm.group_linears(model):
            if paths[0] not in maxima:
                continue
            w_max = torch.stack([llm.weight_of(llm.get(model, p)).detach().abs().amax(0).to(torch.float32)
                                 for p in paths]).amax(0)
            x_max = maxima[paths[0]].to(w_max.device)
            scales = (x_max.clamp_min(1e-5).pow(config.alpha) / w_max.clamp_min(1e-5).pow(1 - config.alpha))
            scales = scales.clamp_min(1e-5)
            fold_scales(model, index, group, paths, scales)
            scales_of[f"{index}.{group.name}"] = scales
    return scales_of


def quantize_weights_int8(model: "nn.Module") -> dict[str, "QuantizedWeight"]:
    """Every decoder linear's weight to int8, symmetric per output channel, in place."""
    import torch

    from slimsearch.compress.quant.grid import quantize_weight

    out = {}
    with torch.no_grad():
        for path, module in llm.decoder_linears(model).items():
            qw = quantize_weight(llm.weight_of(module), WEIGHT_BITS, group_size=0, symmetric=True)
            llm.set_weight(module, qw.dequantize())
            out[path] = qw
    return out


def fake_quant_per_token(x: "torch.Tensor", bits: int = ACT_BITS) -> "torch.Tensor":
    """``x`` rounded to a symmetric ``bits``-bit grid per token (last dimension), scale ``max|x| / qmax``."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
    return (x / scale).round().clamp(-qmax, qmax) * scale


def add_activation_quant(model: "nn.Module", bits: int = ACT_BITS) -> Hooks:
    """Fake-quantize the input of every decoder linear per token, dynamically; ``.remove()`` undoes it."""
    if bits != ACT_BITS:
        raise ConfigError(f"activation bits must be {ACT_BITS} (W8A8), got {bits!r}")

    def hook(_module, args):
        return (fake_quant_per_token(args[0], bits),) + tuple(args[1:])

    return Hooks([m.register_forward_pre_hook(hook) for m in llm.decoder_linears(model).values()])


def smoothquant(model: "nn.Module", config: SmoothQuantConfig, calib: "torch.Tensor") -> W8A8:
    """Smooth, quantize weights to int8 and add per-token int8 activation fake-quant, in place."""
    smooth(model, config, calib)
    weights = quantize_weights_int8(model)
    return W8A8(weights, add_activation_quant(model))
