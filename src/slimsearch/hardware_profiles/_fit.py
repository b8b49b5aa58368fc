"""Refit a profile's efficiency factors and overheads from measured latencies.

Why this is written here: latency predictors in the field (nn-Meter, HELP, BRP-NAS)
learn their own kernel- or graph-level regressors; none fits the few interpretable
numbers of a roofline profile (efficiency and overhead per op type, effective
bandwidth, per-call overhead), and general solvers (``scipy.optimize.nnls``) are not a
dependency of slimsearch, so the Lawson-Hanson active-set solver is a few lines of
numpy here.

The model fitted is :func:`~slimsearch.hardware_profiles.predict`'s own::

    latency = sum over layers of max(u_l * x[k_l], m_l * x_mem) + o[k_l] + b_l * s[k_l] + c

where ``k_l`` is the layer's key (its op type, or its op type at its precision when the
samples run that op type at several precisions: ``conv@int8`` and ``conv@fp32``),
``u_l`` its compute time at full peak, ``m_l`` its memory time at the profile's
bandwidth, ``b_l`` its batch size, ``x[k] = 1 / efficiency[k]``, ``x_mem`` the factor by
which the bandwidth is really slower, ``o[k]`` the per-layer and ``s[k]`` the
per-sample overhead of the key and ``c`` the per-call overhead. For a fixed choice of
which layers are compute-bound this is linear in the parameters; the fit alternates between solving the non-negative least
squares on *relative* error (rows weighted by ``1 / measured``) and re-deciding each
layer's bound, and keeps the best parameters seen. By default a second fit then
minimises the Huber loss of the relative error instead (iteratively reweighted), so a
few measurements far off the model do not drag the factors away from the rest.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._catalogue import load_profile
from slimsearch.hardware_profiles._enums import OpType
from slimsearch.hardware_profiles._measurements import Sample, layer_samples
from slimsearch.hardware_profiles._correction import MIN_SAMPLES, fit_correction
from slimsearch.hardware_profiles._predict import correction_features, kernel_work
from slimsearch.hardware_profiles._profile import HardwareProfile
from slimsearch.hardware_profiles._schema import MAX_EFFICIENCY, OpAtPrecision, OpKey

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DEFAULT_FIT", "FIT_PARAMETERS", "calibrate"]

_OPS = tuple(OpType)
FIT_PARAMETERS = (*(op.value for op in _OPS), "memory", "op_overhead", "layer_overhead", "sample_overhead",
                  "call_overhead")
"""What :func:`calibrate` can refit: the efficiency of each op type (at each precision
the samples run it at), effective memory bandwidth, a per-layer overhead per op type
(``op_overhead``) or one shared by all (``layer_overhead``), the per-sample overhead per
op type (``sample_overhead``; only from samples of at least two batch sizes), and the
per-call overhead."""
DEFAULT_FIT = tuple(name for name in FIT_PARAMETERS if name != "layer_overhead")
"""What :func:`calibrate` refits unless told otherwise."""

_MAX_ROUNDS = 30
_IRLS_STEPS = 8  # reweighting steps per bound decision in the robust fit
_HUBER_K = 1.345  # Huber threshold in robust standard deviations (95% efficiency under normal errors)
_HUBER_FLOOR = 0.005  # smallest Huber threshold (relative error): below it the fit is as good as exact
_MAX_BANDWIDTH_GAIN = 1e3  # effective bandwidth is kept within 1000x of the profile's


class _Rows(NamedTuple):
    """Per-layer terms of every sample, flattened; ``sample`` says which row a layer is in.

    The parameter vector is ``[x per key, x_mem, overhead per key, per-sample overhead
    per key, call overhead]``; :attr:`mem`, :attr:`over`, :attr:`per_sample` and
    :attr:`call` give the positions.
    """

    keys: tuple  # OpKey of each group of layers fitted together
    sample: np.ndarray  # int, one per layer
    group: np.ndarray  # int index into keys, one per layer
    compute_s: np.ndarray  # compute time at 100% efficiency, one per layer
    memory_s: np.ndarray  # memory time at the profile's bandwidth, one per layer
    counts: np.ndarray  # layers of each key, one row per sample
    sample_counts: np.ndarray  # layers of each key times their batch, one row per sample
    measured_s: np.ndarray  # one per sample
    overlap: bool  # roofline max of compute and memory time, else their sum
    batches: int  # distinct batch sizes among the layers

    @property
    def mem(self) -> int:
        return len(self.keys)

    @property
    def over(self) -> slice:
        return slice(len(self.keys) + 1, 2 * len(self.keys) + 1)

    @property
    def per_sample(self) -> slice:
        return slice(2 * len(self.keys) + 1, 3 * len(self.keys) + 1)

    @property
    def call(self) -> int:
        return 3 * len(self.keys) + 1


def _key_op(key: OpKey) -> OpType:
    return key.op if isinstance(key, OpAtPrecision) else key


def calibrate(
    profile: HardwareProfile | str,
    samples: Iterable[Sample],
    *,
    fit: Sequence[str] = DEFAULT_FIT,
    power_mode: str | None = None,
    name: str | None = None,
    date: datetime.date | str | None = None,
    robust: bool = True,
    correction: bool | None = None,
) -> HardwareProfile:
    """A copy of ``profile`` whose efficiency factors and overheads fit ``samples``.

    Each sample is ``(model, example_input, measured_latency_ms)``; a list of
    :class:`LayerCost` may stand in for the model (``example_input`` is then ignored),
    so callers that already have layer costs need not rebuild networks. Parameters
    named in ``fit`` are refitted (see :data:`FIT_PARAMETERS`); an op type that no
    sample's layers use, or whose layers are never compute-bound, keeps its value. An
    op type whose layers add no measurable time lands on the bound ``MAX_EFFICIENCY``
    (it is as good as free on that device, e.g. fused into the layer before it).
    A fitted efficiency may exceed 1 (up to ``MAX_EFFICIENCY``): the device then ran
    that op type faster than ``peak_gops``, which is not that kernel's ceiling (a GEMM
    rate or datasheet figure), and the source says so. Every refitted number's source
    says ``"calibrated on N samples, <date>, fit by slimsearch calibrate"``.

    An op type the samples run at several precisions (conv layers at int8 in some
    models and fp32 in others) gets its efficiency and overheads per precision, written
    under ``"conv@int8"``-style keys; so does one the profile already describes per
    precision. Per-sample overheads (``sample_overhead_us``) are fitted only from samples
    of at least two batch sizes: at one batch size they cannot be told apart from the
    per-layer overheads.

    Args:
        profile: The profile to start from (a profile, a shipped name or a file path).
        samples: Measured latencies, at least two.
        fit: Which parameters to refit; ``op_overhead`` and ``layer_overhead`` exclude
            each other.
        power_mode: The power mode the samples were measured in (None: the default).
        name: Name of the new profile (default: the old one).
        date: Date written into the sources (default: today).
        robust: Fit the Huber loss of the relative error (True) rather than its square:
            a few measurements far off the rest (a run on a throttled clock) then do not
            drag the factors away from the bulk of the samples.
        correction: Then learn a correction on top of the refitted roofline
            (:class:`~slimsearch.hardware_profiles.Correction`: what the roofline misses,
            from generic per-layer features; the identity where cross-validation finds
            nothing to learn). None: when there are at least ``MIN_SAMPLES`` (30) samples.
            A correction the profile had is dropped either way: it was fitted to the old
            factors.

    Raises:
        ConfigError: Fewer than two samples (fewer than 30 with ``correction=True``), a
            latency that is not a positive number, an unknown name in ``fit``, or an
            unknown power mode.
    """
    import numpy as np

    profile = load_profile(profile)
    if not isinstance(robust, bool):
        raise ConfigError(f"robust must be true or false, got {robust!r}")
    if correction not in (None, True, False):
        raise ConfigError(f"correction must be true, false or None (when there are {MIN_SAMPLES} samples), "
                          f"got {correction!r}")
    unknown = [p for p in fit if p not in FIT_PARAMETERS]
    if unknown or not fit:
        raise ConfigError(f"fit must name some of {list(FIT_PARAMETERS)}, got {list(fit)!r}")
    if "op_overhead" in fit and "layer_overhead" in fit:
        raise ConfigError("fit may name 'op_overhead' or 'layer_overhead', not both: "
                          "a shared overhead is the sum of the per-type ones")
    pairs = list(layer_samples(samples))
    if correction and len(pairs) < MIN_SAMPLES:
        raise ConfigError(f"a correction needs at least {MIN_SAMPLES} samples, got {len(pairs)}")
    rows = _rows(profile, pairs, power_mode)
    n, g = len(rows.measured_s), len(rows.keys)
    precision_of = {key: key.precision for key in rows.keys if isinstance(key, OpAtPrecision)}

    def current(table, key):
        op, precision = _key_op(key), precision_of.get(key)
        return {"efficiency": profile.op_efficiency, "overhead": profile.op_overhead,
                "sample": profile.sample_overhead}[table](op, precision)

    start = np.array([1.0 / current("efficiency", key) for key in rows.keys] + [1.0]
                     + [current("overhead", key) * 1e-6 for key in rows.keys]
                     + [current("sample", key) * 1e-6 for key in rows.keys]
                     + [(profile.call_overhead_us or 0.0) * 1e-6])
    compute_used = np.array([np.any(rows.compute_s[rows.group == i] > 0) for i in range(g)])
    free = np.zeros(len(start), dtype=bool)
    free[:g] = [_key_op(key).value in fit and compute_used[i] for i, key in enumerate(rows.keys)]
    free[rows.mem] = "memory" in fit
    free[rows.call] = "call_overhead" in fit
    shared = "layer_overhead" in fit
    if shared:
        start[rows.over] = profile.layer_overhead_us * 1e-6
    free[rows.over] = "op_overhead" in fit or shared
    # at one batch size a per-sample overhead cannot be told from a per-layer one
    free[rows.per_sample] = "sample_overhead" in fit and rows.batches > 1
    lower = np.concatenate([np.full(g, 1.0 / MAX_EFFICIENCY), [1.0 / _MAX_BANDWIDTH_GAIN],
                            np.zeros(g), np.zeros(g), [0.0]])
    theta = _fit(rows, start, free, lower, shared=shared, robust=robust)

    when = date.isoformat() if isinstance(date, datetime.date) else (date or datetime.date.today().isoformat())
    note = f"calibrated on {n} samples, {when}, fit by slimsearch calibrate"
    sources = dict(profile.sources)
    efficiency = dict(profile.efficiency)
    changes: dict[str, Any] = {}
    for i, key in enumerate(rows.keys):
        if free[i]:
            was = current("efficiency", key)
            value = efficiency[key] = float(min(MAX_EFFICIENCY, 1.0 / theta[i]))
            above = (" - above 1: this device ran these layers faster than peak_gops, which is "
                     "therefore not their kernel's ceiling" if value > 1 else "")
            sources[f"efficiency.{key.value}"] = f"{note} (fraction of peak_gops{above}; was {was:g})"
    changes["efficiency"] = efficiency
    if free[rows.mem]:
        changes["memory_bandwidth_gbps"] = float(profile.memory_bandwidth_gbps / theta[rows.mem])
        sources["memory_bandwidth_gbps"] = (
            f"{note} (effective bandwidth the layers see; was {profile.memory_bandwidth_gbps:g})")
    overhead_values = theta[rows.over]
    if shared:
        changes["layer_overhead_us"] = float(overhead_values[0] * 1e6)
        sources["layer_overhead_us"] = f"{note} (was {profile.layer_overhead_us:g})"
        changes["op_overhead_us"] = {}
        sources = {k: v for k, v in sources.items() if not k.startswith("op_overhead_us.")}
    elif free[rows.over].any():
        overheads = dict(profile.op_overhead_us)
        for i, key in enumerate(rows.keys):
            overheads[key] = float(overhead_values[i] * 1e6)
            sources[f"op_overhead_us.{key.value}"] = f"{note} (was {current('overhead', key):g})"
        changes["op_overhead_us"] = overheads
    if free[rows.per_sample].any():
        per_sample = dict(profile.sample_overhead_us)
        for i, key in enumerate(rows.keys):
            per_sample[key] = float(theta[rows.per_sample][i] * 1e6)
            sources[f"sample_overhead_us.{key.value}"] = (
                f"{note} (per sample of the batch; was {current('sample', key):g})")
        changes["sample_overhead_us"] = per_sample
    if free[rows.call]:
        changes["call_overhead_us"] = float(theta[rows.call] * 1e6)
        sources["call_overhead_us"] = f"{note} (was {profile.call_overhead_us or 0:g})"
    description = " ".join(profile.description.split())
    if "Calibrated on" not in description:
        description += f" Calibrated on {n} measured latencies ({when}) by slimsearch calibrate."
    fitted = dataclasses.replace(profile, **changes, sources=sources, description=description,
                                 name=name or profile.name, correction=None)
    if correction is False or len(pairs) < MIN_SAMPLES:
        return fitted
    # a model the roofline gives no time at all (no layers, no call overhead) has no log ratio
    usable = [(*correction_features(layers, fitted, power_mode=power_mode), ms) for layers, ms in pairs]
    usable = [row for row in usable if row[1] > 0]
    if correction is None and len(usable) < MIN_SAMPLES:
        return fitted
    features, roofline, measured = zip(*usable) if usable else ((), (), ())
    learned = fit_correction(features, roofline, measured,
                             source=f"{note} (log of measured over roofline latency; ridge, Tukey biweight loss)")
    return dataclasses.replace(fitted, correction=learned)


def _rows(profile: HardwareProfile, pairs: Sequence[tuple[Sequence, float]], power_mode: str | None) -> _Rows:
    import numpy as np

    mode = profile.power_mode(power_mode)
    clock_scale = mode.clock_mhz / profile.default_power_mode.clock_mhz
    bandwidth = profile.memory_bandwidth_gbps * 1e9
    memo: dict = {}
    layers_seen, measured = [], []
    for index, (layers, measured_ms) in enumerate(pairs):
        for layer in layers:
            precision, work = kernel_work(layer, profile, memo)
            lowered = 0 if profile.memory_overlap else 2 * layer.workspace_bytes
            layers_seen.append((index, layer.op, precision, work / (profile.peak_gops[precision] * 1e9 * clock_scale),
                                (layer.total_bytes + lowered) / bandwidth, layer.batch))
        measured.append(measured_ms * 1e-3)
    if len(measured) < 2:
        raise ConfigError(f"calibrate needs at least two samples, got {len(measured)}")
    # An op type the samples run at several precisions (or that the profile already
    # describes per precision) gets a key per precision; otherwise one key.
    precisions: dict[OpType, set] = {}
    for _, op, precision, *_ in layers_seen:
        precisions.setdefault(op, set()).add(precision)
    tables = (profile.efficiency, profile.op_overhead_us, profile.sample_overhead_us)

    def key_of(op: OpType, precision) -> OpKey:
        split = OpAtPrecision(op, precision)
        if len(precisions[op]) > 1 or any(split in table for table in tables):
            return split
        return op

    keys: dict = {}
    group = []
    for _, op, precision, *_ in layers_seen:
        group.append(keys.setdefault(key_of(op, precision), len(keys)))
    n, g = len(measured), len(keys)
    sample_ix = np.array([row[0] for row in layers_seen], dtype=np.int64)
    group_ix = np.array(group, dtype=np.int64)
    batch = np.array([row[5] for row in layers_seen], dtype=float)
    counts = np.zeros((n, g))
    np.add.at(counts, (sample_ix, group_ix), 1.0)
    sample_counts = np.zeros((n, g))
    np.add.at(sample_counts, (sample_ix, group_ix), batch)
    return _Rows(tuple(keys), sample_ix, group_ix, np.array([row[3] for row in layers_seen]),
                 np.array([row[4] for row in layers_seen]), counts, sample_counts, np.array(measured),
                 profile.memory_overlap, len(set(batch.tolist())))


def _predict_s(rows: _Rows, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Modelled seconds per sample, and which layers are compute-bound, at ``theta``."""
    import numpy as np

    compute = rows.compute_s * theta[rows.group]
    memory = rows.memory_s * theta[rows.mem]
    bound = compute >= memory
    per_layer = np.where(bound, compute, memory) if rows.overlap else compute + memory
    total = np.bincount(rows.sample, weights=per_layer, minlength=len(rows.measured_s))
    return (total + rows.counts @ theta[rows.over] + rows.sample_counts @ theta[rows.per_sample]
            + theta[rows.call]), bound


