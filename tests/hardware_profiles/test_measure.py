"""measure_latency, the local timing harness."""

from __future__ import annotations

import json
import statistics
import time
import types

import pytest

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles import Timing, _measure, measure_latency


class FakeClock:
    """A ``perf_counter`` that moves only while the timed function runs, by the next of ``durations_ms``."""

    def __init__(self, durations_ms):
        self.now = 0.0
        self.durations = iter(durations_ms)
        self.calls = 0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept = getattr(self, "slept", 0.0) + seconds

    def work(self) -> None:
        self.calls += 1
        self.now += next(self.durations) / 1e3


@pytest.fixture
def clock(monkeypatch):
    """Install a FakeClock in the harness: ``clock(durations_ms)`` returns it."""
    def install(durations_ms) -> FakeClock:
        fake = FakeClock(durations_ms)
        monkeypatch.setattr(_measure, "time", types.SimpleNamespace(perf_counter=fake.perf_counter, sleep=fake.sleep))
        return fake
    return install


def test_defaults_time_fifteen_calls_after_three_untimed_ones(clock):
    # three slow warmup calls, then 1..15 ms out of order: the warmups must not be in the summary
    timed = [7, 1, 15, 3, 9, 11, 2, 14, 5, 8, 13, 4, 10, 6, 12]
    fake = clock([1000, 1000, 1000, *timed])
    timing = measure_latency(fake.work)
    assert fake.calls == 3 + 15
    assert timing.repeats == 15
    assert timing.median_ms == pytest.approx(8.0)
    assert timing.iqr_ms == pytest.approx(11.5 - 4.5)  # inclusive quartiles of 1..15
    assert timing.cv == pytest.approx(statistics.stdev(range(1, 16)) / 8.0)


def test_sleep_is_timed_in_milliseconds():
    timing = measure_latency(lambda: time.sleep(0.002), warmup=0, repeats=3)
    assert 1.5 < timing.median_ms < 1000  # milliseconds, not seconds or microseconds; no speed asserted


def test_min_time_extends_the_repeats():
    # Two calls that do nothing cannot fill 0.2 s even on a loaded machine, so more are made.
    timing = measure_latency(lambda: None, warmup=0, repeats=2, min_time_s=0.2)
    assert timing.repeats > 2


def test_one_repeat_has_zero_spread():
    timing = measure_latency(lambda: None, warmup=0, repeats=1)
    assert (timing.iqr_ms, timing.cv, timing.repeats) == (0.0, 0.0, 1)


def test_min_time_counts_from_the_first_timed_call(clock):
    # two 1 s warmups must not fill min_time_s: four timed calls of 1/64 s are needed to reach 1/16 s
    # (binary fractions, so the fake clock's sums are exact)
    fake = clock([1000, 1000] + [15.625] * 20)
    timing = measure_latency(fake.work, warmup=2, repeats=2, min_time_s=0.0625)
    assert (fake.calls, timing.repeats) == (2 + 4, 4)
    assert (timing.median_ms, timing.iqr_ms, timing.cv) == (15.625, 0.0, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"warmup": -1}, "warmup"), ({"repeats": 0}, "repeats"), ({"min_time_s": -0.1}, "min_time_s")],
)
def test_bad_arguments_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        measure_latency(lambda: None, **kwargs)


def test_timing_round_trips():
    timing = measure_latency(lambda: None, warmup=0, repeats=4)
    assert Timing.from_dict(timing.to_dict()) == timing


# -- measure_paired: a candidate timed in alternating rounds with a reference ------------------


class LoadedMachine:
    """A fake ``perf_counter`` and functions that move it: in round r, a call of a function made by
    :meth:`fn` takes its own ms for round r times the machine's load in round r (one round of
    ``measure_paired`` is ``per_round`` calls)."""

    def __init__(self, per_round: int, loads):
        self.now, self.calls, self.per_round, self.loads = 0.0, 0, per_round, list(loads)

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept = getattr(self, "slept", 0.0) + seconds

    def fn(self, ms_by_round):
        def call() -> None:
            r = self.calls // self.per_round
            self.calls += 1
            ms = ms_by_round[r % len(ms_by_round)] if isinstance(ms_by_round, list) else ms_by_round
            self.now += ms * self.loads[r % len(self.loads)] / 1e3
        return call


