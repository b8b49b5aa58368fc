"""Pareto front and hypervolume over any number of objectives with mixed directions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple, Optional, Sequence

if TYPE_CHECKING:
    import numpy as np


def _as_min(point: Sequence[float], directions: Sequence[str]) -> tuple[float, ...]:
    return tuple(-v if d == "max" else v for v, d in zip(point, directions))


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    am, bm = _as_min(a, directions), _as_min(b, directions)
    return all(x <= y for x, y in zip(am, bm)) and any(x < y for x, y in zip(am, bm))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points; of exact duplicates only the first is kept."""
    if any(d not in ("max", "min") for d in directions):
        raise ValueError(f"directions must be 'max' or 'min', got {list(directions)}")
    keyed = [_as_min(p, directions) for p in points]
    front = []
    for i, p in enumerate(keyed):
        dominated = False
        for j, q in enumerate(keyed):
            if i == j:
                continue
            if all(x <= y for x, y in zip(q, p)) and (any(x < y for x, y in zip(q, p)) or j < i):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def hypervolume_2d(points: Sequence[Sequence[float]], reference: Sequence[float], directions: Sequence[str]) -> float:
    """Exact area dominated by ``points`` and bounded by ``reference`` (two objectives)."""
    if len(directions) != 2:
        raise ValueError(f"hypervolume_2d needs 2 objectives, got {len(directions)}")
    ref = _as_min(reference, directions)
    pts = sorted({_as_min(p, directions) for p in points if all(x < r for x, r in zip(_as_min(p, directions), ref))})
    area, best_y = 0.0, ref[1]
    for x, y in pts:
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def _kept_min_points(points, reference, directions) -> tuple[list[tuple[float, ...]], tuple[float, ...]]:
    """Points in minimisation form that lie strictly inside the reference box, and the box corner."""
    if any(d not in ("max", "min") for d in directions):
        raise ValueError(f"directions must be 'max' or 'min', got {list(directions)}")
    if len(reference) != len(directions):
        raise ValueError(f"reference has {len(reference)} values but there are {len(directions)} objectives")
    ref = _as_min(reference, directions)
    kept = []
    for p in points:
        if len(p) != len(directions):
            raise ValueError(f"a point has {len(p)} values but there are {len(directions)} objectives: {list(p)}")
        q = _as_min(p, directions)
        if all(x < r for x, r in zip(q, ref)):
            kept.append(q)
    return kept, ref


def _hv2_min(pts: list[tuple[float, ...]], ref: Sequence[float]) -> float:
    area, best_y = 0.0, ref[1]
    for x, y in sorted(pts):
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def _hv3_min(pts: list[tuple[float, ...]], ref: Sequence[float]) -> float:
    # Sweep along the third axis: between consecutive z levels the dominated slice is
    # the 2-D hypervolume of the points already passed.
    pts = sorted(pts, key=lambda p: p[2])
    volume = 0.0
    for i, p in enumerate(pts):
        z_next = pts[i + 1][2] if i + 1 < len(pts) else ref[2]
        if z_next > p[2]:
            volume += (z_next - p[2]) * _hv2_min([q[:2] for q in pts[: i + 1]], ref[:2])
    return volume


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float], directions: Sequence[str]) -> float:
    """Exact hypervolume dominated by ``points`` and bounded by ``reference`` (2 or 3 objectives).

    ``directions`` says per objective whether larger ("max") or smaller ("min") is better;
    ``reference`` is the worst corner of the box, and points not strictly better than it in
    every objective add nothing. Two objectives are a sort and a sweep (O(n log n)); three
    sweep the third axis over 2-D slices (O(n^2 log n)), plenty for fronts of hundreds.
    """
    if len(directions) not in (2, 3):
        raise ValueError(f"hypervolume is exact for 2 or 3 objectives, got {len(directions)}")
    kept, ref = _kept_min_points(points, reference, directions)
    if not kept:
        return 0.0
    return _hv2_min(kept, ref) if len(directions) == 2 else _hv3_min(kept, ref)