def _design(rows: _Rows, bound: np.ndarray) -> np.ndarray:
    import numpy as np

    n = len(rows.measured_s)
    design = np.zeros((n, rows.call + 1))
    if not rows.overlap:  # compute plus memory: every layer is in both columns
        bound = np.ones_like(bound)
        design[:, rows.mem] = np.bincount(rows.sample, weights=rows.memory_s, minlength=n)
    for i in range(len(rows.keys)):
        mask = bound & (rows.group == i)
        design[:, i] = np.bincount(rows.sample[mask], weights=rows.compute_s[mask], minlength=n)
    if rows.overlap:
        design[:, rows.mem] = np.bincount(rows.sample[~bound], weights=rows.memory_s[~bound], minlength=n)
    design[:, rows.over] = rows.counts
    design[:, rows.per_sample] = rows.sample_counts
    design[:, rows.call] = 1.0
    return design


def _fit(rows: _Rows, start: np.ndarray, free: np.ndarray, lower: np.ndarray, *, shared: bool,
         robust: bool) -> np.ndarray:
    """Alternate NNLS and bound decisions; ``shared`` ties the per-type overheads to one value.

    First on squared relative error. With ``robust`` the result then starts a second fit
    on the Huber loss of the relative error (iteratively reweighted least squares), whose
    threshold is set from the first fit's residuals (1.345 robust standard deviations,
    the usual 95%-efficiency choice): a measurement far off the model (a run that hit a
    slower clock, a graph the runtime rewrote) then pulls the fit linearly instead of
    quadratically, so the factors describe the bulk of the samples.
    """
    import numpy as np

    over = np.zeros(len(start), dtype=bool)
    over[rows.over] = True
    initial = np.where(free, np.maximum(start, lower), start)
    n_layers = len(rows.group)

    def residual(theta: np.ndarray) -> np.ndarray:
        return _predict_s(rows, theta)[0] / rows.measured_s - 1.0

    def alternate(starts, loss, weights) -> np.ndarray:
        # The alternation finds a local optimum of the bound decisions; it runs from each
        # start (a parameter vector and, optionally, forced first bound decisions) and
        # the best fit is kept.
        best, best_loss = starts[0][0].copy(), loss(starts[0][0])
        for theta, first in starts:
            theta = theta.copy()
            seen: set[bytes] = set()
            for round_ in range(_MAX_ROUNDS):
                bound = _predict_s(rows, theta)[1] if round_ or first is None else first
                key = np.packbits(bound).tobytes()
                if key in seen:
                    break
                seen.add(key)
                for _ in range(_IRLS_STEPS if weights is not None else 1):
                    w = None if weights is None else weights(residual(theta))
                    theta = _solve(rows, bound, theta, start, free, lower, over, shared, w)
                    current = loss(theta)
                    if current < best_loss:
                        best, best_loss = theta.copy(), current
        return best

    squared = alternate(
        [(initial, None), (initial, np.ones(n_layers, dtype=bool)), (initial, np.zeros(n_layers, dtype=bool))],
        lambda theta: float(np.sum(residual(theta) ** 2)), None)
    if not robust:
        return squared
    spread = 1.4826 * float(np.median(np.abs(residual(squared))))
    delta = max(_HUBER_K * spread, _HUBER_FLOOR)

    def huber(r: np.ndarray) -> np.ndarray:
        a = np.abs(r)
        return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))

    def huber_weights(r: np.ndarray) -> np.ndarray:
        return np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))

    return alternate([(squared, None)], lambda theta: float(np.sum(huber(residual(theta)))), huber_weights)


