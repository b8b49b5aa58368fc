"""Weight and activation quantization, simulated in float and trained through (QAT).

Weights: symmetric, per output channel, ``bits`` in 2..8 or 16 (32 = left in float).
Activations: asymmetric per-tensor 8-bit (or 16-bit) on each layer's input, with the
range calibrated by min-max on training batches and then fixed. Gradients pass the
rounding with a straight-through estimator. :func:`freeze` writes the quantized
weights back, so the module that runs, is measured and is exported holds weights
that lie exactly on their integer grid.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.spaces.plan import FULL_PRECISION, CompressionPlan


def weight_scale(weight: "torch.Tensor", bits: int) -> "torch.Tensor":
    """Per-output-channel symmetric scale: max |w| of the channel over ``2**(bits-1) - 1``."""
    qmax = 2 ** (bits - 1) - 1
    amax = weight.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
    return amax / qmax


def quantize_weight_int(weight: "torch.Tensor", bits: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Integer codes in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` and their per-channel scales."""
    scale = weight_scale(weight, bits)
    qmax = 2 ** (bits - 1) - 1
    shape = (-1,) + (1,) * (weight.dim() - 1)
    codes = torch.clamp(torch.round(weight / scale.reshape(shape)), -qmax, qmax).to(torch.int32)
    return codes, scale


def fake_quant_weight(weight: "torch.Tensor", bits: int) -> "torch.Tensor":
    """``weight`` rounded to its grid in the forward pass, identity in the backward pass."""
    codes, scale = quantize_weight_int(weight, bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    quantized = codes.to(weight.dtype) * scale.reshape(shape)
    return weight + (quantized - weight).detach()


class _QuantMixin:
    """Adds weight and input-activation fake quantization to Conv2d / Linear."""

    weight_bits: int
    act_bits: int

    def _setup(self, weight_bits: int, act_bits: int) -> None:
        self.weight_bits = int(weight_bits)
        self.act_bits = int(act_bits)
        self.frozen = False
        self.calibrating = False
        self.register_buffer("act_min", torch.tensor(float("inf")))
        self.register_buffer("act_max", torch.tensor(float("-inf")))
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.register_buffer("act_zero_point", torch.tensor(0, dtype=torch.int32))

    def _quant_input(self, x: "torch.Tensor") -> "torch.Tensor":
        if self.act_bits >= FULL_PRECISION:
            return x
        if self.calibrating:
            self.act_min = torch.minimum(self.act_min, x.detach().min())
            self.act_max = torch.maximum(self.act_max, x.detach().max())
            return x
        qmax = 2**self.act_bits - 1
        return torch.fake_quantize_per_tensor_affine(x, self.act_scale, self.act_zero_point, 0, qmax)

    def finish_calibration(self) -> None:
        """Turn the observed input range into a fixed scale and zero point."""
        self.calibrating = False
        if self.act_bits >= FULL_PRECISION:
            return
        lo = min(float(self.act_min), 0.0)
        hi = max(float(self.act_max), lo + 1e-8)
        qmax = 2**self.act_bits - 1
        scale = (hi - lo) / qmax
        self.act_scale = torch.tensor(scale)
        self.act_zero_point = torch.tensor(int(round(-lo / scale)), dtype=torch.int32).clamp(0, qmax)

    def _weight(self) -> "torch.Tensor":
        if self.frozen or self.weight_bits >= FULL_PRECISION:
            return self.weight
        return fake_quant_weight(self.weight, self.weight_bits)

    def freeze(self) -> None:
        """Write the quantized weights into ``weight`` and stop re-quantizing them."""
        if self.weight_bits < FULL_PRECISION and not self.frozen:
            with torch.no_grad():
                self.weight.copy_(fake_quant_weight(self.weight, self.weight_bits))
        self.frozen = True


class QConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d with quantized weights and inputs."""

    def forward(self, x):
        return self._conv_forward(self._quant_input(x), self._weight(), self.bias)


class QLinear(_QuantMixin, nn.Linear):
    """Linear with quantized weights and inputs."""

    def forward(self, x):
        return F.linear(self._quant_input(x), self._weight(), self.bias)


def quantize_layers(model: "nn.Module", plan: CompressionPlan) -> "nn.Module":
    """Swap every Conv2d/Linear that the plan gives fewer than 32 bits for its quantized twin (in place)."""
    from slimsearch.evaluators.prune import _replace

    for name, module in list(model.named_modules()):
        if type(module) not in (nn.Conv2d, nn.Linear):
            continue
        lp = plan.layer(name)
        if lp.weight_bits >= FULL_PRECISION and lp.act_bits >= FULL_PRECISION:
            continue
        if isinstance(module, nn.Conv2d):
            new = QConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                        padding=module.padding, dilation=module.dilation, groups=module.groups,
                        bias=module.bias is not None, padding_mode=module.padding_mode)
        else:
            new = QLinear(module.in_features, module.out_features, bias=module.bias is not None)
        new._setup(lp.weight_bits, lp.act_bits)
        new.load_state_dict(module.state_dict(), strict=False)
        _replace(model, name, new)
    return model


def quant_layers(model: "nn.Module") -> list:
    return [m for m in model.modules() if isinstance(m, _QuantMixin)]


def calibrate(model: "nn.Module", batches: Iterable["torch.Tensor"]) -> None:
    """Observe the input range of every quantized layer on ``batches`` and fix its scale."""
    layers = quant_layers(model)
    for layer in layers:
        layer.calibrating = True
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for layer in layers:
        layer.finish_calibration()


def freeze(model: "nn.Module") -> "nn.Module":
    """Bake quantized weights into every quantized layer; the model is then in eval mode."""
    for layer in quant_layers(model):
        layer.freeze()
    return model.eval()