def hypervolume_improvement_2d(candidates, front, reference) -> "np.ndarray":
    """Hypervolume each candidate alone would add to ``front``, all in minimisation form.

    Vectorised for scoring thousands of candidates at once: the region not yet dominated
    is a staircase of ``len(front) + 1`` columns, and a candidate gains the part of each
    column that lies above and to the right of it.
    """
    import numpy as np

    cand = np.asarray(candidates, dtype=float).reshape(-1, 2)
    ref = np.asarray(reference, dtype=float)
    f = np.asarray(front, dtype=float).reshape(-1, 2)
    f = f[np.all(f < ref, axis=1)]
    f = f[np.argsort(f[:, 0], kind="stable")]
    left = np.concatenate([[-np.inf], f[:, 0]])  # column k spans [left_k, right_k)
    right = np.concatenate([f[:, 0], [ref[0]]])
    height = np.concatenate([[ref[1]], np.minimum.accumulate(f[:, 1])]) if len(f) else np.array([ref[1]])
    width = np.clip(right[None, :] - np.maximum(left[None, :], cand[:, [0]]), 0.0, None)
    rise = np.clip(height[None, :] - cand[:, [1]], 0.0, None)
    return (width * rise).sum(axis=1)


def nondominated(points) -> "np.ndarray":
    """Indices of the points no other point dominates (all minimised; equal points are all kept)."""
    import numpy as np

    p = np.asarray(points, dtype=float)
    keep = [i for i in range(len(p)) if not np.any(np.all(p <= p[i], axis=1) & np.any(p < p[i], axis=1))]
    return np.array(keep, dtype=int)


def hypervolume_improvement(candidates, front, reference) -> "np.ndarray":
    """Hypervolume each candidate would add (minimisation form); rows with inf or NaN add nothing."""
    import numpy as np

    bad = ~np.isfinite(candidates).all(axis=1)
    safe = np.where(np.isfinite(candidates), candidates, np.inf)
    if candidates.shape[1] == 2:
        return np.where(bad, 0.0, hypervolume_improvement_2d(np.where(bad[:, None], reference, safe), front, reference))
    if candidates.shape[1] == 1:
        best = min(front[:, 0].min(), reference[0]) if len(front) else reference[0]
        return np.where(bad, 0.0, np.clip(best - np.where(bad, best, safe[:, 0]), 0.0, None))
    # three or more objectives: exact improvement for the candidates best on a plain sum
    score = np.zeros(len(candidates))
    order = [i for i in np.argsort(safe.sum(axis=1))[:64] if not bad[i]]
    dirs = ["min"] * candidates.shape[1]
    if candidates.shape[1] == 3:
        base = hypervolume(front.tolist(), reference.tolist(), dirs)
        for i in order:
            score[i] = hypervolume(front.tolist() + [candidates[i].tolist()], reference.tolist(), dirs) - base
    else:
        for i in order:  # more than three: how far it gets below the reference, if no front member dominates it
            c = candidates[i]
            if not len(front) or not np.any(np.all(front <= c, axis=1)):
                score[i] = float(np.prod(np.clip(reference - c, 0.0, None)))
    return score


# ---------------------------------------------------------------- a job's hypervolume

COST_FACTOR = 4.0  # a minimised objective's reference is this many times the teacher's value


class Reference(NamedTuple):
    """The box hypervolume is measured in: the worst corner and a unit per objective.

    Divided by its unit, every axis is in teacher units, so the uncompressed teacher
    alone would have hypervolume 1.0 (when the reference comes from the teacher).
    """

    point: tuple[float, ...]
    scale: tuple[float, ...]
    rule: str