@pytest.fixture
def machine(monkeypatch):
    """Install a LoadedMachine in the harness: ``machine(loads, warmup, repeats)`` returns it."""
    def install(loads, *, warmup=1, repeats=3) -> LoadedMachine:
        fake = LoadedMachine(2 * (warmup + repeats), loads)
        monkeypatch.setattr(_measure, "time", types.SimpleNamespace(perf_counter=fake.perf_counter, sleep=fake.sleep))
        return fake
    return install


def test_paired_ratio_is_the_median_of_per_round_ratios(machine):
    fake = machine([1.0])
    ratios = [0.5, 0.4, 0.6, 0.5, 0.9, 0.5, 0.45]
    paired = _measure.measure_paired(fake.fn([10 * r for r in ratios]), fake.fn(10.0), rounds=7, repeats=3,
                                     tolerance=1.0, min_round_s=0)
    assert paired.ratios == pytest.approx(tuple(ratios))
    assert paired.ratio == pytest.approx(0.5) and paired.scaled(8.0) == pytest.approx(4.0)
    assert paired.candidate_ms == pytest.approx(5.0) and paired.reference_ms == pytest.approx(10.0)
    assert paired.cv == pytest.approx(statistics.stdev(ratios) / statistics.fmean(ratios))
    assert (paired.attempts, paired.noisy) == (1, False)
    assert fake.calls == 7 * 2 * (1 + 3)


def test_a_candidate_identical_to_the_reference_has_ratio_one_however_the_load_moves(machine):
    # the load triples between rounds: the raw figures follow it, the ratio does not
    fake = machine([1.0, 3.0, 1.5, 2.0, 1.0])
    paired = _measure.measure_paired(fake.fn(4.0), fake.fn(4.0), rounds=5, repeats=3, min_round_s=0)
    assert paired.ratio == pytest.approx(1.0) and paired.cv == pytest.approx(0.0, abs=1e-12)
    assert paired.candidate_ms == pytest.approx(6.0)  # median of 4, 12, 6, 8, 4 ms
    assert (paired.attempts, paired.noisy) == (1, False)


def test_rounds_that_disagree_are_measured_again_and_flagged_if_they_stay_noisy(machine):
    fake = machine([1.0])
    jumpy = [2.0, 6.0, 2.0, 6.0, 2.0]  # ratios 0.2 and 0.6 alternate: far beyond a 10% tolerance
    paired = _measure.measure_paired(fake.fn(jumpy), fake.fn(10.0), rounds=5, repeats=3, tolerance=0.1, attempts=3,
                                     min_round_s=0)
    assert paired.noisy and paired.attempts == 3 and paired.cv > 0.1
    assert fake.calls == 3 * 5 * 2 * (1 + 3)


def test_a_noisy_attempt_followed_by_a_calm_one_keeps_the_calm_one(machine):
    fake = machine([1.0])
    # first attempt (rounds 0-4) jumps, the second (rounds 5-9) is steady at 0.5
    ms = [2.0, 6.0, 2.0, 6.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    paired = _measure.measure_paired(fake.fn(ms), fake.fn(10.0), rounds=5, repeats=3, tolerance=0.1, attempts=3,
                                     min_round_s=0)
    assert (paired.attempts, paired.noisy) == (2, False)
    assert paired.ratio == pytest.approx(0.5) and paired.cv == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("kwargs", "field"), [({"rounds": 0}, "rounds"), ({"attempts": 0}, "attempts"),
                                               ({"tolerance": 0}, "tolerance"), ({"repeats": 0}, "repeats"),
                                               ({"warmup": -1}, "warmup"), ({"min_round_s": -1}, "min_round_s"),
                                               ({"pause_s": -1}, "pause_s"),
                                               ({"quiet_reference_ms": 0}, "quiet_reference_ms"),
                                               ({"drift": 0}, "drift")])
def test_bad_paired_arguments_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        _measure.measure_paired(lambda: None, lambda: None, **kwargs)


