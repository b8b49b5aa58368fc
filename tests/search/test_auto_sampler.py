"""The `auto` sampler: uses the estimate before evaluating, never repeats, spreads its first trials."""

from __future__ import annotations

from slimsearch.search import search

SPACE = {"a": [0, 1, 2, 3, 4], "b": [0, 1, 2, 3, 4], "c": [0, 1, 2]}
OBJECTIVES = {"score": "max", "cost": "min"}


def evaluate(p: dict) -> dict:
    return {"score": p["a"] + 2 * p["b"] - p["c"], "cost": 1.0 + p["a"] * p["b"] + p["c"]}


def estimate(p: dict) -> dict:
    return {"cost": 1.0 + p["a"] * p["b"] + p["c"]}


def test_auto_proposes_only_estimated_feasible_candidates():
    result = search(SPACE, evaluate, OBJECTIVES, constraints=["cost <= 5"], budget=20, sampler="auto", seed=0,
                    estimate=estimate)
    assert len(result.evaluated) == 20
    assert not result.screened  # it filtered them itself; the driver had nothing to screen
    assert all(t.values["cost"] <= 5 for t in result.evaluated)


def test_auto_never_asks_the_same_params_twice():
    result = search(SPACE, evaluate, OBJECTIVES, budget=40, sampler="auto", seed=1, estimate=estimate)
    keys = [tuple(sorted(t.params.items())) for t in result.trials]
    assert len(keys) == len(set(keys)) and len(result.evaluated) == 40


def test_auto_spreads_its_first_trials_over_the_estimated_cost():
    result = search(SPACE, evaluate, OBJECTIVES, budget=10, sampler="auto", seed=2, estimate=estimate)
    costs = sorted(t.estimate["cost"] for t in result.evaluated)
    assert costs[0] <= 2 and costs[-1] >= 9  # cheap and expensive ends both tried


def test_auto_works_without_an_estimate_and_finds_the_front():
    result = search(SPACE, evaluate, OBJECTIVES, budget=40, sampler="auto", seed=3)
    best_score = max(evaluate(dict(a=a, b=b, c=c))["score"] for a in range(5) for b in range(5) for c in range(3))
    assert max(t.values["score"] for t in result.front) == best_score
    assert min(t.values["cost"] for t in result.front) == 1.0
