"""measure_latency, the local timing harness."""

from __future__ import annotations

import time

import pytest

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles import Timing, measure_latency


def test_median_is_positive_and_defaults_are_used():
    calls = []
    timing = measure_latency(lambda: calls.append(sum(range(1000))))
    assert timing.median_ms > 0
    assert timing.repeats == 15
    assert len(calls) == 3 + 15
    assert timing.iqr_ms >= 0 and timing.cv >= 0


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


def test_torch_thread_settings_are_left_alone():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    x = torch.randn(64, 64)
    measure_latency(lambda: x @ x, warmup=1, repeats=3)
    assert torch.get_num_threads() == before


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