def _solve(rows: _Rows, bound: np.ndarray, theta: np.ndarray, start: np.ndarray, free: np.ndarray,
           lower: np.ndarray, over: np.ndarray, shared: bool, weights: np.ndarray | None = None) -> np.ndarray:
    """The (weighted) NNLS step of :func:`_fit` for fixed bound decisions."""
    import numpy as np

    design = _design(rows, bound) / rows.measured_s[:, None]
    target = np.ones(len(rows.measured_s)) - design[:, ~free] @ theta[~free]
    if weights is not None:
        root = np.sqrt(weights)
        design, target = design * root[:, None], target * root
    # free parameters are lower + z, z >= 0; shared overheads are one column
    columns = [i for i in range(len(theta)) if free[i] and not (shared and over[i])]
    matrix = design[:, columns]
    target = target - matrix @ lower[columns]
    tied = free & over
    if shared and tied.any():
        matrix = np.column_stack([matrix, design[:, tied].sum(axis=1)])
        target = target - design[:, tied] @ lower[tied]
    z = _nnls(matrix, target)
    theta = theta.copy()
    theta[columns] = lower[columns] + z[: len(columns)]
    if shared and tied.any():
        theta[tied] = lower[tied] + z[-1]
    return theta


def _nnls(a: np.ndarray, b: np.ndarray, *, max_iter: int = 500) -> np.ndarray:
    """argmin ||a z - b|| over z >= 0 (Lawson and Hanson's active-set method).

    Columns are scaled to unit norm first so seconds and counts are comparable; an
    all-zero column gets 0.
    """
    import numpy as np

    k = a.shape[1]
    norms = np.linalg.norm(a, axis=0)
    usable = norms > 0
    scaled = np.where(usable, a / np.where(usable, norms, 1.0), 0.0)
    z = np.zeros(k)
    passive = np.zeros(k, dtype=bool)
    tolerance = 1e-12 * max(1.0, float(np.abs(scaled).max(initial=0.0)))
    for _ in range(max_iter):
        gradient = scaled.T @ (b - scaled @ z)
        candidates = ~passive & usable & (gradient > tolerance)
        if not candidates.any():
            break
        passive[int(np.argmax(np.where(candidates, gradient, -np.inf)))] = True
        while True:
            solution = np.zeros(k)
            solution[passive], *_ = np.linalg.lstsq(scaled[:, passive], b, rcond=None)
            if np.all(solution[passive] > 0):
                z = solution
                break
            negative = passive & (solution <= 0)
            step = np.min(z[negative] / (z[negative] - solution[negative]))
            z = z + step * (solution - z)
            passive &= z > tolerance
            z[~passive] = 0.0
    return np.where(usable, z / np.where(usable, norms, 1.0), 0.0)


