"""The shipped device catalogue: each profile loads, cites every number, and predicts
sanely next to the others for the same small CNN."""

from __future__ import annotations

import pytest
import torch

from slimsearch.hardware_profiles import (
    DeviceKind,
    LayerCost,
    Precision,
    layer_costs,
    list_profiles,
    load_profile,
    predict,
)

# name: (kind, precisions narrowest first, accelerated sparsity patterns, rented in the cloud)
CATALOGUE = {
    "raspberry-pi-4": (DeviceKind.CPU, ("int8", "fp32"), (), False),
    "raspberry-pi-5": (DeviceKind.CPU, ("int8", "fp16", "fp32"), (), False),
    "pixel-3": (DeviceKind.CPU, ("int8", "fp16", "fp32"), (), False),
    "jetson-orin-nano": (DeviceKind.GPU, ("int8", "fp16", "fp32"), ("2:4",), False),
    "jetson-tx2": (DeviceKind.GPU, ("fp16", "fp32"), (), False),
    "nvidia-t4": (DeviceKind.GPU, ("int8", "fp16", "fp32"), (), True),
    "nvidia-a100": (DeviceKind.GPU, ("int8", "fp16", "fp32"), ("2:4",), True),
    "nvidia-h100": (DeviceKind.GPU, ("int8", "fp16", "fp32"), ("2:4",), True),
    "titan-rtx": (DeviceKind.GPU, ("int8", "fp16", "fp32"), (), False),
    "xeon-gold-6226": (DeviceKind.CPU, ("int8", "fp32"), (), True),
    "xeon-gold-6240": (DeviceKind.CPU, ("int8", "fp32"), (), True),
    "edge-tpu": (DeviceKind.NPU, ("int8",), (), False),
    "zc706-fpga": (DeviceKind.FPGA, ("fp16",), (), False),
    "eyeriss": (DeviceKind.ASIC, ("fp16",), (), False),
}


