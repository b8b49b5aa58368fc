"""The learned correction on top of the roofline: identity where the roofline is exact, a
real gain where it misses a systematic factor, a round trip through the profile file."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import yaml

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles import (
    Correction,
    HardwareProfile,
    LayerCost,
    calibrate,
    fit_report,
    load_profile,
    predict,
)
from slimsearch.hardware_profiles._correction import FEATURES, fit_correction


def _layers(rng: random.Random, ops=("conv", "conv1x1", "linear", "pool", "elementwise")) -> list[LayerCost]:
    out = []
    for index in range(rng.randint(3, 14)):
        op = rng.choice(ops)
        nbytes = rng.randint(10**3, 10**6)
        work = rng.randint(10**5, 10**8)
        macs, simple = (work, 0) if op in ("conv", "conv1x1", "linear") else (0, work // 50)
        out.append(LayerCost(name=f"l{index}", op=op, macs=macs, params=1, weight_bits=32, act_bits=32,
                             weight_bytes=nbytes // 2, act_bytes=nbytes - nbytes // 2, ops=simple))
    return out


def _exact_samples(profile, n, seed=0):
    rng = random.Random(seed)
    return [(layers, None, predict(layers, profile).latency_ms) for layers in (_layers(rng) for _ in range(n))]


def _missed_samples(n, seed):
    """A model of more than 8 layers runs 30% slower (as if it spilled a cache), which no
    per-op-type factor of a roofline can say; pooling also runs 3x slower than the profile says."""
    truth = load_profile("raspberry-pi-4")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        layers = _layers(rng)
        per_layer = predict(layers, truth).per_layer
        slow = sum(p.latency_ms * 2.0 for p, l in zip(per_layer, layers) if l.op.value == "pool")
        out.append((layers, None, predict(layers, truth).latency_ms * (1.0 + 0.3 * (len(layers) > 8)) + slow))
    return out


def test_a_correction_fitted_where_the_roofline_is_exact_is_the_identity():
    pi = load_profile("raspberry-pi-4")
    fitted = calibrate(pi, _exact_samples(pi, 60), correction=True, date="2025-01-02")
    assert fitted.correction is not None and fitted.correction.is_identity
    assert fitted.correction.alpha is None and fitted.correction.samples == 60
    layers = _exact_samples(pi, 1, seed=3)[0][0]
    assert predict(layers, fitted).latency_ms == predict(layers, dataclasses.replace(fitted, correction=None)).latency_ms
    # fitted directly on exact ratios: the same
    rows = [{name: 0.0 for name in FEATURES} for _ in range(40)]
    assert fit_correction(rows, [2.0] * 40, [2.0] * 40, source="test").factor(rows[0]) == 1.0


def test_a_profile_without_a_correction_predicts_the_roofline():
    pi = load_profile("raspberry-pi-4")
    assert pi.correction is None
    layers = _exact_samples(pi, 1)[0][0]
    plain = predict(layers, pi)
    doubled = dataclasses.replace(pi, correction=Correction((), (), (), (), 0.6931471805599453, 0.6931471805599453,
                                                            0.6931471805599453, 1.0, 50, "a test factor of 2"))
    twice = predict(layers, doubled)
    assert twice.latency_ms == pytest.approx(2 * plain.latency_ms)
    assert sum(p.latency_ms for p in twice.per_layer) == pytest.approx(twice.latency_ms)
    assert twice.energy_mj > plain.energy_mj  # static power over the longer time


def test_the_correction_learns_a_systematic_factor_the_roofline_misses():
    train, test = _missed_samples(150, seed=1), _missed_samples(300, seed=2)
    fitted = calibrate("raspberry-pi-4", train)
    roofline = dataclasses.replace(fitted, correction=None)
    assert fitted.correction is not None and not fitted.correction.is_identity
    assert "calibrated on 150 samples" in fitted.correction.source
    before, after = fit_report(roofline, test), fit_report(fitted, test)
    assert after.within_10 > before.within_10 + 0.2
    assert after.kendall_tau > before.kendall_tau
    assert after.median_abs_rel_error < before.median_abs_rel_error / 2


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_profile_with_a_correction_round_trips_through_its_file(tmp_path, suffix):
    fitted = calibrate("raspberry-pi-4", _missed_samples(60, seed=4), name="pi-corrected")
    assert fitted.correction is not None and not fitted.correction.is_identity
    path = tmp_path / f"pi{suffix}"
    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    path.write_text(dump(fitted.to_dict()))
    again = load_profile(path)
    assert again == fitted
    assert again.correction == fitted.correction
    layers = _missed_samples(1, seed=5)[0][0]
    assert predict(layers, again).latency_ms == predict(layers, fitted).latency_ms
    assert HardwareProfile.from_json(fitted.to_json()) == fitted


def test_too_few_samples_and_bad_entries_are_config_errors(tmp_path):
    pi = load_profile("raspberry-pi-4")
    few = _exact_samples(pi, 10)
    assert calibrate(pi, few).correction is None  # by default: only from 30 samples
    with pytest.raises(ConfigError, match="a correction needs at least 30 samples, got 10"):
        calibrate(pi, few, correction=True)
    with pytest.raises(ConfigError, match="correction must be true, false or None"):
        calibrate(pi, few, correction="yes")
    rows = [{name: 0.0 for name in FEATURES}] * 5
    with pytest.raises(ConfigError, match="at least 30 samples"):
        fit_correction(rows, [1.0] * 5, [1.0] * 5, source="test")
    with pytest.raises(ConfigError, match="finite numbers > 0"):
        fit_correction(rows * 8, [1.0] * 40, [0.0] * 40, source="test")
    data = calibrate(pi, _missed_samples(40, seed=6)).to_dict()
    for change, message in (({"features": ["no_such_feature"]}, "correction.features: must be distinct names"),
                            ({"scale": [0.0] * len(data["correction"]["scale"])}, "correction.scale: must be"),
                            ({"coef": [1.0]}, "one entry each per feature"),
                            ({"low": 1.0, "high": 0.0}, "correction.low: must be <= high"),
                            ({"weights": []}, "correction.weights: unknown key")):
        bad = {**data, "correction": {**data["correction"], **change}}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=message) as info:
            load_profile(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
