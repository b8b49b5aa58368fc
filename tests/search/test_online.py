"""search/_online.py: the estimate corrected from measured values during a search."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from slimsearch.exceptions import ConfigError
from slimsearch.search import search
from slimsearch.search._online import OnlineCalibration

SPACE = {"width": [1, 2, 3, 4, 5, 6], "depth": [1, 2, 3, 4], "bits": [4, 8, 16]}
OBJECTIVES = {"accuracy": "max", "latency_ms": "min"}


def true_latency(p: dict) -> float:
    return p["width"] * p["depth"] * p["bits"] / 8.0


def evaluate(p: dict) -> dict:
    accuracy = 1.0 - 1.0 / (p["width"] * p["depth"] + 1) - (0.05 if p["bits"] == 4 else 0.0)
    return {"accuracy": accuracy, "latency_ms": true_latency(p)}


def estimate_quarter(p: dict) -> dict:
    """Ranks candidates exactly, but four times too fast (a faster device's profile)."""
    return {"latency_ms": true_latency(p) / 4.0, "macs": float(p["width"] * p["depth"])}


def test_the_correction_is_the_identity_when_estimates_equal_measurements():
    calibration = OnlineCalibration(refit_every=3)
    for x in (1.0, 2.0, 5.0, 7.0, 11.0, 13.0, 20.0, 31.0, 40.0, 55.0, 70.0, 90.0):
        calibration.add({"latency_ms": x}, {"latency_ms": x})
    assert calibration.fits and all(f.factor == 1.0 for f in calibration.fits)
    for x in (0.5, 3.0, 500.0):
        assert calibration.correct({"latency_ms": x, "macs": 7.0}) == {"latency_ms": x, "macs": 7.0}


def test_a_systematic_factor_is_learned_from_five_pairs():
    calibration = OnlineCalibration()
    for x in (1.0, 3.0, 4.0, 9.0):
        assert calibration.add({"latency_ms": x}, {"latency_ms": 4.5 * x}) == []
    assert calibration.correct({"latency_ms": 2.0}) == {"latency_ms": 2.0}  # too few pairs: as it is
    (fit,) = calibration.add({"latency_ms": 6.0}, {"latency_ms": 4.5 * 6.0})
    assert fit.metric == "latency_ms" and fit.pairs == 5
    assert fit.factor == pytest.approx(4.5)
    assert fit.held_out == 5 and fit.held_out_mdape == pytest.approx(1 - 1 / 4.5)  # the raw estimate was in force
    assert fit.tau == pytest.approx(1.0) and fit.raw_mdape == fit.held_out_mdape
    assert calibration.correct({"latency_ms": 2.0})["latency_ms"] == pytest.approx(9.0)
    for x in (2.0, 5.0, 7.0, 8.0, 10.0):  # the next batch is scored with the correction made from the first
        calibration.add({"latency_ms": x}, {"latency_ms": 4.5 * x})
    assert calibration.fits[-1].held_out_mdape == pytest.approx(0.0, abs=1e-12)
    assert calibration.fits[-1].raw_mdape == pytest.approx(1 - 1 / 4.5)


def test_the_factor_is_the_median_ratio_so_a_few_odd_measurements_do_not_move_it_and_order_is_kept():
    calibration = OnlineCalibration(refit_every=10, min_pairs=10)
    rng = random.Random(0)
    xs = [1.0 + i for i in range(10)]
    for i, x in enumerate(xs):  # a factor of 3 with a little noise, and two measurements far off
        odd = 40.0 if i in (2, 7) else math.exp(rng.gauss(0.0, 0.02))
        calibration.add({"t": x}, {"t": 3.0 * x * odd})
    assert calibration.fits[-1].factor == pytest.approx(3.0, rel=0.03)
    corrected = [calibration.correct({"t": x})["t"] for x in (0.1, 5.0, 1000.0)]
    assert corrected == sorted(corrected)


def test_modelled_values_and_non_positive_ones_teach_nothing():
    calibration = OnlineCalibration(min_pairs=1)
    assert calibration.add({"a": 1.0, "b": 1.0, "c": 0.0}, {"a": 3.0, "b": 3.0, "c": 2.0},
                           provenance={"a": "modelled", "b": "measured"}) != []
    assert set(calibration.log_factors) == {"b"}
    job = OnlineCalibration(min_pairs=1, measured_only=True)
    job.add({"size": 1.0, "t": 1.0}, {"size": 1.0, "t": 2.0}, provenance={"t": "measured"})
    assert set(job.log_factors) == {"t"}
    assert not job.could_learn({"t": 3.0, "accuracy": 0.9}, {"t": "modelled"})
    assert job.could_learn({"t": 3.0}, {"t": "measured"}) and not job.could_learn({"x": 1.0}, {"x": "measured"})


def test_columns_are_corrected_as_single_estimates_are():
    np = pytest.importorskip("numpy")
    calibration = OnlineCalibration(min_pairs=5)
    for x in (1.0, 2.0, 3.0, 4.0, 5.0):
        calibration.add({"t": x}, {"t": 2.0 * x})
    rows = np.array([[1.5, 7.0], [np.nan, 1.0]])
    out = calibration.correct_columns(["t", "macs"], rows)
    assert out[0].tolist() == [pytest.approx(3.0), 7.0] and math.isnan(out[1, 0]) and out[1, 1] == 1.0
    assert rows[0, 0] == 1.5  # a copy


def test_a_refit_during_a_search_never_changes_a_recorded_metric():
    # the result's trials are read back from the study: compare them with what the calls returned
    result = search(SPACE, evaluate, OBJECTIVES, constraints=["latency_ms <= 6"], budget=25, sampler="auto",
                    seed=0, estimate=estimate_quarter)
    assert len(result.calibration) >= 3 and result.calibration[-1].factor == pytest.approx(4.0)
    for t in result.trials:
        assert t.estimate == estimate_quarter(t.params)  # the raw estimate, as estimate returned it
        if t.values:
            assert t.values == evaluate(t.params)


def test_calibration_screens_on_the_corrected_estimate_and_can_be_turned_off():
    kwargs = dict(constraints=["latency_ms <= 6"], budget=25, sampler="random", seed=3, estimate=estimate_quarter)
    on = search(SPACE, evaluate, OBJECTIVES, **kwargs)
    off = search(SPACE, evaluate, OBJECTIVES, calibrate_estimate=False, **kwargs)
    assert off.calibration == () and not any("corrected" in (t.screened or "") for t in off.trials)
    breaking = lambda r: sum(1 for t in r.evaluated if t.values["latency_ms"] > 6)  # noqa: E731
    assert breaking(on) < breaking(off)
    assert any("(corrected from" in (t.screened or "") for t in on.trials)


@pytest.mark.parametrize("kwargs, needle", [
    ({"refit_every": 0}, "refit_every must be an int >= 1, got 0"),
    ({"min_pairs": 2.5}, "min_pairs must be an int >= 1, got 2.5"),
    ({"min_pairs": True}, "min_pairs must be an int >= 1, got True"),
    ({"measured_only": "yes"}, "measured_only must be True or False, got 'yes'"),
    ({"estimate": 3}, "estimate must be a callable"),
])
def test_bad_calibration_arguments_are_refused_in_one_line(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        OnlineCalibration(**kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_search_refuses_a_calibrate_estimate_that_is_not_a_bool():
    with pytest.raises(ConfigError) as info:
        search(SPACE, evaluate, OBJECTIVES, budget=2, estimate=estimate_quarter, calibrate_estimate="yes")
    assert str(info.value) == "calibrate_estimate: must be True or False, got 'yes'"


def test_a_job_without_screening_estimates_each_measured_trial_once_and_reports_each_refit():
    """The job's way: no estimate for the screen, only the calibration's; evaluate's provenance says
    which values were measured (a device node's latency) and which modelled (equal to the estimate)."""
    from slimsearch.search._study import open_study, records
    from slimsearch.search.driver import run_trials
    from slimsearch.search.samplers import make_sampler

    calls = []

    def estimate(p):
        calls.append(dict(p))
        return {"latency_ms@pi": true_latency(p) / 4.0, "energy_mj@pi": true_latency(p)}

    def job_evaluate(p):
        values = {**evaluate(p), "energy_mj@pi": true_latency(p)}
        values["latency_ms@pi"] = values.pop("latency_ms")
        return SimpleNamespace(values=values, provenance={"latency_ms@pi": "measured", "energy_mj@pi": "modelled"})

    objectives = {"accuracy": "max", "latency_ms@pi": "min"}
    calibration = OnlineCalibration(estimate, measured_only=True)
    fits = []
    study = open_study(None, "job", objectives, make_sampler("random", seed=0, budget=12))
    run_trials(study, SPACE, job_evaluate, objectives, n_trials=12, calibration=calibration, on_calibration=fits.append)
    assert len(calls) == 12 and [f.pairs for f in fits] == [5, 10] and fits == calibration.fits
    assert {f.metric for f in fits} == {"latency_ms@pi"} and fits[-1].factor == pytest.approx(4.0)
    for r in records(study):
        assert r.estimate == estimate(r.params) and r.values == job_evaluate(r.params).values



def test_a_continued_search_starts_from_the_calibration_its_stored_trials_give(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    kwargs = dict(sampler="random", seed=0, estimate=estimate_quarter, storage=storage)
    first = search(SPACE, evaluate, OBJECTIVES, budget=10, **kwargs)
    assert [f.pairs for f in first.calibration] == [5, 10]
    seen = []
    more = search(SPACE, lambda p: seen.append(p) or evaluate(p), OBJECTIVES, budget=15, **kwargs)
    assert len(seen) == 5 and [f.pairs for f in more.calibration] == [5, 10, 15]  # read back, then one refit
    assert more.calibration[0].factor == pytest.approx(4.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_keeps_off_candidates_the_corrected_estimate_puts_past_a_constraint(seed):
    """Latency is no objective here, only a constraint: auto sees it through the estimate alone. Once
    the calibration has learned the factor of 4, auto proposes nothing the screen would refuse (uncorrected,
    it proposed 14 to 35 such candidates in 20 evaluations), and only trials asked before the first
    refit can break the constraint."""

    def sized(p):
        return {**evaluate(p), "size": float(p["width"] * p["bits"])}

    result = search(SPACE, sized, {"accuracy": "max", "size": "min"}, constraints=["latency_ms <= 6"], budget=20,
                    sampler="auto", seed=seed, estimate=estimate_quarter)
    assert result.calibration and result.calibration[0].factor == pytest.approx(4.0)
    assert not result.screened
    assert all(t.number < 5 for t in result.evaluated if t.values["latency_ms"] > 6)


def test_auto_on_an_unconstrained_search_proposes_exactly_what_it_proposes_uncalibrated():
    kwargs = dict(budget=25, sampler="auto", seed=2, estimate=estimate_quarter)
    on, off = (search(SPACE, evaluate, OBJECTIVES, calibrate_estimate=c, **kwargs) for c in (True, False))
    assert on.calibration and [t.params for t in on.trials] == [t.params for t in off.trials]
