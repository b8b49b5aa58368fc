"""Pareto front and hypervolume over any number of objectives with mixed directions."""

from __future__ import annotations

from typing import Sequence


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
