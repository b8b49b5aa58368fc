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


def _mixed_truth():
    """Int8 convolutions slower than fp32 ones, with a per-image cost (as onnxruntime's loops have)."""
    base = _truth()
    extra = {"efficiency": {"conv@int8": 0.2}, "op_overhead_us": {"conv@int8": 40.0},
             "sample_overhead_us": {"conv@int8": 3.0, "linear": 0.5}}
    sources = {**base.sources, **{f"{field}.{key}": "synthetic truth for a test"
                                  for field, table in extra.items() for key in table}}
    return dataclasses.replace(base, efficiency={**base.efficiency, **extra["efficiency"]},
                               op_overhead_us=extra["op_overhead_us"],
                               sample_overhead_us=extra["sample_overhead_us"], sources=sources)


def _mixed_samples(truth, n=80, seed=7, batches=(1, 16, 64)):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        bits, batch = rng.choice((8, 32)), rng.choice(batches)
        layers = [dataclasses.replace(_layer(rng, j), weight_bits=bits, act_bits=bits, batch=batch)
                  for j in range(rng.randint(2, 12))]
        out.append((layers, None, predict(layers, truth).latency_ms))
    return out


def test_calibrate_fits_an_op_type_per_precision_and_per_sample_overheads():
    truth = _mixed_truth()
    fitted = calibrate("raspberry-pi-4", _mixed_samples(truth), date="2025-01-02")
    # conv runs at two precisions: a key each; linear and other each at their one precision
    assert fitted.efficiency["conv@int8"] == pytest.approx(0.2, rel=1e-4)
    assert fitted.efficiency["conv@fp32"] == pytest.approx(0.6, rel=1e-4)
    assert fitted.op_overhead_us["conv@int8"] == pytest.approx(40.0, rel=1e-4)
    assert fitted.sample_overhead("conv", "int8") == pytest.approx(3.0, rel=1e-4)
    assert fitted.sample_overhead("linear", "int8") == pytest.approx(0.5, rel=1e-4)
    assert fitted.sample_overhead("conv", "fp32") == pytest.approx(0.0, abs=1e-6)
    assert fitted.sources["sample_overhead_us.conv@int8"].startswith("calibrated on 80 samples, 2025-01-02")
    held_out = fit_report(fitted, _mixed_samples(truth, n=20, seed=8))
    assert held_out.within_10 == 1.0


def test_per_sample_overheads_need_more_than_one_batch_size():
    pi = load_profile("raspberry-pi-4")
    fitted = calibrate(pi, _mixed_samples(_mixed_truth(), batches=(1,)))
    assert fitted.sample_overhead_us == pi.sample_overhead_us == {}  # kept: it cannot be told from op_overhead


def test_robust_calibration_follows_the_bulk_of_the_samples_not_the_outliers():
    truth = _truth()
    samples = _samples(truth, n=80, seed=11)
    # every tenth measurement ran at a throttled clock: 60% slower
    slowed = [(layers, x, ms * (1.6 if k % 10 == 0 else 1.0)) for k, (layers, x, ms) in enumerate(samples)]
    # the roofline's own fit (a learned correction would also take out the squared fit's bias)
    robust = fit_report(calibrate("raspberry-pi-4", slowed, correction=False), samples)
    squared = fit_report(calibrate("raspberry-pi-4", slowed, robust=False, correction=False), samples)
    # scored on the clean latencies of every model, the outliers' included
    assert robust.within_10 == 1.0
    assert robust.median_abs_rel_error < 0.01 < squared.median_abs_rel_error
    with pytest.raises(ConfigError, match="robust must be true or false"):
        calibrate("raspberry-pi-4", samples, robust="yes")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_profile_calibrated_per_precision_round_trips_through_a_file(tmp_path, suffix):
    fitted = calibrate("raspberry-pi-4", _mixed_samples(_mixed_truth(), n=40), name="pi-per-precision")
    path = tmp_path / f"calibrated{suffix}"
    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    path.write_text(dump(fitted.to_dict()))
    assert load_profile(path) == fitted
    bad = {**fitted.to_dict(), "sample_overhead_us": {"conv@int3": 1.0}}
    path.write_text(dump(bad))
    with pytest.raises(ConfigError, match=r"sample_overhead_us\.conv@int3: 'conv@int3' is not allowed"):
        load_profile(path)


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
