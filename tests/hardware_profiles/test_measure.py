"""measure_latency, the local timing harness."""

from __future__ import annotations

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

    def work(self) -> None:
        self.calls += 1
        self.now += next(self.durations) / 1e3


@pytest.fixture
def clock(monkeypatch):
    """Install a FakeClock in the harness: ``clock(durations_ms)`` returns it."""
    def install(durations_ms) -> FakeClock:
        fake = FakeClock(durations_ms)
        monkeypatch.setattr(_measure, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
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
