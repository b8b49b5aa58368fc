"""slimsearch.search.search on toy problems: front, constraints, screening, determinism, Ray."""

from __future__ import annotations

import pytest

from slimsearch.exceptions import ConfigError
from slimsearch.search import Constraint, Range, search
from slimsearch.search.pareto import dominates

SPACE = {"width": [1, 2, 3, 4, 5, 6], "depth": [1, 2, 3, 4], "bits": [4, 8, 16]}
OBJECTIVES = {"accuracy": "max", "latency_ms": "min"}


def evaluate(p: dict) -> dict:
    accuracy = 1.0 - 1.0 / (p["width"] * p["depth"] + 1) - (0.05 if p["bits"] == 4 else 0.0)
    latency = p["width"] * p["depth"] * p["bits"] / 8.0
    return {"accuracy": accuracy, "latency_ms": latency, "size": p["width"] * p["bits"]}


def estimate(p: dict) -> dict:
    return {"latency_ms": p["width"] * p["depth"] * p["bits"] / 8.0}


@pytest.mark.parametrize("sampler", ["random", "nsga2", "tpe", "auto"])
def test_front_is_the_non_dominated_feasible_evaluated_trials(sampler):
    result = search(SPACE, evaluate, OBJECTIVES, constraints=["size <= 30"], budget=20, sampler=sampler, seed=1)
    assert len(result.evaluated) == 20
    directions = list(OBJECTIVES.values())
    point = lambda t: [t.values[m] for m in OBJECTIVES]  # noqa: E731
    feasible = [t for t in result.evaluated if t.values["size"] <= 30]
    assert result.front and all(t.feasible and t.values["size"] <= 30 for t in result.front)
    for t in result.front:
        assert not any(dominates(point(o), point(t), directions) for o in feasible)
    front_numbers = {t.number for t in result.front}
    for t in feasible:  # every feasible trial off the front is dominated or tied by a front member
        if t.number not in front_numbers:
            assert any(dominates(point(f), point(t), directions) or point(f) == point(t) for f in result.front)
    infeasible = {t.number for t in result.evaluated if t.values["size"] > 30}
    assert infeasible, "the toy problem should produce infeasible trials"
    assert not infeasible & front_numbers


def test_infeasible_trials_never_enter_the_front_even_when_they_dominate():
    space = {"x": [0, 1, 2, 3]}
    result = search(space, lambda p: {"a": p["x"], "b": -p["x"]}, {"a": "max", "b": "max"},
                    constraints=["a < 2"], budget=4, sampler="random")
    assert {t.params["x"] for t in result.front} == {0, 1}  # x=2, 3 are better in a but infeasible
    assert {t.params["x"] for t in result.evaluated if not t.feasible} == {2, 3}


def test_a_constrained_metric_evaluate_does_not_report_makes_the_trial_infeasible():
    result = search({"x": [1, 2, 3]}, lambda p: {"a": p["x"]}, {"a": "max"}, constraints=["energy <= 1"],
                    budget=3, sampler="random")
    assert len(result.evaluated) == 3 and not result.front
    assert all(not t.feasible for t in result.evaluated)


@pytest.mark.parametrize("text, parsed", [
    ("latency_ms <= 20", Constraint("latency_ms", "<=", 20.0)),
    ("latency_ms@jetson-orin-nano<5", Constraint("latency_ms@jetson-orin-nano", "<", 5.0)),
    ("  accuracy_drop>=-0.01 ", Constraint("accuracy_drop", ">=", -0.01)),
    ("size_bytes <= 1e6", Constraint("size_bytes", "<=", 1e6)),
    ("drop == 0", Constraint("drop", "==", 0.0)),
])
def test_constraints_parse(text, parsed):
    assert Constraint.parse(text) == parsed


@pytest.mark.parametrize("text", ["latency_ms = 20", "latency_ms <= twenty", "<= 20", "latency_ms", "a <= 1 <= 2",
                                  "latency_ms <= nan", "latency_ms => 3", 20])
def test_bad_constraints_are_refused_in_one_line_naming_them(text):
    with pytest.raises(ConfigError) as info:
        search(SPACE, evaluate, OBJECTIVES, constraints=[text], budget=1)
    message = str(info.value)
    assert "\n" not in message and repr(text) in message and "<=, >=, ==, <, >" in message


