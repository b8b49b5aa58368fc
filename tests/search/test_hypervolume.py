"""hypervolume (exact, 2-D and 3-D) and hypervolume_improvement_2d against moocore on random point sets."""

from __future__ import annotations

import numpy as np
import pytest

from slimsearch.search.pareto import hypervolume, hypervolume_improvement_2d

moocore = pytest.importorskip("moocore")


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("dims", [2, 3])
def test_hypervolume_matches_moocore(seed, dims):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    # rounded values: ties and duplicates; some points beyond the reference add nothing
    points = np.round(rng.random((n, dims)) * 1.2, 2)
    reference = np.ones(dims)
    ours = hypervolume(points.tolist(), reference.tolist(), ["min"] * dims)
    inside = points[np.all(points < reference, axis=1)]
    expected = float(moocore.hypervolume(inside, ref=reference)) if len(inside) else 0.0
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_mixed_directions_are_mirrored_minimisation(seed):
    rng = np.random.default_rng(100 + seed)
    points = rng.random((30, 3))
    directions = ["max", "min", "max"]
    reference = [0.1, 0.9, 0.2]
    flipped = points * np.array([-1, 1, -1])
    ref_flipped = np.array(reference) * np.array([-1, 1, -1])
    inside = flipped[np.all(flipped < ref_flipped, axis=1)]
    expected = float(moocore.hypervolume(inside, ref=ref_flipped)) if len(inside) else 0.0
    assert hypervolume(points.tolist(), reference, directions) == pytest.approx(expected, rel=1e-12)


def test_hand_computed_values():
    assert hypervolume([[1, 1]], [2, 2], ["min", "min"]) == 1.0
    assert hypervolume([[0, 1], [1, 0]], [2, 2], ["min", "min"]) == 3.0
    assert hypervolume([[0, 0, 0]], [1, 2, 3], ["min"] * 3) == 6.0
    assert hypervolume([], [1, 1], ["min", "min"]) == 0.0
    assert hypervolume([[5, 5]], [1, 1], ["min", "min"]) == 0.0


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(ValueError, match="2 or 3 objectives"):
        hypervolume([[1, 2, 3, 4]], [5, 5, 5, 5], ["min"] * 4)
    with pytest.raises(ValueError, match="'max' or 'min'"):
        hypervolume([[1, 2]], [3, 3], ["min", "up"])
    with pytest.raises(ValueError, match="3 values but there are 2 objectives"):
        hypervolume([[1, 2, 3]], [3, 3], ["min", "min"])


@pytest.mark.parametrize("seed", range(5))
def test_improvement_2d_equals_difference_of_hypervolumes(seed):
    rng = np.random.default_rng(seed)
    front = rng.random((int(rng.integers(0, 25)), 2))
    candidates = rng.random((40, 2)) * 1.1
    reference = [1.0, 1.0]
    base = float(moocore.hypervolume(front, ref=reference)) if len(front) else 0.0
    expected = []
    for c in candidates:
        both = np.vstack([front, c[None, :]])
        both = both[np.all(both < reference, axis=1)]
        expected.append((float(moocore.hypervolume(both, ref=reference)) if len(both) else 0.0) - base)
    np.testing.assert_allclose(hypervolume_improvement_2d(candidates, front, reference), expected, atol=1e-12)
