"""Quantized layers: weight and activation fake quantization, trained through (QAT).

Activations: asymmetric per-tensor 8-bit (or 16-bit) on each layer's input, with the
range calibrated on training batches (min-max, a percentile, or the MSE-optimal
clipping) and then fixed. Gradients pass the rounding with a straight-through
estimator. :func:`freeze` writes the quantized weights back, so the module that runs,
is measured and is exported holds weights that lie exactly on their integer grid,
and records the scales it used so the weights can be packed and rebuilt bit-exactly.
Sparsity masks are re-applied in every forward pass and at :func:`freeze`.
"""

from __future__ import annotations

from enum import Enum
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.compress.quant.grid import QuantizedWeight, effective_group_size, fake_quant_weight, num_groups, quantize_weight
from slimsearch.compress.quant.sparsity import NM_PATTERN, sparsity_mask
from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import FULL_PRECISION

PERCENTILE = 99.99
HISTOGRAM_BINS = 16384
MSE_GRID = 100


class CalibrationMethod(str, Enum):
    """How the clipping range of a layer's input activations is chosen."""

    MINMAX = "minmax"  # the whole observed range
    PERCENTILE = "percentile"  # the 0.01th..99.99th percentile of the values seen
    MSE = "mse"  # the range, shrunk on a grid, that minimises the quantization MSE

    @classmethod
    def parse(cls, value: "str | CalibrationMethod") -> "CalibrationMethod":
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"calibration method must be one of {[m.value for m in cls]}, got {value!r}") from None



EXPORT_DOMAIN = "slimsearch"
U16_EXPORT_OP = "FakeQuantizeU16"


def _act_qmax(bits: int) -> int:
    return 2**bits - 1


