"""How well a profile's predictions match measured latencies: rank correlation and error shares."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._catalogue import load_profile
from slimsearch.hardware_profiles._measurements import Sample, layer_samples
from slimsearch.hardware_profiles._predict import predict
from slimsearch.hardware_profiles._profile import HardwareProfile

__all__ = ["FitReport", "fit_report", "kendall_tau", "report", "share_within"]


@dataclass(frozen=True)
class FitReport:
    """How well a profile's predictions match measured latencies.

    Attributes:
        n: Number of samples.
        kendall_tau: Kendall rank correlation (tau-b) of predicted against measured.
        within_10: Share of predictions within ±10% of the measured latency.
        within_20: Share of predictions within ±20% of the measured latency.
        median_abs_rel_error: Median of ``|predicted / measured - 1|``.
    """

    n: int
    kendall_tau: float
    within_10: float
    within_20: float
    median_abs_rel_error: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return dataclasses.asdict(self)


def fit_report(
    profile: HardwareProfile | str, samples: Iterable[Sample], *, power_mode: str | None = None
) -> FitReport:
    """Compare ``profile``'s predictions with the measured latencies of ``samples``."""
    profile = load_profile(profile)
    predicted, measured = [], []
    for layers, measured_ms in layer_samples(samples):
        predicted.append(predict(layers, profile, power_mode=power_mode).latency_ms)
        measured.append(measured_ms)
    return report(predicted, measured)


def report(predicted: Sequence[float], measured: Sequence[float]) -> FitReport:
    """:class:`FitReport` of paired predicted and measured latencies."""
    import numpy as np

    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if p.shape != m.shape or p.size < 2:
        raise ConfigError(f"need at least two paired latencies, got {p.size} predicted and {m.size} measured")
    rel = np.abs(p / m - 1.0)
    return FitReport(n=int(p.size), kendall_tau=kendall_tau(p, m), within_10=share_within(p, m, 0.10),
                     within_20=share_within(p, m, 0.20), median_abs_rel_error=float(np.median(rel)))


def share_within(predicted: Sequence[float], measured: Sequence[float], tolerance: float) -> float:
    """Share of predictions with ``|predicted / measured - 1| <= tolerance``."""
    import numpy as np

    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    return float(np.mean(np.abs(p / m - 1.0) <= tolerance + 1e-12))


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (ties counted as scipy does), in O(n log n) (Knight's algorithm)."""
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = x.size
    if n != y.size or n < 2:
        raise ConfigError(f"kendall_tau needs two sequences of equal length >= 2, got {x.size} and {y.size}")
    pairs = n * (n - 1) // 2

    def tied(*keys: np.ndarray) -> int:
        order = np.lexsort(keys[::-1])
        same = np.ones(n - 1, dtype=bool)
        for key in keys:
            sorted_key = key[order]
            same &= sorted_key[1:] == sorted_key[:-1]
        # sizes of runs of equal keys
        edges = np.flatnonzero(np.concatenate(([True], ~same, [True])))
        runs = np.diff(edges)
        return int(np.sum(runs * (runs - 1) // 2))

    tied_x, tied_y, tied_xy = tied(x), tied(y), tied(x, y)
    # discordant pairs: inversions of y's ranks after sorting by (x, y)
    order = np.lexsort((y, x))
    ranks = np.searchsorted(np.unique(y), y[order]) + 1
    size = int(ranks.max())
    tree = [0] * (size + 1)
    inversions = 0
    for seen, r in enumerate(ranks.tolist()):
        # count earlier entries with a strictly greater rank
        i, not_greater = r, 0
        while i > 0:
            not_greater += tree[i]
            i -= i & -i
        inversions += seen - not_greater
        i = r
        while i <= size:
            tree[i] += 1
            i += i & -i
    concordant_minus_discordant = pairs - tied_x - tied_y + tied_xy - 2 * inversions
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return float(concordant_minus_discordant / denominator) if denominator > 0 else float("nan")
