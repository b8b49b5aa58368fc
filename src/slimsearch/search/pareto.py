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