class _FakeQuantizeU16(torch.autograd.Function):
    """16-bit activation fake quantization, as used only while exporting to ONNX.

    The TorchScript exporter refuses QDQ ranges other than 8-bit, so this exports as a
    placeholder node that :func:`slimsearch.deploy.onnx_graph.onnx_bytes` rewrites
    into opset-21 uint16 QuantizeLinear/DequantizeLinear.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, _act_qmax(16))

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        out = g.op(f"{EXPORT_DOMAIN}::{U16_EXPORT_OP}", x, scale, zero_point)
        out.setType(x.type())
        return out


class _QuantMixin:
    """Adds weight and input-activation fake quantization and a sparsity mask to Conv2d / Linear.

    Attributes read by other parts of slimsearch: ``weight_bits``, ``act_bits``,
    ``group_size``, ``symmetric``, ``sparsity`` and ``sparsity_pattern`` (``"2:4"`` or
    None; hardware profiles accelerate only named patterns).
    """

    weight_bits: int
    act_bits: int

    def _setup(
        self,
        weight_bits: int,
        act_bits: int,
        *,
        group_size: int = 0,
        symmetric: bool = True,
        sparsity: float = 0.0,
        sparsity_pattern: Optional[str] = None,
    ) -> None:
        """Set bit-widths and grids, and fix the sparsity mask from the current weights."""
        self.weight_bits = int(weight_bits)
        self.act_bits = int(act_bits)
        row = self.weight[0].numel()
        self.group_size = effective_group_size(row, int(group_size)) if self.weight_bits < FULL_PRECISION else 0
        self.symmetric = bool(symmetric)
        self.sparsity = 0.0
        self.sparsity_pattern = None
        self.frozen = False
        self.calibrating = False
        self._histogram: Optional[torch.Tensor] = None
        at = self.weight.device  # the buffers live beside the weight
        self.register_buffer("act_min", torch.tensor(float("inf"), device=at), persistent=False)
        self.register_buffer("act_max", torch.tensor(float("-inf"), device=at), persistent=False)
        self.register_buffer("act_scale", torch.tensor(1.0, device=at))
        self.register_buffer("act_zero_point", torch.tensor(0, dtype=torch.int32, device=at))
        if self.weight_bits < FULL_PRECISION:
            shape = (self.weight.shape[0], num_groups(row, self.group_size))
            self.register_buffer("weight_scale", torch.ones(shape, device=at))
            self.register_buffer("weight_zero_point", torch.zeros(shape, dtype=torch.int32, device=at))
            if self.group_size:
                self.register_buffer("weight_scale_step", torch.tensor(1.0, device=at))
        if sparsity > 0:
            self.set_sparsity(sparsity, sparsity_pattern)

    def set_sparsity(self, sparsity: float, pattern: Optional[str] = None) -> None:
        """Fix the sparsity mask from the current weights (``pattern`` ``"2:4"``, else unstructured)."""
        self.sparsity = float(sparsity)
        self.sparsity_pattern = NM_PATTERN if (pattern == NM_PATTERN and self.sparsity > 0) else None
        if self.sparsity > 0:
            self.register_buffer("weight_mask", sparsity_mask(self.weight, self.sparsity, self.sparsity_pattern))

    @property
    def mask(self) -> Optional[torch.Tensor]:
        return getattr(self, "weight_mask", None)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits >= FULL_PRECISION:
            return x
        if self.calibrating:
            self._observe(x.detach())
            return x
        if self.act_bits == 16 and torch.onnx.is_in_onnx_export():
            return _FakeQuantizeU16.apply(x, self.act_scale, self.act_zero_point)
        return torch.fake_quantize_per_tensor_affine(x, self.act_scale, self.act_zero_point, 0,
                                                     _act_qmax(self.act_bits))

    def _observe(self, x: torch.Tensor) -> None:
        if self._histogram is None:
            self.act_min = torch.minimum(self.act_min, x.min())
            self.act_max = torch.maximum(self.act_max, x.max())
        else:
            lo, hi = float(self.act_min), float(self.act_max)
            self._histogram += torch.histc(x.float(), HISTOGRAM_BINS, lo, max(hi, lo + 1e-8))

    def finish_calibration(self, method: "str | CalibrationMethod" = CalibrationMethod.MINMAX) -> None:
        """Turn the observed inputs into a fixed scale and zero point."""
        method = CalibrationMethod.parse(method)
        self.calibrating = False
        histogram, self._histogram = self._histogram, None
        if self.act_bits >= FULL_PRECISION:
            return
        histogram = histogram.cpu() if histogram is not None else None  # 2048 bins, read on the CPU
        qmax = _act_qmax(self.act_bits)
        lo, hi = min(float(self.act_min), 0.0), max(float(self.act_max), 0.0)
        if method is not CalibrationMethod.MINMAX and histogram is not None and histogram.sum() > 0:
            edges = torch.linspace(float(self.act_min), max(float(self.act_max), float(self.act_min) + 1e-8),
                                   HISTOGRAM_BINS + 1, dtype=torch.float64)
            if method is CalibrationMethod.PERCENTILE:
                lo, hi = _percentile_range(histogram, edges)
            else:
                lo, hi = _mse_range(histogram, edges, lo, hi, qmax)
        hi = max(hi, lo + 1e-8)
        scale = (hi - lo) / qmax
        at = self.act_scale.device
        self.act_scale = torch.tensor(scale, device=at)
        self.act_zero_point = torch.tensor(int(round(-lo / scale)), dtype=torch.int32, device=at).clamp(0, qmax)

    def _weight(self) -> torch.Tensor:
        weight = self.weight
        if self.frozen:
            return weight
        if self.mask is not None:
            weight = weight * self.mask
        if self.weight_bits < FULL_PRECISION:
            weight = fake_quant_weight(weight, self.weight_bits, group_size=self.group_size, symmetric=self.symmetric)
        return weight

    def quantized_weight(self) -> QuantizedWeight:
        """The weight as codes: on the grid recorded at :meth:`freeze`, or fitted now if not frozen."""
        if self.weight_bits >= FULL_PRECISION:
            raise ValueError("a float layer has no integer codes")
        if self.frozen:
            return quantize_weight(self.weight, self.weight_bits, group_size=self.group_size,
                                   symmetric=self.symmetric, scale=self.weight_scale,
                                   zero_point=self.weight_zero_point,
                                   scale_step=getattr(self, "weight_scale_step", None))
        weight = self.weight if self.mask is None else self.weight * self.mask
        return quantize_weight(weight, self.weight_bits, group_size=self.group_size, symmetric=self.symmetric)

    def freeze(self) -> None:
        """Write the masked, quantized weights into ``weight`` and stop re-quantizing them.

        The grid used is kept in ``weight_scale``/``weight_zero_point`` (and
        ``weight_scale_step``), and the mask shrinks to the weights left nonzero.
        """
        if self.frozen:
            return
        with torch.no_grad():
            if self.weight_bits < FULL_PRECISION:
                qw = self.quantized_weight()
                self.weight_scale.copy_(qw.scale)
                self.weight_zero_point.copy_(qw.zero_point)
                if qw.scale_step is not None:
                    self.weight_scale_step.copy_(qw.scale_step)
                self.weight.copy_(qw.dequantize())
            elif self.mask is not None:
                self.weight.mul_(self.mask)
            if self.mask is not None:
                self.weight_mask.copy_(self.weight != 0)
        self.frozen = True


def _percentile_range(histogram: torch.Tensor, edges: torch.Tensor) -> tuple[float, float]:
    """The ``100 - PERCENTILE``th and ``PERCENTILE``th percentiles, widened to include 0."""
    cum = torch.cumsum(histogram.double(), 0) / histogram.sum()
    tail = 1.0 - PERCENTILE / 100.0
    lo_bin = int(torch.searchsorted(cum, torch.tensor(tail, dtype=torch.float64)))
    hi_bin = int(torch.searchsorted(cum, torch.tensor(1.0 - tail, dtype=torch.float64)))
    lo = float(edges[min(lo_bin, len(edges) - 1)])
    hi = float(edges[min(hi_bin + 1, len(edges) - 1)])
    return min(lo, 0.0), max(hi, 0.0)


def _mse_range(histogram: torch.Tensor, edges: torch.Tensor, lo: float, hi: float, qmax: int) -> tuple[float, float]:
    """``[a*lo, a*hi]`` for the ``a`` on a grid in (0, 1] whose quantization MSE over the histogram is least."""
    centers = ((edges[:-1] + edges[1:]) / 2).unsqueeze(0)
    counts = histogram.double().unsqueeze(0)
    alphas = torch.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID, dtype=torch.float64).unsqueeze(1)
    lo_c, hi_c = alphas * lo, torch.maximum(alphas * hi, alphas * lo + 1e-8)
    scale = (hi_c - lo_c) / qmax
    zero = torch.clamp(torch.round(-lo_c / scale), 0, qmax)
    rebuilt = (torch.clamp(torch.round(centers / scale) + zero, 0, qmax) - zero) * scale
    errors = ((rebuilt - centers) ** 2 * counts).sum(1)
    best = int(MSE_GRID - 1 - torch.argmin(errors.flip(0)))  # ties go to the wider range
    return float(lo_c[best]), float(hi_c[best])


class QConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d with quantized (and optionally sparse) weights and quantized inputs."""

    def forward(self, x):
        return self._conv_forward(self._quant_input(x), self._weight(), self.bias)