def _at_bits(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """Mark every module's weights and activations as ``bits`` wide, as a quantized plan would."""
    for module in model.modules():
        module.weight_bits = bits
        module.act_bits = bits
    return model


def _cnn_layers(make_cnn, bits: int, batch: int = 1, size: int = 64):
    return layer_costs(_at_bits(make_cnn(32), bits), torch.randn(batch, 3, size, size))


def test_catalogue_lists_all_fourteen_devices():
    assert len(CATALOGUE) == 14
    assert set(CATALOGUE) <= set(list_profiles())


@pytest.mark.parametrize("name", CATALOGUE)
def test_profile_is_the_documented_device(name):
    kind, precisions, patterns, rented = CATALOGUE[name]
    profile = load_profile(name)
    assert profile.name == name
    assert profile.kind is kind
    assert profile.precisions == tuple(Precision(p) for p in precisions)
    assert profile.sparsity_patterns == patterns
    assert (profile.price_usd_per_hour is not None) == rented
    assert profile.idle_power_w <= profile.active_power_w


@pytest.mark.parametrize("name", CATALOGUE)
def test_every_number_has_a_citation_or_a_reasoned_estimate(name):
    profile = load_profile(name)
    numbers = profile.numeric_fields()
    assert set(profile.sources) == set(numbers)
    for path, citation in profile.sources.items():
        text = " ".join(citation.split())
        assert len(text) >= 30, f"{name}: {path}: citation too thin: {text!r}"
        if text.lower().startswith("estimate"):
            assert text.lower().startswith("estimate:"), f"{name}: {path}: write 'estimate: <reasoning>'"
            assert len(text) >= 50, f"{name}: {path}: an estimate needs its reasoning"
        for marker in ("TODO", "TBD", "FIXME", "???"):
            assert marker not in text, f"{name}: {path}: unfinished citation"


@pytest.mark.parametrize("name", list_profiles())
def test_shipped_efficiencies_are_fractions_of_the_peak(name):
    # above 1 only a calibrated profile may go (its peak was not the kernel's ceiling)
    profile = load_profile(name)
    assert all(0 < value <= 1 for value in profile.efficiency.values())


@pytest.mark.parametrize("name", CATALOGUE)
def test_small_cnn_predictions_stay_inside_each_power_mode(name, make_cnn):
    profile = load_profile(name)
    widest = max(p.bits for p in profile.precisions)
    layers = _cnn_layers(make_cnn, widest)
    reference = profile.default_power_mode
    by_clock = []
    for mode in profile.power_modes:
        prediction = predict(layers, profile, power_mode=mode.name)
        assert prediction.latency_ms > 0
        ceiling = max(profile.active_power_w * mode.power_w / reference.power_w, profile.idle_power_w)
        assert profile.idle_power_w - 1e-9 <= prediction.average_power_w <= ceiling + 1e-9
        assert (prediction.cost_usd_per_1m is None) == (profile.price_usd_per_hour is None)
        by_clock.append((mode.clock_mhz, prediction.latency_ms))
    by_clock.sort()
    for (_, slower), (_, faster) in zip(by_clock, by_clock[1:]):
        assert faster <= slower


@pytest.mark.parametrize("name", [n for n, entry in CATALOGUE.items() if len(entry[1]) > 1])
def test_narrowest_kernel_is_faster_and_cheaper_than_the_widest(name, make_cnn):
    profile = load_profile(name)
    narrow, wide = profile.precisions[0], profile.precisions[-1]
    fast = predict(_cnn_layers(make_cnn, narrow.bits, batch=64), profile)
    slow = predict(_cnn_layers(make_cnn, wide.bits, batch=64), profile)
    assert fast.latency_ms < slow.latency_ms
    assert fast.energy_mj < slow.energy_mj


def test_datacenter_gpus_beat_a_raspberry_pi_4_on_a_batch_64_conv_net(make_cnn):
    layers = _cnn_layers(make_cnn, 32, batch=64)
    latency = {name: predict(layers, name).latency_ms
               for name in ("raspberry-pi-4", "nvidia-t4", "nvidia-a100", "nvidia-h100")}
    assert latency["nvidia-h100"] < latency["nvidia-a100"] < latency["nvidia-t4"]
    assert 10 * latency["nvidia-t4"] < latency["raspberry-pi-4"]


def test_newer_generations_predict_lower_latency(make_cnn):
    fp32, int8 = _cnn_layers(make_cnn, 32, batch=8), _cnn_layers(make_cnn, 8, batch=8)
    pairs = [("raspberry-pi-5", "raspberry-pi-4", fp32), ("jetson-orin-nano", "jetson-tx2", fp32),
             ("nvidia-h100", "nvidia-a100", int8), ("xeon-gold-6240", "xeon-gold-6226", fp32),
             ("raspberry-pi-5", "pixel-3", int8)]
    for newer, older, layers in pairs:
        assert predict(layers, newer).latency_ms < predict(layers, older).latency_ms, (newer, older)


def test_int8_on_the_edge_tpu_is_cheaper_than_fp32_on_a_raspberry_pi_4(make_cnn):
    x = torch.randn(1, 3, 224, 224)
    tpu = predict(layer_costs(_at_bits(make_cnn(32), 8), x), "edge-tpu")
    pi = predict(layer_costs(make_cnn(32), x), "raspberry-pi-4")
    assert tpu.energy_mj < pi.energy_mj / 10
    assert tpu.latency_ms < pi.latency_ms
    assert tpu.average_power_w <= 2.0


def test_devices_without_wide_kernels_refuse_wider_layers(make_cnn):
    from slimsearch.exceptions import UnsupportedOnDevice

    with pytest.raises(UnsupportedOnDevice, match="needs 16-bit kernels; 'edge-tpu' has only"):
        predict(_cnn_layers(make_cnn, 16), "edge-tpu")
    for name in ("edge-tpu", "eyeriss", "zc706-fpga"):
        with pytest.raises(UnsupportedOnDevice, match=f"needs 32-bit kernels; '{name}' has only"):
            predict(_cnn_layers(make_cnn, 32), name)
    # 16-bit fixed-point datapaths: narrower values run at the 16-bit rate
    for name in ("eyeriss", "zc706-fpga"):
        eight, sixteen = (predict(_cnn_layers(make_cnn, b), name) for b in (8, 16))
        assert eight.per_layer[0].latency_ms <= sixteen.per_layer[0].latency_ms
        assert load_profile(name).kernel_precision(8) is Precision.FP16


def test_two_four_sparsity_is_accelerated_on_ampere_and_hopper_only():
    def layer(pattern):
        return LayerCost(name="fc", op="linear", macs=4_000_000_000, params=1000, weight_bits=8,
                         act_bits=8, weight_bytes=1000, act_bytes=1000,
                         sparsity=0.5 if pattern else 0.0, sparsity_pattern=pattern)

    for name, accelerated in (("nvidia-a100", True), ("nvidia-h100", True), ("nvidia-t4", False)):
        dense, sparse = (predict([layer(p)], name).latency_ms for p in (None, "2:4"))
        assert (sparse < dense) == accelerated, name


def test_jetson_tx2_nvpmodel_modes():
    tx2 = load_profile("jetson-tx2")
    assert tx2.default_power_mode.name == "MAXP_CORE_ARM"
    assert {m.name for m in tx2.power_modes} >= {"MAXN", "MAXQ", "MAXP_CORE_ARM"}
    convs = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 3, padding=1))
    layers = layer_costs(_at_bits(convs, 16), torch.randn(4, 3, 64, 64))
    maxn, default, maxq = (predict(layers, tx2, power_mode=m) for m in ("MAXN", None, "MAXQ"))
    assert maxn.latency_ms < default.latency_ms < maxq.latency_ms
    assert maxq.average_power_w <= 7.5


def test_rented_devices_have_ordered_prices_and_owned_devices_none():
    price = {name: load_profile(name).price_usd_per_hour for name in CATALOGUE}
    assert price["nvidia-h100"] > price["nvidia-a100"] > price["nvidia-t4"] > 0
    assert price["xeon-gold-6240"] > price["xeon-gold-6226"] > 0
    for name in ("raspberry-pi-5", "pixel-3", "jetson-tx2", "edge-tpu", "zc706-fpga", "eyeriss"):
        assert price[name] is None
