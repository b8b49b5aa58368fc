"""Online calibration: the cheap estimate corrected from the measured values as they arrive.

A search evaluates candidates one by one; each evaluation measures what the ``estimate``
predicted before it (latency on a device, energy, ...). For every metric that both return,
:class:`OnlineCalibration` keeps the (estimated, measured) pairs of the evaluated trials and,
every ``refit_every`` of them, refits a correction of that metric's estimate. The driver
screens, and ``auto`` aims, with the corrected estimate. What is recorded never changes: a
trial keeps the values ``evaluate`` returned and the estimate ``estimate`` returned.

Why this correction. It works in log space on the ratio ``measured / estimated``:
a device estimated from the wrong profile, or a profile whose efficiency factors are off, is
wrong mostly by a factor (on NAS-Bench-201 the Pixel 3 profile's latencies rank Raspberry Pi 4
cells as well as the Pi's own profile does, Kendall tau 0.84, but are 4.5x too fast). From
``min_pairs`` (5) pairs on, the correction is the median ratio: robust to a few odd
measurements, exact for a constant factor, and it never reorders candidates. From
``line_pairs`` (10) on, a straight line of the log ratio on the log estimate (a power law)
is tried as well, and kept only when its leave-one-out error is a tenth below the median
ratio's: a slope
fitted on a few pairs, or on pairs bunched at one end of the range, is noise more often than
not (fitted on 10 to 100 random NAS-Bench-201 cells it was further off than the median ratio).
The slope is bounded so the corrected estimate still rises with the raw one, and the log ratio
is clipped to the range the pairs showed: the correction never reorders candidates and never
extrapolates past what it has seen. Richer corrections (over the layers, per op type) need the
model's structure, which only a device profile sees: that is
:func:`slimsearch.hardware_profiles.calibrate`.

Only pairs with both values finite and positive count, and a value ``evaluate`` marks
``modelled`` (its provenance) is not a measurement, so it teaches nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from slimsearch.exceptions import ConfigError

__all__ = ["CalibrationFit", "OnlineCalibration"]

_LINE_GAIN = 0.9  # a line must cut the median ratio's held-out error by a tenth to be kept
_MIN_SLOPE = -0.75  # corrected = raw^(1 + slope) * factor: rises with raw while 1 + slope > 0


@dataclass(frozen=True)
class CalibrationFit:
    """One refit of one metric's correction, and how well the correction it replaces did.

    ``held_out_*`` score the correction in force before this refit on the pairs that arrived
    since the last refit (which it was not fitted on): what the search actually used. ``raw_*``
    score the uncorrected estimate on the same pairs. ``tau`` is Kendall's tau-b (None for
    fewer than two pairs), ``mdape`` the median of ``|estimate / measured - 1|``.
    """

    metric: str
    pairs: int  # pairs this fit was made from
    model: str  # "ratio" or "line"
    factor: float  # measured / estimated at the pairs' mean log estimate
    slope: float  # of the log ratio on the log estimate (0 for "ratio")
    held_out: int
    held_out_tau: Optional[float]
    held_out_mdape: Optional[float]
    raw_tau: Optional[float]
    raw_mdape: Optional[float]

    def metrics(self) -> dict[str, float]:
        """Its numbers, keyed ``calibration.<metric>.<name>`` (for MLflow); None values left out."""
        names = ("pairs", "factor", "slope", "held_out", "held_out_tau", "held_out_mdape", "raw_tau", "raw_mdape")
        return {f"calibration.{self.metric}.{n}": float(getattr(self, n)) for n in names
                if getattr(self, n) is not None}


@dataclass(frozen=True)
class _Line:
    """log(measured / estimated) = intercept + slope * (log estimated - centre), clipped to [low, high]."""

    intercept: float
    slope: float
    centre: float
    low: float
    high: float

    def log_ratio(self, log_estimate: float) -> float:
        return min(max(self.intercept + self.slope * (log_estimate - self.centre), self.low), self.high)


class OnlineCalibration:
    """Corrections of an estimate's metrics, refitted from measured values as trials finish.

    Args:
        estimate: the raw estimate (params -> metrics), called for an evaluated trial that was
            not estimated when it was asked (a job calls it only where it screens); None: such
            a trial teaches nothing.
        refit_every: refit after this many new pairs of a metric (the first refit once
            ``min_pairs`` have arrived).
        min_pairs: fewest pairs a correction is made from; until then the estimate is used as it is.
        line_pairs: fewest pairs a power-law line is tried from (else the median ratio alone).
        measured_only: a pair counts only when ``evaluate``'s provenance says ``measured`` (a
            job: its exact sizes and its modelled device figures equal their estimates and
            would teach nothing); else any value not marked ``modelled`` counts.
    """

    def __init__(self, estimate: Optional[Callable[[dict], Any]] = None, *, refit_every: int = 5,
                 min_pairs: int = 5, line_pairs: int = 10, measured_only: bool = False):
        if estimate is not None and not callable(estimate):
            raise ConfigError(f"OnlineCalibration: estimate must be a callable params -> dict or None, got {estimate!r}")
        for name, value, low in (("refit_every", refit_every, 1), ("min_pairs", min_pairs, 1),
                                 ("line_pairs", line_pairs, 3)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"OnlineCalibration: {name} must be an int >= {low}, got {value!r}")
        if not isinstance(measured_only, bool):
            raise ConfigError(f"OnlineCalibration: measured_only must be True or False, got {measured_only!r}")
        self.estimate, self.measured_only = estimate, measured_only
        self.refit_every, self.min_pairs, self.line_pairs = refit_every, min_pairs, line_pairs
        self.names: Optional[set[str]] = None  # the metrics estimates have returned
        self.pairs: dict[str, list[tuple[float, float]]] = {}  # metric -> (log estimated, log measured)
        self.fitted_at: dict[str, int] = {}  # metric -> pairs at its last refit
        self.lines: dict[str, _Line] = {}
        self.fits: list[CalibrationFit] = []

    def add(self, estimate: Mapping[str, Any], values: Mapping[str, Any],
            provenance: Optional[Mapping[str, str]] = None) -> list[CalibrationFit]:
        """Take one evaluated trial's estimate and measured values; the refits this made (often none)."""
        provenance = provenance or {}
        self.names = set(estimate) | (self.names or set())
        made = []
        for name in sorted(set(estimate) & set(values)):
            if not self._counts(name, provenance):
                continue
            e, m = _log(estimate[name]), _log(values[name])
            if e is None or m is None:
                continue
            pairs = self.pairs.setdefault(name, [])
            pairs.append((e, m))
            last = self.fitted_at.get(name)
            if (last is None and len(pairs) >= self.min_pairs) or (last is not None and
                                                                     len(pairs) - last >= self.refit_every):
                made.append(self._refit(name))
        return made

    def could_learn(self, values: Mapping[str, Any], provenance: Optional[Mapping[str, str]] = None) -> bool:
        """Whether a trial's values could give a pair, before its estimate is known (so that a
        trial that cannot teach anything is not estimated for nothing)."""
        names = set(values) if self.names is None else set(values) & self.names
        return any(self._counts(n, provenance or {}) for n in names)

    def _counts(self, name: str, provenance: Mapping[str, str]) -> bool:
        label = str(getattr(provenance.get(name), "value", provenance.get(name)))
        return label != "modelled" and (label == "measured" or not self.measured_only)

    def correct(self, estimate: Mapping[str, Any]) -> dict[str, Any]:
        """``estimate`` with each corrected metric corrected (a new dict; the others as given)."""
        out = dict(estimate)
        for name, line in self.lines.items():
            e = _log(out.get(name))
            if e is not None:  # times the ratio, so that a ratio of 1 leaves the value exactly as it was
                out[name] = out[name] * math.exp(line.log_ratio(e))
        return out

    def correct_columns(self, names: Sequence[str], rows):
        """A numpy matrix of estimates (one column per metric of ``names``), corrected (a copy)."""
        import numpy as np

        out = np.array(rows, dtype=float, copy=True)
        for j, name in enumerate(names):
            line = self.lines.get(name)
            if line is None:
                continue
            col = out[:, j]
            ok = np.isfinite(col) & (col > 0)
            e = np.log(col[ok])
            col[ok] = col[ok] * np.exp(np.clip(line.intercept + line.slope * (e - line.centre), line.low, line.high))
        return out

    def _refit(self, name: str) -> CalibrationFit:
        pairs = self.pairs[name]
        batch = pairs[self.fitted_at.get(name, 0):]
        before = self.lines.get(name)
        held = [e + (before.log_ratio(e) if before else 0.0) for e, _ in batch]
        measured = [m for _, m in batch]
        held_tau, held_mdape = _quality(held, measured)
        raw_tau, raw_mdape = _quality([e for e, _ in batch], measured)
        line, model = _fit(pairs, self.line_pairs)
        self.lines[name], self.fitted_at[name] = line, len(pairs)
        fit = CalibrationFit(name, len(pairs), model, math.exp(line.intercept), line.slope, len(batch), held_tau,
                             held_mdape, raw_tau, raw_mdape)
        self.fits.append(fit)
        return fit


