"""Weight and activation quantization: integer grids, calibration and freezing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimsearch.evaluators.quantize import (
    QConv2d,
    QLinear,
    calibrate,
    fake_quant_weight,
    freeze,
    quant_layers,
    quantize_layers,
    quantize_weight_int,
)
from slimsearch.spaces import CompressionPlan, LayerPlan

BITS = [2, 3, 4, 5, 6, 7, 8]


def _distinct_per_channel(weight: torch.Tensor) -> list[int]:
    return [int(torch.unique(row).numel()) for row in weight.detach().flatten(1)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(6, 600), (5, 8, 9, 9)], ids=["linear", "conv"])
def test_fake_quantized_weights_take_at_most_2_pow_bits_values_per_channel(bits, shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(bits))
    assert min(_distinct_per_channel(weight)) > 2**8  # unquantized, every channel has many more values
    quantized = fake_quant_weight(weight, bits)
    counts = _distinct_per_channel(quantized)
    assert max(counts) <= 2**bits
    # symmetric grid: codes in [-(2**(bits-1) - 1), 2**(bits-1) - 1], the largest |w| of a channel kept exactly
    codes, scale = quantize_weight_int(weight, bits)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int32
    assert int(codes.abs().max()) == qmax
    assert torch.equal(codes.flatten(1).abs().amax(1), torch.full((shape[0],), qmax, dtype=torch.int32))
    assert torch.allclose(quantized, codes.float() * scale.reshape(-1, *[1] * (len(shape) - 1)))
    assert torch.allclose(quantized.flatten(1).abs().amax(1), weight.flatten(1).abs().amax(1))
    # rounding to the nearest grid point: never more than half a step away
    step = scale.reshape(-1, *[1] * (len(shape) - 1))
    assert bool(((quantized - weight).abs() <= step / 2 + 1e-6).all())


def test_fewer_bits_give_a_coarser_grid():
    weight = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
    errors = [float((fake_quant_weight(weight, b) - weight).abs().mean()) for b in BITS]
    assert errors == sorted(errors, reverse=True)
    assert max(_distinct_per_channel(fake_quant_weight(weight, 8))) > 2**4


def test_gradient_passes_the_rounding_straight_through():
    weight = torch.randn(3, 10, requires_grad=True)
    (fake_quant_weight(weight, 3) * 2.0).sum().backward()
    assert torch.equal(weight.grad, torch.full((3, 10), 2.0))


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(),
                         nn.Linear(8, 3)).eval()


def test_quantize_layers_swaps_only_the_layers_the_plan_quantizes():
    plan = CompressionPlan(layers={"0": LayerPlan(weight_bits=3, act_bits=8), "3": LayerPlan(weight_bits=8)})
    model = quantize_layers(_model(), plan)
    assert type(model[0]) is QConv2d and (model[0].weight_bits, model[0].act_bits) == (3, 8)
    assert type(model[3]) is QLinear and (model[3].weight_bits, model[3].act_bits) == (8, 32)
    assert type(model[5]) is nn.Linear  # not named by the plan: left in float
    assert quant_layers(model) == [model[0], model[3]]
    # the float weights were carried over
    assert torch.equal(model[0].weight, _model()[0].weight)


def test_calibration_fixes_the_activation_range_seen():
    plan = CompressionPlan(layers={"0": LayerPlan(weight_bits=4, act_bits=8)})
    model = quantize_layers(_model(), plan)
    x = torch.linspace(-1.0, 3.0, 2 * 2 * 6 * 6).reshape(2, 2, 6, 6)
    calibrate(model, [x[:1], x[1:]])
    assert float(model[0].act_scale) == pytest.approx(4.0 / 255)
    assert int(model[0].act_zero_point) == round(1.0 / (4.0 / 255))
    # inputs beyond the calibrated range are clipped to it; a float conv would scale with them
    conv = model[0]
    assert torch.equal(conv(torch.full((1, 2, 6, 6), 50.0)), conv(torch.full((1, 2, 6, 6), 100.0)))
    float_conv = _model()[0]
    assert not torch.allclose(float_conv(torch.full((1, 2, 6, 6), 50.0)), float_conv(torch.full((1, 2, 6, 6), 100.0)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_frozen_weights_lie_on_their_grid(bits):
    plan = CompressionPlan(layers={"0": LayerPlan(weight_bits=bits), "3": LayerPlan(weight_bits=bits, act_bits=8)})
    model = quantize_layers(_model(), plan)
    calibrate(model, [torch.randn(8, 2, 6, 6)])
    x = torch.randn(5, 2, 6, 6)
    before = model(x)
    frozen = freeze(model)
    assert not frozen.training
    for layer in (frozen[0], frozen[3]):
        assert max(_distinct_per_channel(layer.weight)) <= 2**bits
        codes, scale = quantize_weight_int(layer.weight.detach(), bits)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        assert torch.allclose(layer.weight, codes.float() * scale.reshape(shape))
    # freezing bakes in what the fake quantization already did: same outputs
    assert torch.allclose(frozen(x), before, atol=1e-6)
    weights = copy.deepcopy(frozen.state_dict())
    freeze(frozen)  # a second freeze changes nothing
    assert all(torch.equal(weights[k], v) for k, v in frozen.state_dict().items())
