"""Online calibration: the cheap estimate corrected from the measured values as they arrive.

A search evaluates candidates one by one; each evaluation measures what the ``estimate``
predicted before it (latency on a device, energy, ...). For every metric that both return,
:class:`OnlineCalibration` keeps the (estimated, measured) pairs of the evaluated trials and,
every ``refit_every`` of them, refits a correction of that metric's estimate. The driver
screens with the corrected estimate, and ``auto`` judges constraints with it. What is
recorded never changes: a
trial keeps the values ``evaluate`` returned and the estimate ``estimate`` returned.

Why this correction. From ``min_pairs`` (5) pairs on, the estimate is multiplied by the
median of ``measured / estimated`` over the pairs. A device estimated from the wrong profile,
or a profile whose efficiency factors are off, is wrong mostly by a factor: on NAS-Bench-201
the Pixel 3 profile's latencies rank Raspberry Pi 4 cells as well as the Pi's own profile
does (Kendall tau 0.84 against 0.83) but are 4.5x too fast. The median ratio is exact for a
constant factor, robust to a few odd measurements, settles as pairs accrue, and never
reorders candidates: what an estimate ranks well stays ranked as it was. A power law (a line
of the log ratio on the log estimate, kept when its leave-one-out error was lower) was tried
and left out: fitted on 10 to 100 random NAS-Bench-201 cells it was further off than the
median ratio on the other cells; within a search, whose evaluated trials bunch where the
sampler aims, it was often worse than the ratio on the next trials; and fed to ``auto``'s
surrogate (which already fits a line through (estimate, measured)) it cut the benchmark's
mean hypervolume at 100 evaluations from 0.89 to 0.79 (NAS-Bench-201, Pi 4 estimated from
the Pixel 3 profile, 10 seeds). Corrections that change the order (per layer type) need the
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


@dataclass(frozen=True)
class CalibrationFit:
    """One refit of one metric's correction, and how well the correction it replaces did.

    The pairs that arrived since the last refit (``held_out``; the correction in force was not
    fitted on them) score it: ``held_out_mdape`` is the median ``|estimate / measured - 1|``
    of the estimate as it was corrected then, ``raw_mdape`` of the raw estimate. ``tau`` is
    Kendall's tau-b of the estimate against the measured values on those pairs (the same
    corrected or not: a factor keeps the order; None for fewer than two distinct values).
    """

    metric: str
    pairs: int  # pairs this fit was made from
    factor: float  # the median of measured / estimated: what the estimate is multiplied by
    held_out: int
    tau: Optional[float]
    held_out_mdape: Optional[float]
    raw_mdape: Optional[float]

    def metrics(self) -> dict[str, float]:
        """Its numbers, keyed ``calibration.<metric>.<name>`` (for MLflow); None values left out."""
        names = ("pairs", "factor", "held_out", "tau", "held_out_mdape", "raw_mdape")
        return {f"calibration.{self.metric}.{n}": float(getattr(self, n)) for n in names
                if getattr(self, n) is not None}


class OnlineCalibration:
    """Corrections of an estimate's metrics, refitted from measured values as trials finish.

    Args:
        estimate: the raw estimate (params -> metrics), called for an evaluated trial that was
            not estimated when it was asked (a job calls it only where it screens); None: such
            a trial teaches nothing.
        refit_every: refit after this many new pairs of a metric (the first refit once
            ``min_pairs`` have arrived).
        min_pairs: fewest pairs a correction is made from; until then the estimate is used as it is.
        measured_only: a pair counts only when ``evaluate``'s provenance says ``measured`` (a
            job: its exact sizes and its modelled device figures equal their estimates and
            would teach nothing); else any value not marked ``modelled`` counts.
    """

    def __init__(self, estimate: Optional[Callable[[dict], Any]] = None, *, refit_every: int = 5,
                 min_pairs: int = 5, measured_only: bool = False):
        if estimate is not None and not callable(estimate):
            raise ConfigError(f"OnlineCalibration: estimate must be a callable params -> dict or None, "
                              f"got {estimate!r}")
        for name, value in (("refit_every", refit_every), ("min_pairs", min_pairs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"OnlineCalibration: {name} must be an int >= 1, got {value!r}")
        if not isinstance(measured_only, bool):
            raise ConfigError(f"OnlineCalibration: measured_only must be True or False, got {measured_only!r}")
        self.estimate, self.measured_only = estimate, measured_only
        self.refit_every, self.min_pairs = refit_every, min_pairs
        self.names: Optional[set[str]] = None  # the metrics estimates have returned
        self.pairs: dict[str, list[tuple[float, float]]] = {}  # metric -> (log estimated, log measured)
        self.fitted_at: dict[str, int] = {}  # metric -> pairs at its last refit
        self.log_factors: dict[str, float] = {}  # metric -> log of the factor its estimate is multiplied by
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
        for name, log_factor in self.log_factors.items():
            if _log(out.get(name)) is not None:  # times the factor: a factor of 1 leaves it exactly as it was
                out[name] = out[name] * math.exp(log_factor)
        return out

    def correct_columns(self, names: Sequence[str], rows):
        """A numpy matrix of estimates (one column per metric of ``names``), corrected (a copy)."""
        import numpy as np

        out = np.array(rows, dtype=float, copy=True)
        for j, name in enumerate(names):
            if name in self.log_factors:
                col = out[:, j]
                ok = np.isfinite(col) & (col > 0)
                col[ok] = col[ok] * math.exp(self.log_factors[name])
        return out

    def _refit(self, name: str) -> CalibrationFit:
        pairs = self.pairs[name]
        batch = pairs[self.fitted_at.get(name, 0):]
        before = self.log_factors.get(name, 0.0)
        raw, measured = [e for e, _ in batch], [m for _, m in batch]
        log_factor = _median([m - e for e, m in pairs])
        self.log_factors[name], self.fitted_at[name] = log_factor, len(pairs)
        fit = CalibrationFit(name, len(pairs), math.exp(log_factor), len(batch), _tau(raw, measured),
                             _mdape([e + before for e in raw], measured), _mdape(raw, measured))
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


def _mdape(log_estimated: Sequence[float], log_measured: Sequence[float]) -> Optional[float]:
    """The median |estimate / measured - 1| of log values; None for none."""
    if not log_measured:
        return None
    return _median([abs(math.exp(e - m) - 1.0) for e, m in zip(log_estimated, log_measured)])


def _tau(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Kendall's tau-b; None where it is undefined (fewer than two distinct values on a side)."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    from slimsearch.hardware_profiles import kendall_tau

    return kendall_tau(a, b)
