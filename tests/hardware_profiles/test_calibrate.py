"""calibrate(), its fit statistics and the calibrated profile as a file."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import yaml

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles import (
    FitReport,
    LayerCost,
    calibrate,
    fit_report,
    kendall_tau,
    layer_costs,
    load_profile,
    predict,
    share_within,
)


def _layer(rng: random.Random, index: int, ops=("conv", "linear", "other")) -> LayerCost:
    op = rng.choice(ops)
    nbytes = rng.randint(10**3, 10**7)
    work = rng.randint(10**4, 10**8)
    macs, simple = (work, 0) if op in ("conv", "conv1x1", "linear") else (0, 2 * work)
    return LayerCost(name=f"l{index}", op=op, macs=macs, params=1, weight_bits=32,
                     act_bits=32, weight_bytes=nbytes // 2, act_bytes=nbytes - nbytes // 2, ops=simple)


def _truth(**overheads):
    pi = load_profile("raspberry-pi-4")
    sources = {**pi.sources, "call_overhead_us": "synthetic truth for a test, not a device figure"}
    sources.update({f"op_overhead_us.{op}": "synthetic truth for a test" for op in overheads})
    return dataclasses.replace(
        pi, efficiency={"conv": 0.6, "linear": 0.15, "other": 0.05}, memory_bandwidth_gbps=3.0,
        layer_overhead_us=25.0, call_overhead_us=80.0, op_overhead_us=overheads, sources=sources)


def _samples(truth, n=60, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        layers = [_layer(rng, j) for j in range(rng.randint(2, 12))]
        out.append((layers, None, predict(layers, truth).latency_ms))
    return out


def test_calibrate_recovers_known_efficiency_factors():
    truth = _truth()
    fitted = calibrate("raspberry-pi-4", _samples(truth), date="2025-01-02")
    for op, value in truth.efficiency.items():
        assert fitted.efficiency[op] == pytest.approx(value, rel=1e-6)
    assert fitted.memory_bandwidth_gbps == pytest.approx(3.0, rel=1e-6)
    for op in ("conv", "linear", "other"):  # per-type overheads by default
        assert fitted.op_overhead_us[op] == pytest.approx(25.0, rel=1e-6)
    assert fitted.call_overhead_us == pytest.approx(80.0, rel=1e-6)
    held_out = fit_report(fitted, _samples(truth, n=20, seed=1))
    assert held_out.kendall_tau == pytest.approx(1.0)
    assert held_out.within_10 == 1.0


def test_calibrate_recovers_per_type_overheads_and_finer_op_types():
    base = _truth(conv1x1=5.0, elementwise=1.0, pool=40.0)
    truth = dataclasses.replace(
        base, efficiency={"conv": 0.6, "conv1x1": 0.3, "linear": 0.15, "other": 0.05, "elementwise": 0.02,
                          "pool": 0.1},
        sources={**base.sources, **{f"efficiency.{op}": "synthetic truth" for op in ("conv1x1", "elementwise", "pool")}})
    ops = ("conv", "conv1x1", "linear", "other", "elementwise", "pool")
    rng = random.Random(5)
    samples = []
    for _ in range(80):
        layers = [_layer(rng, j, ops) for j in range(rng.randint(3, 14))]
        samples.append((layers, None, predict(layers, truth).latency_ms))
    fitted = calibrate("raspberry-pi-4", samples)
    for op, value in truth.efficiency.items():
        assert fitted.efficiency[op] == pytest.approx(value, rel=1e-6)
    for op in ("conv1x1", "elementwise", "pool"):
        assert fitted.op_overhead(op) == pytest.approx(truth.op_overhead(op), rel=1e-4, abs=1e-6)
    assert fitted.op_overhead("conv") == pytest.approx(25.0, rel=1e-6)


def test_a_shared_layer_overhead_is_fitted_on_request():
    fitted = calibrate("raspberry-pi-4", _samples(_truth()),
                       fit=("conv", "linear", "other", "memory", "layer_overhead", "call_overhead"))
    assert fitted.layer_overhead_us == pytest.approx(25.0, rel=1e-6)
    assert fitted.op_overhead_us == {}
    with pytest.raises(ConfigError, match="'op_overhead' or 'layer_overhead', not both"):
        calibrate("raspberry-pi-4", _samples(_truth()), fit=("op_overhead", "layer_overhead"))


def test_a_device_faster_than_its_peak_gets_an_efficiency_above_one_and_says_why():
    truth = dataclasses.replace(_truth(), efficiency={"conv": 2.0, "linear": 0.15, "other": 0.05})
    fitted = calibrate("raspberry-pi-4", _samples(truth))
    assert fitted.efficiency["conv"] == pytest.approx(2.0, rel=1e-6)
    assert "faster than peak_gops" in fitted.sources["efficiency.conv"]


def test_calibrated_numbers_say_so_and_others_keep_their_sources():
    pi = load_profile("raspberry-pi-4")
    fitted = calibrate(pi, _samples(_truth()), date="2025-01-02")
    for path in ("efficiency.conv", "efficiency.linear", "efficiency.other", "memory_bandwidth_gbps",
                 "op_overhead_us.conv", "op_overhead_us.linear", "op_overhead_us.other", "call_overhead_us"):
        assert fitted.sources[path].startswith("calibrated on 60 samples, 2025-01-02, fit by slimsearch calibrate")
    assert fitted.sources["peak_gops.fp32"] == pi.sources["peak_gops.fp32"]
    assert set(fitted.sources) == set(fitted.numeric_fields())


def test_only_named_parameters_move_and_unused_op_types_keep_their_value():
    truth = _truth()
    convs_only = [([l for l in layers if l.op.value == "conv"] or layers[:1], None, ms)
                  for layers, _, ms in _samples(truth)]
    pi = load_profile("raspberry-pi-4")
    fitted = calibrate(pi, convs_only, fit=("conv",))
    assert fitted.memory_bandwidth_gbps == pi.memory_bandwidth_gbps
    assert fitted.layer_overhead_us == pi.layer_overhead_us and fitted.op_overhead_us == {}
    assert fitted.call_overhead_us is None
    assert fitted.sources["layer_overhead_us"] == pi.sources["layer_overhead_us"]


def test_calibrate_accepts_models(make_cnn):
    import torch

    truth = _truth()
    x = torch.randn(1, 3, 32, 32)
    samples = [(make_cnn(w), x, predict(layer_costs(make_cnn(w), x), truth).latency_ms) for w in (8, 16, 24, 32, 48)]
    fitted = calibrate("raspberry-pi-4", samples)
    assert fit_report(fitted, samples).median_abs_rel_error < 0.05


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_calibrated_profile_round_trips_through_a_file(tmp_path, suffix):
    fitted = calibrate("eyeriss", [([LayerCost("c", "conv", 10**6 * k, 10, 16, 16, 20, 2000 * k)], None, 0.1 * k)
                                   for k in range(1, 6)], name="eyeriss-calibrated")
    path = tmp_path / f"calibrated{suffix}"
    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    path.write_text(dump(fitted.to_dict()))
    assert load_profile(path) == fitted
    assert load_profile(str(path)).name == "eyeriss-calibrated"


def test_bad_samples_are_config_errors():
    with pytest.raises(ConfigError, match="at least two samples"):
        calibrate("raspberry-pi-4", _samples(_truth(), n=1))
    layers = _samples(_truth(), n=2)[0][0]
    with pytest.raises(ConfigError, match=r"samples\[1\]: measured_latency_ms must be a number > 0"):
        calibrate("raspberry-pi-4", [(layers, None, 1.0), (layers, None, -2.0)])
    with pytest.raises(ConfigError, match="fit must name some of"):
        calibrate("raspberry-pi-4", _samples(_truth()), fit=("bandwidth",))


def test_kendall_tau_matches_the_pairwise_definition_with_ties():
    rng = random.Random(3)
    a = [rng.choice(range(8)) for _ in range(60)]
    b = [x + rng.choice(range(5)) for x in a]
    concordant = discordant = tie_a = tie_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                tie_a += 1
            elif db == 0:
                tie_b += 1
            elif da * db > 0:
                concordant += 1
            else:
                discordant += 1
    expected = (concordant - discordant) / ((concordant + discordant + tie_a) * (concordant + discordant + tie_b)) ** 0.5
    assert kendall_tau(a, b) == pytest.approx(expected)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_share_within_counts_the_tolerance_inclusively():
    assert share_within([1.1, 0.9, 1.25, 1.0], [1.0, 1.0, 1.0, 1.0], 0.10) == 0.75
    assert isinstance(fit_report("raspberry-pi-4", _samples(_truth(), n=3)), FitReport)