def _log(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return math.log(value) if 0 < value < math.inf else None


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _fit(pairs: Sequence[tuple[float, float]], line_pairs: int) -> tuple[_Line, str]:
    """The median ratio, or a line when there are enough pairs and it predicts held-out pairs better."""
    x = [e for e, _ in pairs]
    r = [m - e for e, m in pairs]
    n, low, high = len(r), min(r), max(r)
    centre = sum(x) / n
    ratio = _Line(_median(r), 0.0, centre, low, high)
    if n < line_pairs:
        return ratio, "ratio"
    sxx = sum((v - centre) ** 2 for v in x)
    if sxx <= 1e-12:
        return ratio, "ratio"
    mean_r = sum(r) / n
    slope = max(sum((v - centre) * (w - mean_r) for v, w in zip(x, r)) / sxx, _MIN_SLOPE)
    intercept = mean_r
    # leave-one-out residuals: the line's by its hat values (exact for least squares; near
    # enough where the slope bound bites), the median ratio's by dropping each pair in turn
    line_loo = [abs(w - intercept - slope * (v - centre)) / max(1.0 - 1.0 / n - (v - centre) ** 2 / sxx, 1e-9)
                for v, w in zip(x, r)]
    ratio_loo = [abs(w - _median(r[:i] + r[i + 1:])) for i, w in enumerate(r)]
    if _median(line_loo) < _LINE_GAIN * _median(ratio_loo):
        return _Line(intercept, slope, centre, low, high), "line"
    return ratio, "ratio"


def _quality(log_estimated: Sequence[float], log_measured: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Kendall's tau and the median |estimate / measured - 1| of log values; None where undefined."""
    if not log_measured:
        return None, None
    mdape = _median([abs(math.exp(e - m) - 1.0) for e, m in zip(log_estimated, log_measured)])
    if len(log_measured) < 2 or len(set(log_estimated)) < 2 or len(set(log_measured)) < 2:
        return None, mdape
    from slimsearch.hardware_profiles import kendall_tau

    return kendall_tau(log_estimated, log_measured), mdape
