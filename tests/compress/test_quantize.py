"""Weight and activation quantization: integer grids, groups, sparsity masks, calibration and freezing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimsearch.compress.quant.grid import code_range, fake_quant_weight, quantize_weight, quantize_weight_int
from slimsearch.compress.quant.layers import QConv2d, QLinear, build_layer, calibrate_activations as calibrate, freeze, quant_layers
from slimsearch.compress.quantize import quantize_layers
from slimsearch.compress.quant.sparsity import from_nm_rows, magnitude_mask, nm_groups, nm_mask, nm_rows
from slimsearch.exceptions import ConfigError
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


# --------------------------------------------------------------------------- per-group and asymmetric grids


def _groups(tensor: torch.Tensor, group_size: int) -> torch.Tensor:
    rows = tensor.detach().flatten(1)
    return rows.reshape(rows.shape[0], -1, group_size)


@pytest.mark.parametrize("bits", BITS + [16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [0, 32], ids=["per-channel", "group32"])
def test_each_group_has_its_own_grid_of_at_most_2_pow_bits_codes(bits, symmetric, group_size):
    weight = torch.randn(6, 8, 4, 4, generator=torch.Generator().manual_seed(bits))  # rows of 128
    qw = quantize_weight(weight, bits, group_size=group_size, symmetric=symmetric)
    lo, hi = code_range(bits, symmetric)
    assert (lo, hi) == ((-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1))
    assert qw.codes.dtype == torch.int32 and qw.codes.shape == weight.shape
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
    groups = 128 // group_size if group_size else 1
    assert qw.scale.shape == qw.zero_point.shape == (6, groups)
    if symmetric:
        assert not qw.zero_point.any()
    rebuilt = qw.dequantize()
    g = group_size or 128
    # one scale per group: every value of a group is (code - zero) * that group's scale
    assert torch.allclose(_groups(rebuilt, g), (_groups(qw.codes, g) - qw.zero_point[..., None]) * qw.scale[..., None])
    assert max(int(torch.unique(row).numel()) for row in _groups(rebuilt, g).flatten(0, 1)) <= 2**bits
    # rounding to the nearest grid point, nothing clipped: never more than half a step away
    step = qw.scale.repeat_interleave(g, dim=1).reshape(weight.shape)
    assert bool(((rebuilt - weight).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all())


def test_per_group_scales_are_8_bit_multiples_of_one_step_and_never_clip():
    weight = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    weight[0, :64] *= 20  # groups of very different size in one tensor
    qw = quantize_weight(weight, 4, group_size=64)
    codes = qw.scale_codes()
    assert int(codes.min()) >= 1 and int(codes.max()) == 255
    assert torch.equal(qw.scale, codes.float() * qw.scale_step)
    # rounded up: every group's largest |w| still fits on its grid
    assert bool((_groups(weight, 64).abs().amax(-1) <= 7 * qw.scale * (1 + 1e-6)).all())


def test_smaller_groups_and_asymmetric_grids_fit_skewed_weights_better():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 512, generator=gen) * torch.logspace(-2, 0, 512)  # magnitude varies along the row
    errors = {g: float((quantize_weight(weight, 4, group_size=g).dequantize() - weight).pow(2).mean())
              for g in (0, 128, 32)}
    assert errors[0] > errors[128] > errors[32]
    positive = torch.rand(8, 512, generator=gen)  # one-sided, like weights after a ReLU-only layer
    sym = float((quantize_weight(positive, 4).dequantize() - positive).pow(2).mean())
    asym = float((quantize_weight(positive, 4, symmetric=False).dequantize() - positive).pow(2).mean())
    assert asym < sym / 3  # 16 levels over [0, max] instead of 8


def test_group_size_that_does_not_divide_the_row_and_zero_stays_exact():
    weight = torch.randn(3, 30, generator=torch.Generator().manual_seed(1)) + 2.0  # all positive
    weight[:, ::7] = 0.0
    qw = quantize_weight(weight, 3, group_size=8, symmetric=False)
    assert qw.scale.shape == (3, 4)  # 8 + 8 + 8 + 6
    rebuilt = qw.dequantize()
    assert bool((rebuilt[:, ::7] == 0).all())  # 0.0 is always a code: pruned weights stay exactly zero
    assert bool(((rebuilt - weight).abs()[:, 24:] <= qw.scale[:, 3:] / 2 + 1e-6).all())
    with pytest.raises(Exception, match="weight bits must be in"):
        quantize_weight(weight, 1)


def test_gradient_passes_per_group_asymmetric_rounding_straight_through():
    weight = torch.randn(3, 40, requires_grad=True)
    (fake_quant_weight(weight, 2, group_size=8, symmetric=False) * 3.0).sum().backward()
    assert torch.equal(weight.grad, torch.full((3, 40), 3.0))


def test_quantize_layers_carries_grid_choices_from_the_plan():
    plan = CompressionPlan(layers={
        "0": LayerPlan(weight_bits=4, act_bits=8, group_size=6, symmetric=False),
        "3": LayerPlan(weight_bits=4, group_size=64),  # covers the whole row: per channel
    })
    model = quantize_layers(_model(), plan)
    assert (model[0].group_size, model[0].symmetric) == (6, False)
    assert model[3].group_size == 0 and model[3].symmetric
    assert model[0].weight_scale.shape == (4, 3) and model[3].weight_scale.shape == (8, 1)


@pytest.mark.parametrize("layer_plan", [
    LayerPlan(weight_bits=3, act_bits=8, group_size=8, symmetric=False),
    LayerPlan(weight_bits=4, group_size=4, sparsity=0.5, sparsity_pattern="2:4"),
    LayerPlan(weight_bits=16, act_bits=8, sparsity=0.3),
], ids=["asym-group", "2:4", "16-bit-sparse"])
def test_freeze_bakes_in_the_grid_and_records_it(layer_plan):
    model = quantize_layers(_model(), CompressionPlan(layers={"0": layer_plan, "3": layer_plan}))
    calibrate(model, [torch.randn(8, 2, 6, 6)])
    x = torch.randn(5, 2, 6, 6)
    before = model(x)
    freeze(model)
    assert torch.allclose(model(x), before, atol=1e-6)
    for layer in (model[0], model[3]):
        qw = layer.quantized_weight()
        # the recorded grid rebuilds the frozen weights bit for bit
        assert torch.equal(qw.dequantize(), layer.weight.detach())
        assert torch.equal(qw.scale, layer.weight_scale)
    state = copy.deepcopy(model.state_dict())
    freeze(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- sparsity


def test_magnitude_mask_zeroes_exactly_the_smallest_share():
    weight = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    mask = magnitude_mask(weight, 0.3)
    assert int((~mask).sum()) == 240
    assert float(weight[~mask].abs().max()) <= float(weight[mask].abs().min())


@pytest.mark.parametrize("shape", [(8, 36), (8, 8, 3, 3), (5, 6, 2, 2)], ids=["linear", "conv", "conv-odd"])
def test_2_4_mask_keeps_the_two_largest_of_every_four_input_weights(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    mask = nm_mask(weight)
    groups = nm_groups(nm_rows(mask.float()))
    full = groups[:, : nm_rows(mask).shape[1] // 4]  # groups of four real weights
    assert torch.equal(full.sum(-1), torch.full(full.shape[:2], 2.0))
    kept = nm_groups(nm_rows(weight.abs() * mask))
    dropped = nm_groups(nm_rows(weight.abs() * ~mask))
    assert bool((kept.amax(-1) >= dropped.amax(-1)).all())
    if len(shape) == 4:  # groups run along the input channels at each kernel position
        assert torch.equal(from_nm_rows(nm_rows(weight), weight.shape), weight)
        assert torch.equal(nm_rows(weight)[:, :4], weight[:, :4, 0, 0])


def _sparse_model(layer_plan: LayerPlan) -> nn.Sequential:
    return quantize_layers(_model(), CompressionPlan(layers={"0": layer_plan, "3": layer_plan}))


def test_sparsity_mask_is_fixed_at_setup_and_holds_through_training_and_freeze():
    model = _sparse_model(LayerPlan(weight_bits=8, act_bits=8, sparsity=0.5, sparsity_pattern="2:4"))
    mask = model[3].weight_mask.clone()
    assert torch.equal(mask, nm_mask(_model()[3].weight))  # from the float weights it started with
    assert (model[3].sparsity_pattern, model[3].sparsity) == ("2:4", 0.5)
    calibrate(model, [torch.randn(8, 2, 6, 6)])
    model.train()
    for _ in range(3):  # plain SGD steps
        model.zero_grad()
        model(torch.randn(16, 2, 6, 6)).pow(2).sum().backward()
        assert not bool(model[3].weight.grad[~mask].any())  # no gradient reaches a pruned weight
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    assert torch.equal(model[3].weight_mask, mask)
    assert bool((model[3]._weight()[~mask] == 0).all())
    freeze(model)
    assert bool((model[3].weight[~mask] == 0).all())
    assert torch.equal(model[3].weight_mask, model[3].weight != 0)


def test_unstructured_sparsity_on_a_float_layer_and_the_reported_pattern():
    from slimsearch.hardware_profiles import layer_costs

    plan = CompressionPlan(layers={"0": LayerPlan(sparsity=0.75),
                                   "3": LayerPlan(weight_bits=8, sparsity=0.5, sparsity_pattern="2:4")})
    model = freeze(quantize_layers(_model(), plan))
    assert type(model[0]) is QConv2d and model[0].weight_bits == 32 and model[0].sparsity_pattern is None
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.75, abs=0.01)
    costs = {c.name: c for c in layer_costs(model, torch.randn(1, 2, 6, 6))}
    assert costs["0"].sparsity_pattern is None and costs["0"].sparsity == pytest.approx(0.75, abs=0.01)
    assert costs["3"].sparsity_pattern == "2:4" and costs["3"].sparsity >= 0.5


def test_2_4_needs_half_of_the_weights():
    with pytest.raises(ConfigError, match=r"sparsity_pattern '2:4' .* got 0.3"):
        _sparse_model(LayerPlan(weight_bits=8, sparsity=0.3, sparsity_pattern="2:4"))


# --------------------------------------------------------------------------- activation calibration


def _outlier_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 2, 6, 6, generator=gen) for _ in range(3)]
    batches[1][0, 0, 0, 0] = 60.0  # one value in 13,824 far outside the rest
    return batches


def _calibrated(method: str, batches: list[torch.Tensor] | None = None) -> nn.Module:
    model = quantize_layers(_model(), CompressionPlan(layers={"0": LayerPlan(weight_bits=8, act_bits=8)}))
    calibrate(model, _outlier_batches() if batches is None else batches, method=method)
    return model


def _act_mse(layer, batches) -> float:
    return float(sum(
        (torch.fake_quantize_per_tensor_affine(b, layer.act_scale, layer.act_zero_point, 0, 255) - b).pow(2).sum()
        for b in batches) / sum(b.numel() for b in batches))


def test_percentile_calibration_clips_a_rare_outlier_that_minmax_keeps():
    batches = _outlier_batches()
    minmax, percentile = _calibrated("minmax")[0], _calibrated("percentile")[0]
    lo = min(float(b.min()) for b in batches)
    assert float(minmax.act_scale) == pytest.approx((60.0 - lo) / 255)
    # the 0.01th..99.99th percentiles of the rest lie near -/+3.9 standard deviations, far inside 60
    assert float(percentile.act_scale) == pytest.approx(8.0 / 255, rel=0.15)
    typical = [torch.where(b.abs() > 10, torch.zeros(()), b) for b in batches]
    assert _act_mse(percentile, typical) < _act_mse(minmax, typical) / 30
    # zero stays exactly representable
    for layer in (minmax, percentile):
        assert float(torch.fake_quantize_per_tensor_affine(torch.zeros(1), layer.act_scale, layer.act_zero_point,
                                                           0, 255)) == 0


def test_mse_calibration_finds_the_clipping_range_with_the_least_error():
    torch.manual_seed(0)
    heavy_tailed = [torch.distributions.StudentT(2.0).sample((64, 2, 6, 6)) for _ in range(3)]
    layers = {m: _calibrated(m, heavy_tailed)[0] for m in ("minmax", "percentile", "mse")}
    errors = {m: _act_mse(layer, heavy_tailed) for m, layer in layers.items()}
    assert float(layers["mse"].act_scale) < float(layers["minmax"].act_scale)  # it clips the tail...
    assert errors["mse"] < errors["minmax"] and errors["mse"] < errors["percentile"]  # ...by the right amount
    # a single far outlier costs more clipped than kept: MSE then keeps the whole range
    outlier = _calibrated("mse")[0]
    assert float(outlier.act_scale) > float(_calibrated("minmax")[0].act_scale) * 0.9


def test_calibration_takes_any_iterable_once_and_refuses_unknown_methods():
    model = quantize_layers(_model(), CompressionPlan(layers={"0": LayerPlan(weight_bits=8, act_bits=8)}))
    calibrate(model, iter(_outlier_batches()), method="percentile")  # an iterator is read once, used twice
    assert float(model[0].act_scale) == pytest.approx(float(_calibrated("percentile")[0].act_scale))
    with pytest.raises(ConfigError, match=r"must be one of \['minmax', 'percentile', 'mse'\], got 'kl'"):
        calibrate(model, _outlier_batches(), method="kl")


def test_16_bit_activations_have_a_finer_grid():
    model = _model()
    layer = build_layer(model[0])
    layer.load_state_dict(model[0].state_dict())
    layer._setup(8, 16)  # plans allow 16-bit activations once ACT_BITS does; the layer already does
    model[0] = layer
    x = _outlier_batches()[0]
    calibrate(model, [x])
    assert float(model[0].act_scale) == pytest.approx((float(x.max()) - float(x.min())) / 65535)
    assert 0 < int(model[0].act_zero_point) < 65535
    eight = _calibrated("minmax", [x])[0]
    assert _act_mse(eight, [x]) > 1000 * float(
        (torch.fake_quantize_per_tensor_affine(x, layer.act_scale, layer.act_zero_point, 0, 65535) - x).pow(2).mean())