def test_a_fast_function_is_called_until_its_round_has_lasted_min_round_s(machine):
    # 1 ms calls, 3 timed a round would span 3 ms; with min_round_s 10 ms each function is called
    # (after its untimed call) until 10 ms of timing have passed: 10 calls a round
    fake = machine([1.0])
    paired = _measure.measure_paired(fake.fn(1.0), fake.fn(2.0), rounds=3, repeats=3, min_round_s=0.01)
    assert paired.ratio == pytest.approx(0.5)
    assert fake.calls == 3 * ((1 + 10) + (1 + 5))


def test_a_reference_slower_than_when_quiet_means_another_attempt_after_a_pause(machine):
    # attempt 1 (rounds 0-4): the machine is loaded 1.3x (over the 20% drift) and the candidate slows
    # more than the reference, every round alike (ratio 0.45, no spread); attempt 2 (rounds 5-9): quiet, 0.3
    fake = machine([1.3] * 5 + [1.0] * 5)
    paired = _measure.measure_paired(fake.fn([4.5] * 5 + [3.0] * 5), fake.fn(10.0), rounds=5,
                                     repeats=3, min_round_s=0, quiet_reference_ms=10.0, pause_s=0.5)
    assert (paired.attempts, paired.noisy) == (2, False)
    assert paired.ratio == pytest.approx(0.3) and fake.slept == pytest.approx(0.5)


def test_a_reference_that_stays_slow_is_flagged_noisy_and_the_least_strayed_attempt_kept(machine):
    fake = machine([1.5] * 5 + [1.25] * 5 + [1.4] * 5)
    paired = _measure.measure_paired(fake.fn(5.0), fake.fn(10.0), rounds=5, repeats=3, min_round_s=0,
                                     quiet_reference_ms=10.0, pause_s=1.0, attempts=3)
    assert paired.noisy and paired.attempts == 3 and fake.slept == pytest.approx(1.0 + 2.0)  # pauses double
    assert paired.reference_ms == pytest.approx(12.5) and paired.ratio == pytest.approx(0.5)


def test_a_reference_slower_than_quiet_within_the_drift_is_settled(machine):
    fake = machine([1.15])  # 15% slower: training beside it does that; only over 20% is a loaded moment
    paired = _measure.measure_paired(fake.fn(5.0), fake.fn(10.0), rounds=5, repeats=3, min_round_s=0,
                                     quiet_reference_ms=10.0)
    assert (paired.attempts, paired.noisy) == (1, False)


def test_without_a_quiet_reference_a_slow_reference_is_not_a_reason_to_measure_again(machine):
    fake = machine([1.5])
    paired = _measure.measure_paired(fake.fn(5.0), fake.fn(10.0), rounds=5, repeats=3, min_round_s=0)
    assert (paired.attempts, paired.noisy) == (1, False)


def test_paired_timing_round_trips(machine):
    fake = machine([1.0, 2.0])
    paired = _measure.measure_paired(fake.fn(3.0), fake.fn(4.0), rounds=3, repeats=3, min_round_s=0)
    assert _measure.PairedTiming.from_dict(json.loads(json.dumps(paired.to_dict()))) == paired


# -- measure_quiet: the fastest of timings spread over a few seconds -----------------------------


def test_quiet_latency_is_the_fastest_of_spread_timings(machine):
    # every call of a function in sample s takes its ms times the load of sample s (one sample is
    # one measure_latency per function: 3 untimed + 15 timed calls, as per_round counts for two)
    fake = machine([1.3, 1.0, 1.2], warmup=3, repeats=15)
    quiet = _measure.measure_quiet({"a": fake.fn(2.0), "b": fake.fn(4.0)}, samples=3, pause_s=0.25, min_time_s=0)
    assert quiet["a"].median_ms == pytest.approx(2.0) and quiet["b"].median_ms == pytest.approx(4.0)
    assert fake.slept == pytest.approx(0.5) and fake.calls == 3 * 2 * (3 + 15)


@pytest.mark.parametrize(("kwargs", "field"), [({"samples": 0}, "samples"), ({"pause_s": -1}, "pause_s"),
                                               ({"repeats": 0}, "repeats")])
def test_bad_quiet_arguments_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        _measure.measure_quiet({"a": lambda: None}, **kwargs)
