"""A learned correction on top of a profile's roofline: what the physics prior misses.

The roofline (:func:`~slimsearch.hardware_profiles.predict`) stays the prior; the
correction multiplies its latency by ``exp(g(features))``, where ``g`` is a linear model of
``log(measured / roofline)`` over generic features of the model's layers as the roofline
sees them (:data:`FEATURES`: the share of predicted time in each op type and precision,
layer counts per op type, total operations and bytes, the memory-bound share, the work
added by channel blocks). Nothing in them is specific to one model family.

Why this learner. :func:`~slimsearch.hardware_profiles.calibrate` has 50 to 200
measured latencies. A ridge regression on standardised features is the model that
stays sound there: one coefficient per feature, its penalty chosen by 5-fold
cross-validation (with "no correction" among the candidates, so a correction that does
not beat the roofline out of sample is not kept), closed-form steps, and it is stored as
a few plain numbers. Boosted trees or forests need more samples per split than a few
hundred give (on NAS-Bench-201 a random forest on 200 cells scored below the calibrated
roofline alone) and are awkward to store without pickle. The loss is Tukey's biweight
(an MM-estimate: a Huber fit first, whose residuals set the scale): calibration samples
are a bulk of small errors plus a few the layer costs misdescribe (an op the runtime
removed or kept against the model's graph); no feature sees those, and a squared or
Huber loss lets them pull the factor away from the bulk, while the biweight gives them
no weight. The correction is clipped to the range of factors it gave its own samples, so
it never extrapolates further than the data it saw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._enums import OpType, Precision
from slimsearch.hardware_profiles._schema import _check_keys, _check_number, _FieldError

__all__ = ["FEATURES", "MIN_SAMPLES", "Correction", "LayerTime", "feature_values", "fit_correction"]

FEATURES: tuple[str, ...] = (
    *(f"time_share.{op.value}" for op in OpType),
    *(f"time_share.{p.value}" for p in Precision),
    *(f"log_layers.{op.value}" for op in OpType),
    "log_latency", "log_ops", "log_bytes", "log_layers", "memory_bound_share", "log_work_ratio",
)
"""Names of the features a correction may use: time shares per op type and per precision
(of the roofline's latency), ``log(1 + layers)`` per op type and in all, the log of the
roofline's latency (s), of the operations executed and of the bytes moved, the share of
time in memory-bound layers, and the log of the operations executed over the nominal ones
(channel-block rounding, accelerated sparsity, pooling run as convolution)."""

MIN_SAMPLES = 30
"""Fewest samples a correction is fitted from (5 folds of at least 6 for its penalty)."""

_ALPHAS = tuple(10.0 ** (k / 2) for k in range(-6, 7))  # ridge penalties tried, 1e-3 .. 1e3
_FOLDS = 5
_HUBER_K = 1.345
_BIWEIGHT_C = 4.685  # 95% efficiency under normal errors
_EXACT = 1e-6  # residuals all below this (log ratio): the roofline is exact, no correction
_STEPS = 100


class LayerTime(NamedTuple):
    """One layer as the roofline saw it, for :func:`feature_values`."""

    op: OpType
    precision: Precision
    time_s: float
    memory_bound: bool
    nominal_ops: float  # 2 per MAC plus simple operations
    executed_ops: float  # what the device runs (kernel_work)
    bytes: float


def feature_values(layers: Sequence[LayerTime], latency_s: float) -> dict[str, float]:
    """The :data:`FEATURES` of one model, from its layers and the roofline's latency."""
    out = dict.fromkeys(FEATURES, 0.0)
    total = max(latency_s, 1e-12)
    counts: dict[str, int] = {}
    nominal = executed = moved = memory_time = 0.0
    for layer in layers:
        out[f"time_share.{layer.op.value}"] += layer.time_s / total
        out[f"time_share.{layer.precision.value}"] += layer.time_s / total
        counts[layer.op.value] = counts.get(layer.op.value, 0) + 1
        nominal += layer.nominal_ops
        executed += layer.executed_ops
        moved += layer.bytes
        memory_time += layer.time_s if layer.memory_bound else 0.0
    for op, count in counts.items():
        out[f"log_layers.{op}"] = math.log1p(count)
    out["log_latency"] = math.log(total)
    out["log_ops"] = math.log1p(executed)
    out["log_bytes"] = math.log1p(moved)
    out["log_layers"] = math.log1p(len(layers))
    out["memory_bound_share"] = memory_time / total
    out["log_work_ratio"] = math.log(executed / nominal) if nominal > 0 and executed > 0 else 0.0
    return out


@dataclass(frozen=True)
class Correction:
    """``factor = exp(clip(intercept + sum(coef * (x - mean) / scale), low, high))``.

    Attributes:
        features: Names (from :data:`FEATURES`) of the features with a coefficient.
        mean: Mean of each feature over the samples it was fitted on.
        scale: Standard deviation of each feature over those samples (> 0).
        coef: Coefficient of each standardised feature.
        intercept: Log factor at the mean features.
        low: Smallest log factor (the smallest it gave a fitted sample).
        high: Largest log factor.
        alpha: Ridge penalty chosen by cross-validation; None when no correction beat
            the roofline there (the identity).
        samples: Number of samples fitted on.
        source: Where the correction comes from (samples, date, tool).
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    low: float
    high: float
    alpha: float | None
    samples: int
    source: str

    def __post_init__(self) -> None:
        put = object.__setattr__
        for name in ("features", "mean", "scale", "coef"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise _FieldError(f"correction.{name}", f"must be a list, got {value!r}")
            put(self, name, tuple(value))
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or len(set(self.features)) != len(self.features):
            raise _FieldError("correction.features", f"must be distinct names from {list(FEATURES)}, "
                              f"got {list(self.features)}")
        lengths = {len(self.features), len(self.mean), len(self.scale), len(self.coef)}
        if len(lengths) != 1:
            raise _FieldError("correction", "features, mean, scale and coef must have one entry each per "
                              f"feature, got lengths {[len(self.features), len(self.mean), len(self.scale), len(self.coef)]}")
        put(self, "mean", tuple(_check_number("correction.mean", v, low=-math.inf) for v in self.mean))
        put(self, "scale", tuple(_check_number("correction.scale", v, low=0, low_inclusive=False)
                                 for v in self.scale))
        put(self, "coef", tuple(_check_number("correction.coef", v, low=-math.inf) for v in self.coef))
        for name in ("intercept", "low", "high"):
            put(self, name, _check_number(f"correction.{name}", getattr(self, name), low=-math.inf))
        if self.low > self.high:
            raise _FieldError("correction.low", f"must be <= high ({self.high:g}), got {self.low:g}")
        if self.alpha is not None:
            put(self, "alpha", _check_number("correction.alpha", self.alpha, low=0))
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise _FieldError("correction.samples", f"must be an int >= 0, got {self.samples!r}")
        if not isinstance(self.source, str) or not self.source.strip():
            raise _FieldError("correction.source", "must be a non-empty citation string")

    @property
    def is_identity(self) -> bool:
        """Whether the factor is 1 for every model."""
        return self.low == self.high == 0.0

    def log_factor(self, values: Mapping[str, float]) -> float:
        """``log(factor)`` for a model's :func:`feature_values`."""
        g = self.intercept + sum(c * (values[f] - m) / s
                                 for f, m, s, c in zip(self.features, self.mean, self.scale, self.coef))
        return min(self.high, max(self.low, g))

    def factor(self, values: Mapping[str, float]) -> float:
        """What the roofline's latency is multiplied by, for a model's :func:`feature_values`."""
        return math.exp(self.log_factor(values))

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as in a profile file's ``correction`` entry."""
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "coef": list(self.coef), "intercept": self.intercept, "low": self.low, "high": self.high,
                "alpha": self.alpha, "samples": self.samples, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Correction:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: A missing or unknown key or a bad value, naming ``correction.<key>``.
        """
        _check_keys("correction", data, required=("features", "mean", "scale", "coef", "intercept", "low",
                                                  "high", "alpha", "samples", "source"))
        return cls(**data)


def fit_correction(
    features: Sequence[Mapping[str, float]],
    roofline_ms: Sequence[float],
    measured_ms: Sequence[float],
    *,
    source: str,
) -> Correction:
    """Fit a :class:`Correction` to ``log(measured / roofline)`` (see the module docstring).

    Samples the roofline already predicts exactly give the identity (factor 1).

    Args:
        features: :func:`feature_values` of each sample.
        roofline_ms: The roofline's latency of each sample.
        measured_ms: The measured latency of each sample.
        source: Written into the correction.

    Raises:
        ConfigError: Fewer than :data:`MIN_SAMPLES` samples, lists of different lengths, or
            a latency that is not a positive number.
    """
    import numpy as np

    n = len(measured_ms)
    if not len(features) == len(roofline_ms) == n:
        raise ConfigError(f"a correction needs one feature row, roofline and measured latency per sample, "
                          f"got {len(features)}, {len(roofline_ms)} and {n}")
    if n < MIN_SAMPLES:
        raise ConfigError(f"a correction needs at least {MIN_SAMPLES} samples (5-fold cross-validation "
                          f"chooses its penalty), got {n}")
    predicted, measured = np.asarray(roofline_ms, dtype=float), np.asarray(measured_ms, dtype=float)
    if not (np.all(np.isfinite(predicted)) and np.all(predicted > 0) and np.all(np.isfinite(measured))
            and np.all(measured > 0)):
        raise ConfigError("a correction needs roofline and measured latencies that are finite numbers > 0")
    y = np.log(measured / predicted)
    identity = Correction((), (), (), (), 0.0, 0.0, 0.0, None, n, source)
    if float(np.max(np.abs(y))) < _EXACT:
        return identity
    x = np.array([[row[name] for name in FEATURES] for row in features], dtype=float)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    used = scale > 1e-9 * np.maximum(1.0, np.abs(mean))
    z = (x[:, used] - mean[used]) / scale[used]
    c = _biweight_scale(z, y)
    folds = np.array_split(np.random.RandomState(0).permutation(n), _FOLDS)
    best_alpha, best_loss = None, _biweight_loss(y, c)  # the identity's loss
    for alpha in _ALPHAS:
        loss = 0.0
        for held in folds:
            kept = np.setdiff1d(np.arange(n), held)
            w = _fit(z[kept], y[kept], alpha, c)
            loss += _biweight_loss(y[held] - w[0] - z[held] @ w[1:], c)
        if loss < best_loss - 1e-12:
            best_alpha, best_loss = alpha, loss
    if best_alpha is None:
        return identity
    w = _fit(z, y, best_alpha, c)
    fitted = w[0] + z @ w[1:]
    names = [name for name, keep in zip(FEATURES, used) if keep]
    return Correction(tuple(names), tuple(float(v) for v in mean[used]), tuple(float(v) for v in scale[used]),
                      tuple(float(v) for v in w[1:]), float(w[0]), float(fitted.min()), float(fitted.max()),
                      float(best_alpha), n, source)


def _irls(a, y, w, penalty, weights):
    import numpy as np

    for _ in range(_STEPS):
        r = y - a @ w
        u = weights(r)
        if not u.any():  # every sample rejected: keep the last estimate
            return w
        new = np.linalg.solve(a.T @ (a * u[:, None]) + penalty, a.T @ (u * y))
        if np.max(np.abs(new - w)) < 1e-12:
            return new
        w = new
    return w


def _design(z, alpha):
    import numpy as np

    a = np.column_stack([np.ones(len(z)), z])
    penalty = alpha * np.eye(a.shape[1])
    penalty[0, 0] = 1e-12  # the intercept is not shrunk
    return a, penalty


def _huber_start(z, y, alpha):
    """Ridge with Huber loss: convex, so a safe start for the biweight."""
    import numpy as np

    a, penalty = _design(z, alpha)
    spread = 1.4826 * float(np.median(np.abs(y - np.median(y))))
    k = max(_HUBER_K * spread, _EXACT)
    start = np.zeros(a.shape[1])
    start[0] = float(np.median(y))
    return a, penalty, _irls(a, y, start, penalty, lambda r: np.minimum(1.0, k / np.maximum(np.abs(r), 1e-300)))


def _biweight_scale(z, y) -> float:
    """The biweight's threshold: 4.685 robust standard deviations of a Huber fit's residuals."""
    import numpy as np

    a, _, w = _huber_start(z, y, 1.0)
    return max(_BIWEIGHT_C * 1.4826 * float(np.median(np.abs(y - a @ w))), _EXACT)


def _fit(z, y, alpha, c):
    import numpy as np

    a, penalty, w = _huber_start(z, y, alpha)
    return _irls(a, y, w, penalty, lambda r: np.where(np.abs(r) < c, (1 - (r / c) ** 2) ** 2, 0.0))


def _biweight_loss(r, c) -> float:
    import numpy as np

    inside = np.abs(r) < c
    return float(np.sum(np.where(inside, c * c / 6 * (1 - (1 - (r / c) ** 2) ** 3), c * c / 6)))