@pytest.mark.parametrize("kwargs, needle", [
    ({"sampler": "cmaes"}, "sampler must be one of ['nsga2', 'tpe', 'random', 'gp', 'auto']"),
    ({"executor": "dask"}, "executor must be one of ['local', 'ray']"),
    ({"budget": 0}, "budget: must be an int >= 1"),
    ({"workers": 0}, "workers: must be an int >= 1"),
    ({"gpus_per_worker": 1.5}, "gpus_per_worker: must be 0, a fraction of a GPU up to 1 or a whole number"),
    ({"gpus_per_worker": -1}, "up to 64, got -1"),
    ({"time_limit_s": 0}, "time_limit_s: must be a number of seconds > 0 or None, got 0"),
    ({"time_limit_s": "10"}, "time_limit_s: must be a number of seconds > 0 or None, got '10'"),
])
def test_bad_arguments_list_what_is_allowed(kwargs, needle):
    args = {"budget": 2, **kwargs}
    with pytest.raises(ConfigError, match=None) as info:
        search(SPACE, evaluate, OBJECTIVES, **args)
    assert needle in str(info.value)


def test_bad_space_and_objectives():
    with pytest.raises(ConfigError, match="space.width"):
        search({"width": []}, evaluate, OBJECTIVES, budget=1)
    with pytest.raises(ConfigError, match="objectives.accuracy"):
        search(SPACE, evaluate, {"accuracy": "up"}, budget=1)
    with pytest.raises(ConfigError, match="low <= high"):
        search({"x": Range(3, 1)}, evaluate, OBJECTIVES, budget=1)


def test_screened_candidates_are_recorded_and_not_counted():
    calls = []

    def counted(p):
        calls.append(p)
        return evaluate(p)

    result = search(SPACE, counted, OBJECTIVES, constraints=["latency_ms <= 6"], budget=10, sampler="random",
                    seed=3, estimate=estimate)
    assert len(result.evaluated) == 10 == len(calls)
    assert result.screened, "random proposals with estimated latency above 6 should be screened"
    for t in result.screened:
        assert t.state.value == "screened" and not t.values and t.screened
        if t.screened.startswith("estimated infeasible"):
            assert t.estimate["latency_ms"] > 6 and not t.feasible
    screened_params = [t.params for t in result.screened if t.screened.startswith("estimated")]
    assert not [p for p in screened_params if p in calls]  # never evaluated
    assert all(evaluate(p)["latency_ms"] <= 6 for p in calls)  # the estimate is exact here


def test_a_candidate_evaluate_scored_only_cheaply_is_recorded_with_its_figures_and_not_counted():
    # multi-fidelity: evaluate says it did not promote a candidate (Metrics.screened); the study
    # prunes it, keeps its cheap figures, and asks for another: the budget counts full evaluations
    from slimsearch.evaluators.metrics import Metrics

    def cheap_or_full(p):
        if p["bits"] == 4:
            return Metrics(values={"accuracy_screen": 0.5}, screened="not promoted: 4 bits")
        return Metrics(values=evaluate(p))

    result = search(SPACE, cheap_or_full, OBJECTIVES, budget=6, sampler="random", seed=5)
    assert len(result.evaluated) == 6 and all(t.params["bits"] != 4 for t in result.evaluated)
    cheap = [t for t in result.screened if t.screened == "not promoted: 4 bits"]
    assert cheap and all(t.values == {"accuracy_screen": 0.5} and t.params["bits"] == 4 for t in cheap)


def test_an_estimate_of_every_objective_screens_candidates_that_cannot_improve_the_front():
    def full(p):
        v = evaluate(p)
        return {"accuracy": v["accuracy"], "latency_ms": v["latency_ms"]}

    result = search(SPACE, evaluate, OBJECTIVES, budget=15, sampler="random", seed=0, estimate=full)
    reasons = [t.screened for t in result.screened]
    assert any(r.startswith("cannot improve the front") for r in reasons)
    assert len(result.evaluated) == 15


def test_screening_is_capped_so_an_exhausted_space_ends_the_search():
    result = search({"x": [1, 2, 3]}, lambda p: {"a": p["x"]}, {"a": "max"}, budget=10, sampler="random")
    assert len(result.evaluated) == 3  # every distinct candidate once
    assert len(result.screened) == 100  # then repeats are screened until the cap, and the search stops


