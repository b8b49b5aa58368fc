"""Timing a callable on this machine: the local measurement harness.

:func:`measure_latency` times one callable; :func:`measure_paired` times a candidate against a
reference in alternating short rounds, so that a change in machine load (another worker
training, another program) cancels out of their ratio.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from slimsearch.exceptions import ConfigError

__all__ = ["PairedTiming", "Timing", "measure_latency", "measure_paired"]

PAIRED_ROUNDS = 7  # alternating rounds per attempt: an odd count, so the median is one round's ratio
PAIRED_REPEATS = 5  # timed calls per function and round (after one untimed call)
PAIRED_TOLERANCE = 0.10  # a coefficient of variation of the per-round ratios above this: the rounds disagree
PAIRED_ATTEMPTS = 3  # attempts at most; after the last one, a measurement whose rounds still disagree is noisy


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


@dataclass(frozen=True)
class PairedTiming:
    """A candidate timed against a reference in alternating rounds (:func:`measure_paired`).

    Attributes:
        ratio: Median of the per-round ratios, candidate over reference: the figure to use
            (times the reference's latency taken in a quiet moment, :meth:`scaled`).
        ratios: The per-round ratios of the attempt kept (round medians, candidate over reference).
        cv: Coefficient of variation of ``ratios`` (sample standard deviation over mean).
        candidate_ms: Median of the candidate's round medians: its raw latency, as loaded as
            the machine was while it was timed.
        reference_ms: Median of the reference's round medians, timed in the same moments.
        attempts: Attempts made (one more each time the rounds disagreed beyond the tolerance).
        noisy: Whether the rounds of every attempt disagreed beyond the tolerance.
    """

    ratio: float
    ratios: tuple[float, ...]
    cv: float
    candidate_ms: float
    reference_ms: float
    attempts: int
    noisy: bool

    def scaled(self, reference_ms: float) -> float:
        """The candidate's latency in ms where the reference takes ``reference_ms``: ``ratio * reference_ms``."""
        return self.ratio * reference_ms

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {"ratio": self.ratio, "ratios": list(self.ratios), "cv": self.cv, "candidate_ms": self.candidate_ms,
                "reference_ms": self.reference_ms, "attempts": self.attempts, "noisy": self.noisy}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairedTiming:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "ratios": tuple(data["ratios"])})


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


def measure_paired(
    candidate: Callable[[], object],
    reference: Callable[[], object],
    *,
    rounds: int = PAIRED_ROUNDS,
    repeats: int = PAIRED_REPEATS,
    warmup: int = 1,
    tolerance: float = PAIRED_TOLERANCE,
    attempts: int = PAIRED_ATTEMPTS,
) -> PairedTiming:
    """Time ``candidate()`` against ``reference()`` in ``rounds`` short alternating rounds.

    Each round times both with :func:`measure_latency` (``warmup`` untimed calls, then ``repeats``
    timed ones), the reference first in even rounds and the candidate first in odd ones; its
    ratio compares calls made within moments of each other, so load that changes between rounds
    cancels out. The result's ratio is the median of the per-round ratios. When their
    coefficient of variation exceeds ``tolerance`` the rounds disagree, and the measurement is
    made again, up to ``attempts`` times in all; the attempt with the smallest variation is
    kept, and flagged ``noisy`` if even it exceeds the tolerance.

    Raises:
        ConfigError: ``rounds``, ``repeats`` or ``attempts`` below 1, ``warmup`` below 0, or
            ``tolerance`` not a number above 0.
    """
    check_schedule(warmup, repeats, 0.0)
    _positive_int("rounds", rounds)
    _positive_int("attempts", attempts)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ConfigError(f"tolerance must be a number > 0, got {tolerance!r}")

    best: PairedTiming | None = None
    for attempt in range(1, attempts + 1):
        ours, theirs = [], []
        for i in range(rounds):
            order = (reference, candidate) if i % 2 == 0 else (candidate, reference)
            first, second = (measure_latency(fn, warmup=warmup, repeats=repeats).median_ms for fn in order)
            ours.append(second if i % 2 == 0 else first)
            theirs.append(first if i % 2 == 0 else second)
        ratios = tuple(a / b if b > 0 else math.inf for a, b in zip(ours, theirs))
        mean = statistics.fmean(ratios)
        cv = statistics.stdev(ratios) / mean if len(ratios) >= 2 and math.isfinite(mean) and mean > 0 else 0.0
        timing = PairedTiming(ratio=statistics.median(ratios), ratios=ratios, cv=cv,
                              candidate_ms=statistics.median(ours), reference_ms=statistics.median(theirs),
                              attempts=attempt, noisy=cv > tolerance)
        if best is None or timing.cv < best.cv:
            best = timing
        if not timing.noisy:
            break
    return replace(best, attempts=attempt)
