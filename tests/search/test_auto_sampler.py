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


# A structured space like a NAS cell: five slots, five ops each (3,125 candidates). Accuracy
# grows a little with capacity and much more with structure (a skip right before a conv, a
# 1x1 conv last), latency with the ops' costs; the estimate knows the costs (a spec sheet,
# 40% off) but nothing of accuracy.
OPS = ["none", "skip", "conv1x1", "conv3x3", "pool"]
CELL = {f"edge{i}": OPS for i in range(5)}
COST = {"none": 0.0, "skip": 0.2, "conv1x1": 1.0, "conv3x3": 2.5, "pool": 0.5}
OBJECTIVES_CELL = {"accuracy": "max", "latency_ms": "min"}


def cell_evaluate(p: dict) -> dict:
    import math

    ops = list(p.values())
    accuracy = 60 + 4 * math.log1p(2.5 * ops.count("conv3x3") + ops.count("conv1x1")) \
        + 4 * sum(a == "skip" and b in ("conv3x3", "conv1x1") for a, b in zip(ops, ops[1:])) \
        + 2 * (ops[-1] == "conv1x1") - 15 * (ops.count("none") >= 3)
    noise = (sum((i + 1) * OPS.index(o) ** 2 for i, o in enumerate(ops)) % 17) / 17 - 0.5  # fixed per cell
    return {"accuracy": accuracy + noise, "latency_ms": 1.0 + sum(COST[o] for o in ops) + 0.1 * len(set(ops))}


def cell_estimate(p: dict) -> dict:
    return {"latency_ms": 0.6 * (1.0 + sum(COST[o] for o in p.values()))}


def _corner_ratio(points: list[tuple[float, float]], everything: list[tuple[float, float]]) -> float:
    """Hypervolume of ``points`` in the box (75th-percentile accuracy, median latency) over that of the space."""
    import statistics

    from slimsearch.search.pareto import hypervolume

    acc = sorted(a for a, _ in everything)
    ref = (statistics.quantiles(acc, n=4)[2], statistics.median(l for _, l in everything))
    return hypervolume(points, ref, ["max", "min"]) / hypervolume(everything, ref, ["max", "min"])


def test_auto_finds_more_of_the_accurate_fast_corner_than_random_search():
    import itertools

    everything = [tuple(cell_evaluate(dict(zip(CELL, ops))).values()) for ops in itertools.product(OPS, repeat=5)]
    ratios = {}
    for sampler in ("auto", "random"):
        runs = [search(CELL, cell_evaluate, OBJECTIVES_CELL, budget=30, sampler=sampler, seed=seed,
                       estimate=cell_estimate) for seed in (0, 1)]
        ratios[sampler] = [_corner_ratio([(t.values["accuracy"], t.values["latency_ms"]) for t in r.evaluated],
                                         everything) for r in runs]
    assert min(ratios["auto"]) > max(ratios["random"]), ratios


def test_a_slow_estimate_is_called_a_bounded_number_of_times_per_proposal():
    import time

    import optuna

    from slimsearch.search.samplers.auto import FrontSampler
    from slimsearch.search._teller import suggest

    space = {f"layer{i}": [2, 4, 8, 16] for i in range(10)}  # a million plans: not enumerated
    calls = []

    def slow_estimate(p: dict) -> dict:
        calls.append(p)
        time.sleep(0.006)  # like building and costing a compressed model
        return {"size": float(sum(p.values()))}

    sampler = FrontSampler(seed=0, estimate=slow_estimate, space=space, n_startup=3, estimate_seconds=0.05)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.set_metric_names(["score", "size"])
    asked, made = [], []
    for _ in range(6):
        before = len(calls)
        trial = study.ask()
        params = suggest(trial, space)
        made.append(calls[before:])  # the estimates this proposal made
        asked.append(tuple(params.values()))
        study.tell(trial, [sum(v ** 0.5 for v in params.values()), float(sum(params.values()))])
    # 16 calls tell it the estimate is slow; from then on at most 16 new ones per proposal
    # (without the cap each proposal would estimate its 1,000 random candidates)
    assert len(calls) <= 6 * 16
    assert len(set(asked)) == 6
    # after the startup, the few estimates go to the front's neighbours as well as to random points
    # (a random point of 4**10 is almost never one change from a told plan)
    for k in (3, 4, 5):
        near = [c for c in made[k] if any(sum(a != b for a, b in zip(c.values(), t)) == 1 for t in asked[:k])]
        assert 0 < len(near) < len(made[k]), (k, len(near), len(made[k]))


def _proposals(sampler, n: int = 6) -> list[dict]:
    import optuna

    from slimsearch.search._teller import suggest

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    out = []
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, BIG_SPACE)
        study.tell(trial, list(evaluate_big(params).values()))
        out.append(params)
    return out


BIG_SPACE = {name: list(range(100)) for name in ("a", "b", "c")}


def evaluate_big(p: dict) -> dict:
    return {"score": p["a"] - p["b"], "cost": p["a"] + p["c"]}


def test_auto_repeats_for_a_seed_and_proposes_anew_once_reseeded():
    from slimsearch.search.samplers.auto import FrontSampler

    def sampler():  # with the space given, every proposal is its own (none from its random sampler)
        return FrontSampler(seed=4, space=BIG_SPACE)

    assert _proposals(sampler()) == _proposals(sampler())
    reseeded = sampler()
    reseeded.reseed_rng()  # what Optuna does for each thread of optimize(n_jobs=...)
    assert _proposals(reseeded) != _proposals(sampler())
