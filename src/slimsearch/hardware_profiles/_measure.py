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

__all__ = ["PairedTiming", "Timing", "measure_latency", "measure_paired", "measure_quiet"]

PAIRED_ROUNDS = 7  # alternating rounds per attempt: an odd count, so the median is one round's ratio
PAIRED_REPEATS = 5  # timed calls per function and round (after one untimed call)
PAIRED_TOLERANCE = 0.10  # a coefficient of variation of the per-round ratios above this: the rounds disagree
# a reference slower than its quiet figure by more than this: a loaded moment (training beside it
# slows it 5-10%; the moments that slowed a small graph 50% more than it slowed it 15-30%)
PAIRED_DRIFT = 0.20
PAIRED_ATTEMPTS = 3  # attempts at most; after the last one, a measurement still unsettled is noisy
# each function's share of a round lasts at least this long: a 45 us batch-1 graph timed 5 times
# spans 0.2 ms, inside one time slice of whatever else runs, so all 7 rounds saw the same moment
# and a whole measurement moved by 70% between trials (benchmarks/paired_latency.py)
PAIRED_MIN_ROUND_S = 0.02
# seconds before the second attempt, doubling before each later one (1.5 and 3 s: 4.5 s at most): a
# machine whose load slows the candidate more than the reference tends to stay so for seconds (seen
# on this project's 2-vCPU machine with nothing else of ours running, 2-4 s at a time, once longer)
PAIRED_PAUSE_S = 1.5
QUIET_SAMPLES = 3  # timings of each function, QUIET_PAUSE_S apart, by measure_quiet (a job start waits 1 s more)
QUIET_PAUSE_S = 0.5


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
        attempts: Attempts made (one more each time an attempt was unsettled: see :func:`measure_paired`).
        noisy: Whether every attempt was unsettled.
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
    min_round_s: float = PAIRED_MIN_ROUND_S,
    quiet_reference_ms: float | None = None,
    drift: float = PAIRED_DRIFT,
    pause_s: float = PAIRED_PAUSE_S,
) -> PairedTiming:
    """Time ``candidate()`` against ``reference()`` in ``rounds`` short alternating rounds.

    Each round times both with :func:`measure_latency` (``warmup`` untimed calls, then ``repeats``
    timed ones, more until ``min_round_s`` seconds have passed, so that a fast function's rounds
    still span several of the scheduler's time slices), the reference first in even rounds and
    the candidate first in odd ones; its ratio compares calls made within moments of each other,
    so load that changes between rounds cancels out. The result's ratio is the median of the
    per-round ratios.

    An attempt is unsettled when the per-round ratios' coefficient of variation exceeds
    ``tolerance`` (the rounds disagree), or, given the reference's latency on a quiet machine
    ``quiet_reference_ms``, when the reference ran slower than that by more than ``drift``
    (the machine was loaded in a way that need not slow both alike: a small graph was seen to
    slow by 50-70% while the reference beside it slowed by 15-30%, every round alike). An unsettled
    attempt is made again after a pause, ``pause_s`` seconds before the second attempt and twice
    the last pause before each later one, up to ``attempts`` in all; the attempt that
    strayed least is kept, and flagged ``noisy`` if even it was unsettled.

    Raises:
        ConfigError: ``rounds``, ``repeats`` or ``attempts`` below 1, ``warmup``, ``min_round_s``
            or ``pause_s`` below 0, ``tolerance`` or ``drift`` not a number above 0, or
            ``quiet_reference_ms`` given and not a number above 0.
    """
    check_schedule(warmup, repeats, 0.0)
    _positive_int("rounds", rounds)
    _positive_int("attempts", attempts)
    for name, value in (("tolerance", tolerance), ("drift", drift)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    for name, value in (("min_round_s", min_round_s), ("pause_s", pause_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
    if quiet_reference_ms is not None and (isinstance(quiet_reference_ms, bool)
                                           or not isinstance(quiet_reference_ms, (int, float))
                                           or not quiet_reference_ms > 0):
        raise ConfigError(f"quiet_reference_ms must be a number of ms > 0, got {quiet_reference_ms!r}")

    best: PairedTiming | None = None
    best_stray = math.inf
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            time.sleep(pause_s * 2 ** (attempt - 2))
        ours, theirs = [], []
        for i in range(rounds):
            order = (reference, candidate) if i % 2 == 0 else (candidate, reference)
            first, second = (measure_latency(fn, warmup=warmup, repeats=repeats, min_time_s=min_round_s).median_ms
                             for fn in order)
            ours.append(second if i % 2 == 0 else first)
            theirs.append(first if i % 2 == 0 else second)
        ratios = tuple(a / b if b > 0 else math.inf for a, b in zip(ours, theirs))
        mean = statistics.fmean(ratios)
        cv = statistics.stdev(ratios) / mean if len(ratios) >= 2 and math.isfinite(mean) and mean > 0 else 0.0
        reference_ms = statistics.median(theirs)
        slower = reference_ms / quiet_reference_ms - 1 if quiet_reference_ms is not None else 0.0
        stray = max(cv / tolerance, slower / drift)  # 1: at the edge of both
        timing = PairedTiming(ratio=statistics.median(ratios), ratios=ratios, cv=cv,
                              candidate_ms=statistics.median(ours), reference_ms=reference_ms,
                              attempts=attempt, noisy=stray > 1)
        if best is None or stray < best_stray:
            best, best_stray = timing, stray
        if not timing.noisy:
            break
    return replace(best, attempts=attempt)


def measure_quiet(
    fns: Mapping[str, Callable[[], object]],
    *,
    samples: int = QUIET_SAMPLES,
    pause_s: float = QUIET_PAUSE_S,
    warmup: int = 3,
    repeats: int = 15,
    min_time_s: float = 0.05,
) -> dict[str, Timing]:
    """Each function's latency on a machine as quiet as it gets: the fastest of ``samples``
    :func:`measure_latency` timings of it, taken ``pause_s`` seconds apart (every function once
    per sample, in turn).

    Load only ever slows a call down, and a shared machine has moments of a few seconds in which
    everything runs slower with nothing of ours running beside it; one timing can fall in such a
    moment, the fastest of timings spread over longer than it rarely does. This is the reference
    that paired measurements are scaled to (:func:`measure_paired`'s ``quiet_reference_ms``).

    Raises:
        ConfigError: ``samples`` below 1, ``pause_s`` below 0, or a bad schedule (:func:`check_schedule`).
    """
    check_schedule(warmup, repeats, min_time_s)
    _positive_int("samples", samples)
    if isinstance(pause_s, bool) or not isinstance(pause_s, (int, float)) or not pause_s >= 0:
        raise ConfigError(f"pause_s must be a number of seconds >= 0, got {pause_s!r}")
    best: dict[str, Timing] = {}
    for sample in range(samples):
        if sample:
            time.sleep(pause_s)
        for name, fn in fns.items():
            timing = measure_latency(fn, warmup=warmup, repeats=repeats, min_time_s=min_time_s)
            if name not in best or timing.median_ms < best[name].median_ms:
                best[name] = timing
    return best
