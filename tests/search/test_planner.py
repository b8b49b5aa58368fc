"""search/planner.py: the multiple-choice knapsack is exact, keeps its budgets and sweeps a monotone front."""

from __future__ import annotations

import itertools
import random

import pytest

pytest.importorskip("highspy")

from slimsearch.exceptions import ConfigError  # noqa: E402
from slimsearch.search.planner import Problem, Selection, solve, sweep  # noqa: E402


def _random_problem(seed: int, modes: bool = False) -> Problem:
    rng = random.Random(seed)
    options = {}
    names = {}
    for g in range(rng.randint(3, 5)):
        opts = {}
        for k in range(rng.randint(2, 4)):
            name = f"o{k}" if k == 0 or not modes else f"o{k}-{rng.choice('ab')}"
            opts[name] = {"loss": rng.uniform(0, 10), "bytes": float(rng.randint(1, 50)),
                          "ms": rng.uniform(0, 3)}
            if modes and k:
                names[name] = name[-1]
        options[f"g{g}"] = opts
    return Problem(options, base={"bytes": 7.0, "ms": 0.5}, modes=names)


def _brute(problem: Problem, budgets: dict, minimise: str):
    best = None
    groups = list(problem.options)
    for combo in itertools.product(*(problem.options[g] for g in groups)):
        chosen = dict(zip(groups, combo))
        try:
            problem.mode_of(chosen)
        except ConfigError:
            continue
        if all(problem.total(chosen, m) <= b for m, b in budgets.items()):
            value = problem.total(chosen, minimise)
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("modes", [False, True])
def test_the_optimum_matches_brute_force_and_keeps_every_budget(seed, modes):
    problem = _random_problem(seed, modes)
    rng = random.Random(100 + seed)
    low = problem.total({g: min(o, key=lambda k: o[k]["bytes"]) for g, o in problem.options.items()}, "bytes")
    high = problem.total({g: max(o, key=lambda k: o[k]["bytes"]) for g, o in problem.options.items()}, "bytes")
    budgets = {"bytes": rng.uniform(low, high), "ms": 100.0}
    expected = _brute(problem, budgets, "loss")
    if expected is None:
        with pytest.raises(ConfigError):
            solve(problem, budgets, minimise="loss")
        return
    selection = solve(problem, budgets, minimise="loss")
    assert selection.value == pytest.approx(expected, abs=1e-9)
    assert selection.totals["bytes"] <= budgets["bytes"] and selection.totals["ms"] <= budgets["ms"]
    assert selection.totals["bytes"] == problem.total(selection.chosen, "bytes")
    problem.mode_of(selection.chosen)  # one mode


def test_a_budget_met_exactly_is_met():
    problem = Problem({"a": {"f": {"loss": 0.0, "b": 10.0}, "q": {"loss": 1.0, "b": 4.0}},
                       "b": {"f": {"loss": 0.0, "b": 10.0}, "q": {"loss": 3.0, "b": 4.0}}}, base={"b": 1.0})
    selection = solve(problem, {"b": 15.0}, minimise="loss")  # 1 + 4 + 10: the budget to the byte
    assert selection.chosen == {"a": "q", "b": "f"} and selection.totals == {"b": 15.0, "loss": 1.0}
    assert solve(problem, {"b": 14.999}, minimise="loss").chosen == {"a": "q", "b": "q"}


def test_the_fastest_plan_within_a_loss_budget():
    problem = _random_problem(3)
    best = _brute(problem, {"loss": 12.0}, "ms")
    selection = solve(problem, {"loss": 12.0}, minimise="ms")
    assert selection.value == pytest.approx(best, abs=1e-9) and selection.totals["loss"] <= 12.0


def test_an_infeasible_budget_says_so_in_one_line():
    problem = _random_problem(1)
    with pytest.raises(ConfigError) as info:
        solve(problem, {"bytes": 1.0}, minimise="loss")
    assert "no plan meets the budgets" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not a measure"):
        solve(problem, {"flops": 1.0}, minimise="loss")


@pytest.mark.parametrize("seed", range(4))
def test_the_sweep_is_a_front_in_budget_order(seed):
    problem = _random_problem(seed, modes=seed % 2 == 1)
    front = sweep(problem, "bytes", minimise="loss", points=12)
    assert front
    for before, after in zip(front, front[1:]):
        assert after.totals["bytes"] > before.totals["bytes"] and after.value < before.value
        assert after.chosen != before.chosen
    assert front[-1].value == pytest.approx(_brute(problem, {}, "loss"), abs=1e-9)
    for selection in front:  # each point is optimal for its own cost
        assert selection.value == pytest.approx(_brute(problem, {"bytes": selection.totals["bytes"]}, "loss"),
                                                abs=1e-9)


def test_problems_and_selections_round_trip_through_json():
    problem = _random_problem(2, modes=True)
    assert Problem.from_json(problem.to_json()) == problem
    selection = solve(problem, {}, minimise="loss")
    assert Selection.from_json(selection.to_json()) == selection


def test_options_must_give_the_same_measures():
    with pytest.raises(ConfigError, match="must give the measures"):
        Problem({"a": {"x": {"loss": 1.0}, "y": {"loss": 1.0, "b": 2.0}}})
