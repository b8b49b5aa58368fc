"""pareto_front, dominates and hypervolume_2d against brute force and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from slimsearch.search.pareto import dominates, hypervolume_2d, pareto_front


def _better_or_equal(a: float, b: float, direction: str) -> bool:
    return a >= b if direction == "max" else a <= b


def _brute_dominates(a, b, directions) -> bool:
    """Written out independently of the module: no worse anywhere, strictly better somewhere."""
    no_worse = all(_better_or_equal(x, y, d) for x, y, d in zip(a, b, directions))
    return no_worse and any(x != y for x, y in zip(a, b))


def _brute_front(points, directions) -> list[int]:
    """Non-dominated points; of exact duplicates the first one."""
    out = []
    for i, p in enumerate(points):
        if any(_brute_dominates(q, p, directions) for q in points):
            continue
        if any(tuple(points[j]) == tuple(p) for j in range(i)):
            continue
        out.append(i)
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("directions", [["max", "min"], ["min", "max", "max"], ["max", "min", "min", "max"]])
def test_front_matches_brute_force_on_random_points(seed, directions):
    rng = np.random.default_rng(seed)
    # Small integers: many ties and exact duplicates, where mistakes hide.
    points = rng.integers(0, 6, size=(int(rng.integers(1, 40)), len(directions))).tolist()
    front = pareto_front(points, directions)
    assert front == _brute_front(points, directions)
    for i in front:
        for j in front:
            assert not _brute_dominates(points[i], points[j], directions)
    for k in set(range(len(points))) - set(front):
        assert any(_brute_dominates(points[i], points[k], directions) or points[i] == points[k] for i in front)


def test_front_of_float_points_with_mixed_directions():
    # (accuracy: max, size: min)
    points = [(0.90, 300.0), (0.95, 500.0), (0.85, 350.0), (0.95, 400.0), (0.80, 100.0)]
    assert pareto_front(points, ["max", "min"]) == [0, 3, 4]


def test_exact_duplicates_keep_the_first_only():
    points = [(1.0, 2.0), (0.0, 3.0), (1.0, 2.0), (0.0, 3.0), (2.0, 2.0)]
    assert pareto_front(points, ["min", "min"]) == [0, 1]
    # a duplicated dominated point stays out altogether
    assert pareto_front(points, ["max", "min"]) == [4]


def test_single_and_empty_inputs():
    assert pareto_front([], ["max", "min"]) == []
    assert pareto_front([(3.0, 4.0)], ["max", "min"]) == [0]


def test_bad_direction_lists_the_allowed_values():
    with pytest.raises(ValueError, match="'max' or 'min'"):
        pareto_front([(1, 2)], ["max", "minimize"])


def test_dominates_respects_each_direction():
    assert dominates((0.9, 10), (0.8, 10), ["max", "min"])
    assert not dominates((0.9, 10), (0.9, 10), ["max", "min"])
    assert not dominates((0.9, 11), (0.8, 10), ["max", "min"])
    assert dominates((0.9, 11), (0.8, 10), ["max", "max"])


def test_hypervolume_of_a_hand_computed_staircase():
    # min/min, reference (4, 4): slabs x in [1,2) height 1, [2,3) height 2, [3,4) height 3
    points = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume_2d(points, (4, 4), ["min", "min"]) == pytest.approx(6.0)
    # a dominated point, a duplicate and a point beyond the reference add nothing
    more = points + [(3, 3), (2, 2), (5, 0), (0, 4)]
    assert hypervolume_2d(more, (4, 4), ["min", "min"]) == pytest.approx(6.0)


def test_hypervolume_with_a_maximized_objective():
    # (accuracy: max, size: min), reference (accuracy 0.5, size 10)
    # (0.9, 6): box 0.4 x 4; (0.7, 2) adds accuracy 0.5..0.7 over sizes 2..10 minus the overlap
    points = [(0.9, 6.0), (0.7, 2.0)]
    expected = 0.4 * 4 + (0.7 - 0.5) * (6 - 2)
    assert hypervolume_2d(points, (0.5, 10.0), ["max", "min"]) == pytest.approx(expected)
    assert hypervolume_2d([(0.4, 1.0)], (0.5, 10.0), ["max", "min"]) == 0.0


def _grid_estimate(points, reference, directions, n=500) -> float:
    """Share of a grid of cell centres over the reference box that some point dominates."""
    pts = np.array(points, dtype=float)
    ref = np.array(reference, dtype=float)
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    pts, ref = pts * sign, ref * sign  # now both minimized
    lo = pts.min(0)
    xs = lo[0] + (np.arange(n) + 0.5) * (ref[0] - lo[0]) / n
    ys = lo[1] + (np.arange(n) + 0.5) * (ref[1] - lo[1]) / n
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    covered = np.zeros_like(gx, dtype=bool)
    for x, y in pts:
        covered |= (gx >= x) & (gy >= y)
    return covered.mean() * (ref[0] - lo[0]) * (ref[1] - lo[1])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("directions", [["min", "min"], ["max", "min"], ["max", "max"]])
def test_hypervolume_agrees_with_a_grid_estimate(seed, directions):
    rng = np.random.default_rng(100 + seed)
    points = rng.uniform(0.0, 1.0, size=(int(rng.integers(3, 25)), 2))
    reference = [0.0 if d == "max" else 1.0 for d in directions]
    exact = hypervolume_2d(points.tolist(), reference, directions)
    assert exact > 0
    # a staircase of total edge length <= 2 on a 500x500 grid: error well under 0.01
    assert exact == pytest.approx(_grid_estimate(points, reference, directions), abs=0.01)
    front = pareto_front(points.tolist(), directions)
    assert hypervolume_2d(points[front].tolist(), reference, directions) == pytest.approx(exact)


def test_hypervolume_needs_two_objectives():
    with pytest.raises(ValueError, match="2 objectives"):
        hypervolume_2d([(1, 2, 3)], (4, 4, 4), ["min", "min", "min"])