class QLinear(_QuantMixin, nn.Linear):
    """Linear with quantized (and optionally sparse) weights and quantized inputs."""

    def forward(self, x):
        return F.linear(self._quant_input(x), self._weight(), self.bias)


def build_layer(module: nn.Module) -> "QConv2d | QLinear":
    """An un-set-up quantized twin of a Conv2d/Linear with the same shape, device and dtype (weights not copied)."""
    where = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Conv2d):
        return QConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                       padding=module.padding, dilation=module.dilation, groups=module.groups,
                       bias=module.bias is not None, padding_mode=module.padding_mode, **where)
    return QLinear(module.in_features, module.out_features, bias=module.bias is not None, **where)


def quantized_twin(module: nn.Module, weight_bits: int = FULL_PRECISION, act_bits: int = FULL_PRECISION, *,
                   group_size: int = 0, symmetric: bool = True) -> "QConv2d | QLinear":
    """A quantized twin of a plain Conv2d/Linear holding its weights, set up at these settings."""
    new = build_layer(module)
    new.load_state_dict(module.state_dict())
    new._setup(weight_bits, act_bits, group_size=group_size, symmetric=symmetric)
    return new


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized (or sparse) layer of this module."""
    return isinstance(module, _QuantMixin)


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``root``'s submodule ``name`` (dotted)."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quant_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, _QuantMixin)]


def calibrate_activations(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    method: "str | CalibrationMethod" = CalibrationMethod.MINMAX,
) -> None:
    """Observe the inputs of every quantized layer on ``batches`` and fix its scale.

    ``"minmax"`` takes one pass over the batches; ``"percentile"`` and ``"mse"`` take a
    second one that fills a histogram over the min-max range.
    """
    method = CalibrationMethod.parse(method)
    layers = quant_layers(model)
    if not any(layer.act_bits < FULL_PRECISION for layer in layers):
        return  # no layer quantizes its input: nothing to observe (saves full forward passes)
    batches = list(batches)
    for layer in layers:
        layer.calibrating = True
        layer._histogram = None
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(batch)
        if method is not CalibrationMethod.MINMAX:
            for layer in layers:
                layer._histogram = torch.zeros(HISTOGRAM_BINS, device=layer.weight.device)
            for batch in batches:
                model(batch)
    for layer in layers:
        layer.finish_calibration(method)


def freeze(model: nn.Module) -> nn.Module:
    """Bake quantized weights into every quantized layer; the model is then in eval mode."""
    for layer in quant_layers(model):
        layer.freeze()
    return model.eval()
