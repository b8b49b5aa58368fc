"""Timing a callable on this machine: the local measurement harness."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from slimsearch.exceptions import ConfigError

__all__ = ["Timing", "measure_latency"]


@dataclass(frozen=True)
class Timing:
    """Summary of repeated wall-clock timings.

    Attributes:
        median_ms: Median time of one call.
        iqr_ms: Interquartile range of the call times.
        cv: Coefficient of variation (sample standard deviation over mean).
        repeats: Number of timed calls.
    """

    median_ms: float
    iqr_ms: float
    cv: float
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {"median_ms": self.median_ms, "iqr_ms": self.iqr_ms, "cv": self.cv,
                "repeats": self.repeats}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timing:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def check_schedule(warmup: int, repeats: int, min_time_s: float) -> None:
    """Refuse a measurement schedule that makes no sense (shared by latency and energy measurement)."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(min_time_s, bool) or not isinstance(min_time_s, (int, float)) or not min_time_s >= 0:
        raise ConfigError(f"min_time_s must be a number >= 0, got {min_time_s!r}")


def measure_latency(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    repeats: int = 15,
    min_time_s: float = 0.0,
) -> Timing:
    """Time ``fn()`` with :func:`time.perf_counter` after ``warmup`` untimed calls.

    Timed calls continue past ``repeats`` until at least ``min_time_s`` seconds of
    timing have passed. Thread counts and other runtime settings are the caller's
    business: this function changes none of them.

    Raises:
        ConfigError: ``warmup < 0``, ``repeats < 1`` or ``min_time_s < 0``.
    """
    check_schedule(warmup, repeats, min_time_s)

    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_time_s:
        before = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - before)

    samples_ms = [s * 1e3 for s in samples]
    median = statistics.median(samples_ms)
    if len(samples_ms) >= 2:
        q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
        mean = statistics.fmean(samples_ms)
        cv = statistics.stdev(samples_ms) / mean if mean > 0 else 0.0
    else:
        q1 = q3 = median
        cv = 0.0
    return Timing(median_ms=median, iqr_ms=q3 - q1, cv=cv, repeats=len(samples_ms))