def test_numeric_ranges_and_tuple_shorthand():
    space = {"lr": Range(1e-4, 1e-1, log=True), "units": (8, 64), "ratio": Range(0.0, 1.0, step=0.25)}
    result = search(space, lambda p: {"loss": (p["lr"] - 0.01) ** 2 + p["ratio"], "units": p["units"]},
                    {"loss": "min", "units": "min"}, budget=12, sampler="auto", seed=0)
    for t in result.evaluated:
        assert 1e-4 <= t.params["lr"] <= 1e-1
        assert isinstance(t.params["units"], int) and 8 <= t.params["units"] <= 64
        assert t.params["ratio"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_a_failing_evaluate_fails_that_trial_only():
    def flaky(p):
        if p["width"] == 1:
            raise RuntimeError("out of memory")
        return evaluate(p)

    result = search(SPACE, flaky, OBJECTIVES, budget=12, sampler="random", seed=0)
    failed = [t for t in result.trials if t.state.value == "failed"]
    assert failed and all("RuntimeError: out of memory" in t.error for t in failed)
    assert all(t.params["width"] != 1 for t in result.front)


def test_an_evaluate_past_its_time_limit_fails_that_trial_only():
    import time

    def stuck_when_narrow(p):
        if p["width"] == 1:
            deadline = time.monotonic() + 60  # a limit that does not work fails the test, not hangs it
            while time.monotonic() < deadline:
                time.sleep(0.01)
        return evaluate(p)

    result = search(SPACE, stuck_when_narrow, OBJECTIVES, budget=12, sampler="random", seed=0, time_limit_s=0.5)
    failed = [t for t in result.trials if t.state.value == "failed"]
    assert failed and all(t.params["width"] == 1 for t in failed)
    assert all("TimeoutError: the candidate exceeded its time limit (time_limit_s = 0.5 s" in t.error
               and "(at test_search_api.py:" in t.error for t in failed)
    assert len(result.evaluated) == 12 and all(t.params["width"] != 1 for t in result.front)


@pytest.mark.parametrize("sampler", ["random", "nsga2", "tpe", "auto"])
def test_local_single_worker_is_deterministic_for_a_seed(sampler):
    runs = [search(SPACE, evaluate, OBJECTIVES, constraints=["latency_ms <= 8"], budget=15, sampler=sampler,
                   seed=7, estimate=estimate) for _ in range(2)]
    first, second = ([(t.params, t.state, t.values) for t in r.trials] for r in runs)
    assert first == second
    other = search(SPACE, evaluate, OBJECTIVES, constraints=["latency_ms <= 8"], budget=15, sampler=sampler,
                   seed=8, estimate=estimate)
    assert [t.params for t in other.trials] != [p for p, _, _ in first]


def test_a_search_on_storage_continues_to_the_budget(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = search(SPACE, evaluate, OBJECTIVES, budget=5, sampler="tpe", storage=url)
    assert len(first.evaluated) == 5
    again = search(SPACE, evaluate, OBJECTIVES, budget=8, sampler="tpe", storage=url)
    assert len(again.evaluated) == 8
    assert [t.number for t in again.evaluated[:5]] == [t.number for t in first.evaluated]
    keys = [tuple(sorted(t.params.items())) for t in again.evaluated]
    assert len(set(keys)) == len(keys)  # no candidate evaluated twice


@pytest.mark.slow
def test_ray_executor_runs_the_budget_exactly_once_with_two_workers(tmp_path):
    ray = pytest.importorskip("ray")
    from slimsearch.ray_runtime import start_ray

    start_ray(2)
    try:
        marks = tmp_path / "calls"
        marks.mkdir()

        def touching(p):  # defined here, not at module level, so Ray workers get it by value
            import os
            import uuid

            (marks / f"{os.getpid()}-{uuid.uuid4().hex}").write_text(repr(sorted(p.items())))
            return {"accuracy": p["width"] * p["depth"], "latency_ms": p["width"] * p["bits"]}

        result = search(SPACE, touching, OBJECTIVES, budget=6, sampler="random", seed=0, executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert len(result.evaluated) == 6 and not [t for t in result.trials if t.state.value == "failed"]
    calls = [f.read_text() for f in marks.iterdir()]
    assert len(calls) == 6 and len(set(calls)) == 6
    assert sorted(calls) == sorted(repr(sorted(t.params.items())) for t in result.evaluated)
    assert not ray.is_initialized()