def hypervolume_reference(objectives: Mapping[str, str], teacher: Optional[Mapping[str, float]],
                          candidates: Sequence[Mapping] = ()) -> Reference:
    """The reference point of a job's hypervolume.

    From the teacher when it has a positive value for every objective: half its score
    for a maximised objective, four times its cost for a minimised one, so a candidate
    counts while it keeps half the teacher's score and costs at most four times as much
    (a quantized graph can run slower than the float teacher on a CPU). It
    is known before the first candidate, so the series logged during a run and the one
    drawn afterwards agree. Otherwise (no teacher value, or a value of 0): the worst
    value among the candidates, widened by a tenth of their range.
    """
    names = list(objectives)
    vals = [teacher.get(n) if teacher else None for n in names]
    if all(v is not None and v > 0 for v in vals):
        point = tuple(v / 2 if objectives[n] == "max" else COST_FACTOR * v for n, v in zip(names, vals))
        return Reference(point, tuple(abs(p - v) for p, v in zip(point, vals)),
                         f"teacher: half its score, {COST_FACTOR:g}x its cost; 1.0 = the teacher's box")
    point, scale = [], []
    for n in names:
        seen = [c["metrics"][n] for c in candidates if c["metrics"].get(n) is not None]
        if not seen:
            raise ValueError(f"no candidate has a value for objective {n!r}: no hypervolume reference")
        lo, hi = min(seen), max(seen)
        span = (hi - lo) or abs(hi) or 1.0
        point.append(lo - span / 10 if objectives[n] == "max" else hi + span / 10)
        scale.append(span)
    return Reference(tuple(point), tuple(scale), "worst candidate plus a tenth of the range")


MAX_SLICED_POINTS = 300  # beyond 3 objectives the sliced hypervolume grows as n^(d-1) log n


def _hv_min_sliced(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Exact hypervolume of minimisation ``points`` inside ``ref``, any number of objectives, by
    slicing along the last axis (HSO); 1-D is a length."""
    if not points:
        return 0.0
    if len(ref) == 1:
        return max(0.0, ref[0] - min(p[0] for p in points))
    pts = sorted(points, key=lambda p: p[-1])
    volume = 0.0
    for i, p in enumerate(pts):
        top = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
        if top > p[-1]:
            volume += (top - p[-1]) * _hv_min_sliced([q[:-1] for q in pts[: i + 1]], ref[:-1])
    return volume


def _hv_sliced(points, reference, directions) -> float:
    ref = tuple(-r if d == "max" else r for r, d in zip(reference, directions))
    pts = [tuple(-v if d == "max" else v for v, d in zip(p, directions)) for p in points]
    return _hv_min_sliced([p for p in pts if all(x < r for x, r in zip(p, ref))], ref)


def _hv_function(n_objectives: int, n_points: int = 0):
    """An exact hypervolume for this many objectives: the sweeps of :func:`hypervolume` for 2 and 3,
    slicing otherwise (None past ``MAX_SLICED_POINTS`` points with 4 or more)."""
    if n_objectives in (2, 3):
        return hypervolume
    if n_points <= MAX_SLICED_POINTS:
        return _hv_sliced
    return None


def hypervolume_series(candidates: Sequence[Mapping], objectives: Mapping[str, str],
                       reference: Reference) -> Optional[list[float]]:
    """Hypervolume (in reference units) of the first 1, 2, ... candidates in trial order; None when it
    is not computed (one objective, or more than three with more than ``MAX_SLICED_POINTS`` candidates).

    A candidate marked ``"feasible": False`` (it breaks a job constraint) counts as an evaluation
    but adds no volume: the hypervolume is the front's, and such a candidate never enters the front.
    """
    names, dirs = list(objectives), list(objectives.values())
    hv = _hv_function(len(names), len(candidates)) if len(names) >= 2 else None
    if hv is None:
        return None
    ref = [0.0 if d == "max" else 1.0 for d in dirs]  # the reference corner, in scaled units
    scaled = []
    out = []
    for c in sorted(candidates, key=lambda c: c["trial"]):
        m = c["metrics"]
        if c.get("feasible", True) and all(m.get(n) is not None for n in names):
            scaled.append([(m[n] - r) / s if d == "max" else (m[n] - r) / s + 1.0
                           for n, d, r, s in zip(names, dirs, reference.point, reference.scale)])
        out.append(float(hv(scaled, ref, dirs)) if scaled else 0.0)
    return out
