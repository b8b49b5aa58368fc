"""predict(): roofline latency, energy, cost and their monotonic behaviour."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles import (
    Bound,
    LayerCost,
    Prediction,
    layer_costs,
    list_profiles,
    load_profile,
    predict,
    predict_model,
)

PROFILES = list_profiles()


def _layer(bits: int = 32, *, macs: int = 200_000_000, nbytes: int = 100_000,
           op: str = "conv", pattern: str | None = None, name: str = "layer") -> LayerCost:
    return LayerCost(name=name, op=op, macs=macs, params=nbytes // 8, weight_bits=bits,
                     act_bits=bits, weight_bytes=nbytes // 2, act_bytes=nbytes // 2,
                     sparsity=0.5 if pattern else 0.0, sparsity_pattern=pattern)


def _widest_bits(profile) -> int:
    return max(p.bits for p in profile.precisions)


def _at_bits(model, bits):
    for module in model.modules():
        module.weight_bits = module.act_bits = bits
    return model


def _mixed_layers(make_cnn, widest: int = 32) -> list[LayerCost]:
    layers = layer_costs(_at_bits(make_cnn(16), widest), torch.randn(1, 3, 64, 64))
    for bits in (b for b in (4, 8, 16, 32) if b <= widest):
        layers.append(_layer(bits, name=f"compute{bits}"))
        layers.append(_layer(bits, macs=1_000, nbytes=50_000_000, op="linear", name=f"memory{bits}"))
    return layers


@pytest.mark.parametrize("name", PROFILES)
def test_doubling_bandwidth_never_makes_a_prediction_slower(name, make_cnn):
    profile = load_profile(name)
    faster = dataclasses.replace(profile, memory_bandwidth_gbps=2 * profile.memory_bandwidth_gbps)
    layers = _mixed_layers(make_cnn, _widest_bits(profile))
    for mode in profile.power_modes:
        slow = predict(layers, profile, power_mode=mode.name)
        fast = predict(layers, faster, power_mode=mode.name)
        assert fast.latency_ms <= slow.latency_ms
        for a, b in zip(fast.per_layer, slow.per_layer):
            assert a.latency_ms <= b.latency_ms
        # a memory-bound layer gets strictly faster
        assert fast.per_layer[-1].latency_ms < slow.per_layer[-1].latency_ms


@pytest.mark.parametrize("name", PROFILES)
def test_four_bit_layer_costs_int8_latency_without_int4_kernels(name):
    profile = load_profile(name)
    assert "int4" not in {p.value for p in profile.precisions}
    int4 = predict([_layer(4)], profile)
    int8 = predict([_layer(8)], profile)
    assert int4.latency_ms == pytest.approx(int8.latency_ms)
    assert int4.per_layer[0].bound is Bound.COMPUTE


def test_precision_without_kernels_costs_the_next_wider_one():
    pi, orin = load_profile("raspberry-pi-4"), load_profile("jetson-orin-nano")
    # no fp16 arithmetic on Cortex-A72: a 16-bit layer runs at fp32 speed
    assert predict([_layer(16)], pi).latency_ms == pytest.approx(predict([_layer(32)], pi).latency_ms)
    # the Orin GPU has fp16 Tensor Cores: faster than fp32, slower than int8
    fp32, fp16, int8 = (predict([_layer(b)], orin).latency_ms for b in (32, 16, 8))
    assert fp32 > fp16 > int8


@pytest.mark.parametrize("name", PROFILES)
def test_pruned_model_predicts_lower_latency_and_energy(name, make_cnn):
    x = torch.randn(1, 3, 96, 96)
    bits = _widest_bits(load_profile(name))
    full = predict_model(_at_bits(make_cnn(32), bits), x, name)
    pruned = predict_model(_at_bits(make_cnn(16), bits), x, name)
    assert pruned.latency_ms < full.latency_ms
    assert pruned.energy_mj < full.energy_mj


def test_lower_clock_power_mode_is_slower_but_draws_less_power(make_cnn):
    layers = layer_costs(make_cnn(64), torch.randn(1, 3, 112, 112))
    fast = predict(layers, "jetson-orin-nano", power_mode="15W")
    slow = predict(layers, "jetson-orin-nano", power_mode="7W")
    assert (fast.power_mode, slow.power_mode) == ("15W", "7W")
    assert slow.latency_ms > fast.latency_ms
    assert slow.average_power_w < fast.average_power_w
    assert slow.average_power_w <= 7.0
    assert predict(layers, "jetson-orin-nano") == fast


def test_structured_sparsity_speeds_compute_only_where_accelerated():
    dense, sparse = _layer(8), _layer(8, pattern="2:4")
    orin = load_profile("jetson-orin-nano")
    assert predict([sparse], orin).latency_ms < predict([dense], orin).latency_ms
    pi = load_profile("raspberry-pi-4")
    assert predict([sparse], pi).latency_ms == predict([dense], pi).latency_ms


def test_latency_is_the_roofline_plus_overhead():
    pi = load_profile("raspberry-pi-4")
    layer = _layer(32)
    compute_s = 2 * layer.macs / (48e9 * 0.35)
    memory_s = layer.total_bytes / 5.5e9
    expected_ms = (max(compute_s, memory_s) + 10e-6) * 1e3
    assert predict([layer], pi).latency_ms == pytest.approx(expected_ms)


def test_cost_is_none_unpriced_and_follows_the_price_otherwise():
    layer = _layer(8)
    pi = load_profile("raspberry-pi-4")
    assert predict([layer], pi).cost_usd_per_1m is None
    priced = dataclasses.replace(
        pi, price_usd_per_hour=3.6, sources={**pi.sources, "price_usd_per_hour": "estimate: test"})
    prediction = predict([layer], priced)
    assert prediction.cost_usd_per_1m == pytest.approx(3.6 / 3600 * prediction.latency_ms / 1e3 * 1e6)


def test_small_cnn_latencies_are_realistic(make_cnn):
    x = torch.randn(1, 3, 224, 224)
    pi = predict_model(make_cnn(32), x, "raspberry-pi-4")
    orin = predict_model(make_cnn(32), x, "jetson-orin-nano")
    assert 1.0 < pi.latency_ms < 500.0
    assert 0.05 < orin.latency_ms < pi.latency_ms
    assert 2.7 <= pi.average_power_w <= 6.4


def test_errors_name_what_is_wrong():
    with pytest.raises(ConfigError, match="must be one of"):
        predict([_layer()], "jetson-orin-nano", power_mode="MAXN")
    with pytest.raises(ConfigError, match="unknown hardware profile"):
        predict([_layer()], "tpu-v9")
    pi = load_profile("raspberry-pi-4")
    int8_only = dataclasses.replace(
        pi, peak_gops={"int8": 96.0}, energy_pj_per_mac={"int8": 175.0},
        sources={k: v for k, v in pi.sources.items() if "fp32" not in k})
    from slimsearch.exceptions import UnsupportedOnDevice

    with pytest.raises(UnsupportedOnDevice, match=r"layer 'wide' needs 32-bit kernels"):
        predict([_layer(32, name="wide")], int8_only)
    # an elementwise layer runs on what its producer emits: the widest kernel there is
    relu = LayerCost(name="relu", op="other", macs=1000, params=0, weight_bits=32, act_bits=32,
                     weight_bytes=0, act_bytes=8000)
    assert predict([relu], int8_only).latency_ms > 0


def test_prediction_round_trips_through_json(make_cnn):
    prediction = predict_model(make_cnn(8), torch.randn(1, 3, 32, 32), "jetson-orin-nano")
    again = Prediction.from_dict(json.loads(json.dumps(prediction.to_dict())))
    assert again == prediction
    assert predict([], "raspberry-pi-4").latency_ms == 0.0


def _simple(op: str, *, ops: int = 0, macs: int = 0, nbytes: int = 1_000, in_channels: int = 0,
            weight_bits: int = 32, act_bits: int = 32, workspace: int = 0) -> LayerCost:
    return LayerCost(name=op, op=op, macs=macs, params=0, weight_bits=weight_bits, act_bits=act_bits,
                     weight_bytes=0, act_bytes=nbytes, ops=ops, in_channels=in_channels,
                     workspace_bytes=workspace)


def test_finer_op_types_fall_back_to_their_base_type():
    pi = load_profile("raspberry-pi-4")
    assert pi.op_efficiency("conv1x1") == pi.efficiency["conv"]
    assert pi.op_efficiency("matmul") == pi.efficiency["linear"]
    assert pi.op_efficiency("pool") == pi.op_efficiency("elementwise") == pi.efficiency["other"]
    assert pi.op_overhead("pool") == pi.layer_overhead_us
    layer = _simple("conv1x1", macs=10**8)
    assert predict([layer], pi).latency_ms == pytest.approx(
        predict([dataclasses.replace(layer, op="conv")], pi).latency_ms)
    own = dataclasses.replace(pi, efficiency={**pi.efficiency, "conv1x1": pi.efficiency["conv"] / 2},
                              op_overhead_us={"conv1x1": 0.0},
                              sources={**pi.sources, "efficiency.conv1x1": "test", "op_overhead_us.conv1x1": "test"})
    compute_ms = 2 * 10**8 / (pi.peak_gops[pi.kernel_precision(32)] * 1e9 * pi.efficiency["conv"]) * 1e3
    assert predict([layer], own).latency_ms == pytest.approx(2 * compute_ms)


def test_pooling_runs_as_a_convolution_only_where_the_device_says_so():
    eyeriss = load_profile("eyeriss")
    assert eyeriss.pool_as_conv
    pool = _simple("pool", ops=16 * 32 * 32 * 9, in_channels=16, weight_bits=16, act_bits=16)
    conv = _simple("conv", macs=16 * 32 * 32 * 9 * 16, weight_bits=16, act_bits=16)
    plain = dataclasses.replace(eyeriss, pool_as_conv=False)
    # the same work as a 3x3 convolution of as many channels in as out, at the pool's efficiency
    ratio = eyeriss.op_efficiency("conv") / eyeriss.op_efficiency("pool")
    pool_ms = predict([pool], eyeriss).latency_ms - eyeriss.layer_overhead_us / 1e3
    conv_ms = predict([conv], eyeriss).latency_ms - eyeriss.layer_overhead_us / 1e3
    assert pool_ms == pytest.approx(conv_ms * ratio)
    assert predict([pool], plain).latency_ms < predict([pool], eyeriss).latency_ms


def test_narrow_weights_run_in_float_where_the_runtime_has_no_kernel_for_them():
    pi = load_profile("raspberry-pi-4")
    w4a8 = _simple("conv", macs=10**9, weight_bits=4, act_bits=8)
    w8a8 = dataclasses.replace(w4a8, weight_bits=8)
    fp32 = dataclasses.replace(w4a8, weight_bits=32, act_bits=32)
    widened = predict([w4a8], pi).latency_ms
    assert widened == pytest.approx(predict([w8a8], pi).latency_ms)  # 4-bit weights on int8 kernels
    floated = dataclasses.replace(pi, float_narrow_weights=True)
    assert predict([w4a8], floated).latency_ms == pytest.approx(predict([fp32], pi).latency_ms)
    assert predict([w8a8], floated).latency_ms == pytest.approx(widened)


def test_without_memory_overlap_compute_and_memory_add_up_with_the_lowered_input():
    pi = load_profile("raspberry-pi-4")
    layer = _simple("conv", macs=10**8, nbytes=10**7, workspace=10**7)
    serial = dataclasses.replace(pi, memory_overlap=False)
    compute = 2 * 10**8 / (pi.peak_gops[pi.kernel_precision(32)] * 1e9 * pi.efficiency["conv"])
    memory = 10**7 / (pi.memory_bandwidth_gbps * 1e9)
    overhead = pi.layer_overhead_us * 1e-6
    assert predict([layer], pi).latency_ms == pytest.approx((max(compute, memory) + overhead) * 1e3)
    assert predict([layer], serial).latency_ms == pytest.approx((compute + 3 * memory + overhead) * 1e3)


def _with(profile, **fields):
    """``profile`` with extra per-op entries, each given a (test) source."""
    sources = dict(profile.sources)
    for field, table in fields.items():
        sources.update({f"{field}.{key}": "test value" for key in table})
    merged = {field: {**(getattr(profile, field) or {}), **table} for field, table in fields.items()}
    return dataclasses.replace(profile, **merged, sources=sources)


def test_an_op_type_can_have_its_own_efficiency_and_overhead_at_one_precision():
    pi = load_profile("raspberry-pi-4")
    own = _with(pi, efficiency={"conv@int8": pi.efficiency["conv"] / 4}, op_overhead_us={"conv@int8": 100.0})
    int8, fp32 = _simple("conv", macs=10**8, weight_bits=8, act_bits=8), _simple("conv", macs=10**8)
    assert predict([fp32], own).latency_ms == pytest.approx(predict([fp32], pi).latency_ms)
    compute_ms = 2 * 10**8 / (pi.peak_gops[pi.kernel_precision(8)] * 1e9 * pi.efficiency["conv"]) * 1e3
    assert predict([int8], own).latency_ms == pytest.approx(4 * compute_ms + 0.1)
    # a finer type at that precision falls back to its base type at the same precision
    assert own.op_efficiency("conv1x1", "int8") == own.efficiency["conv@int8"]
    assert own.op_efficiency("conv1x1", "fp32") == own.efficiency["conv"]


def test_a_per_sample_overhead_grows_with_the_batch_and_only_where_it_is_given():
    pi = load_profile("raspberry-pi-4")
    own = _with(pi, sample_overhead_us={"conv@int8": 2.0})
    int8 = _simple("conv", macs=10**6, weight_bits=8, act_bits=8)
    fp32 = _simple("conv", macs=10**6)
    for layer, per_sample_ms in ((int8, 2e-3), (fp32, 0.0)):
        batch64 = dataclasses.replace(layer, batch=64)
        extra = predict([batch64], own).latency_ms - predict([batch64], pi).latency_ms
        assert extra == pytest.approx(64 * per_sample_ms)


def test_layer_costs_record_the_batch_and_the_output_channels(make_cnn):
    layers = layer_costs(make_cnn(24), torch.randn(5, 3, 32, 32))
    assert {layer.batch for layer in layers} == {5}
    assert [layer.out_channels for layer in layers if layer.op.value == "conv"] == [24, 24, 48]
    assert LayerCost.from_dict(json.loads(json.dumps(layers[0].to_dict()))) == layers[0]


def test_channels_off_the_runtime_block_cost_as_if_rounded_up(make_cnn):
    pi = load_profile("raspberry-pi-4")
    blocked = _with(pi, channel_block={"fp32": 16})
    x = torch.randn(1, 3, 32, 32)
    conv = [layer for layer in layer_costs(make_cnn(24), x) if layer.op.value == "conv"]
    rounded = [layer for layer in layer_costs(make_cnn(32), x) if layer.op.value == "conv"]
    # 3 -> 24: output rounded to 32, input (fewer than a block) read as it is; 24 -> 24: both rounded
    for small, big in zip(conv[:2], rounded[:2]):
        assert predict([small], blocked).latency_ms == pytest.approx(predict([big], pi).latency_ms)
    # 24 -> 48: 48 is a multiple of 16, only the input is rounded: 24 * 48 -> 32 * 48 MACs per position
    assert predict([conv[2]], blocked).per_layer[0].latency_ms > predict([conv[2]], pi).per_layer[0].latency_ms
    int8 = [dataclasses.replace(layer, weight_bits=8, act_bits=8) for layer in conv]
    assert predict(int8, blocked).latency_ms == pytest.approx(predict(int8, pi).latency_ms)  # fp32 only
