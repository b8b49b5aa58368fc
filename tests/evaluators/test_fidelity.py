"""The multi-fidelity screen of causal-LM candidates: its rule, and the candidates it promotes."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("transformers")

from slimsearch.compress import apply_plan  # noqa: E402
from slimsearch.evaluators import evaluate  # noqa: E402
from slimsearch.evaluators.fidelity import Rung, Screen, best_first  # noqa: E402
from slimsearch.exceptions import ConfigError  # noqa: E402
from slimsearch.spaces.plan import CompressionPlan, LayerPlan  # noqa: E402
from slimsearch.tasks import load_task  # noqa: E402
from tests import _tiny_llm  # noqa: E402
from tests._cli import local_job  # noqa: E402
from tests._tiny_llm import one_thread  # noqa: F401, E402 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    text = _tiny_llm.patterned_text(root / "walks.txt")  # learnable: 2-bit weights then double the perplexity
    return load_task(f"causal-lm:{_tiny_llm.trained_folder(root / 'tiny', text)}", text=str(text))


def _bits(task, bits: int) -> CompressionPlan:
    return CompressionPlan(layers={g: LayerPlan(weight_bits=bits, group_size=32) for g in task.layers})


def test_the_teacher_is_promoted_and_a_candidate_far_beyond_the_bound_is_not(task):
    screen = Screen(0.01)
    figures, reason = screen.judge(task.teacher, task)
    assert reason is None and figures["ppl_increase_screen"] == pytest.approx(0.0, abs=1e-9)
    crushed = apply_plan(task, _bits(task, 2))
    figures, reason = screen.judge(crushed, task)
    assert reason.startswith("not promoted: ppl_increase") and figures["ppl_increase_screen"] > 0.02
    n = round(len(task.val.x) * 0.25)
    assert figures["fidelity"] == pytest.approx(n / len(task.val.x)) and f"on {n} of {len(task.val.x)}" in reason


def test_a_screened_candidate_has_its_cheap_figures_and_untimed_costs_and_a_promoted_one_everything(task):
    teacher_ppl = task.scorer(task.teacher, task.val, False)["ppl"]
    out = evaluate(task, _bits(task, 2), [], teacher_score=teacher_ppl, screen=Screen(0.01))
    assert out.screened and "ppl" not in out.values and "latency_ms@local" not in out.values
    assert out.values["size_bytes"] > 0 and out.values["ppl_screen"] > teacher_ppl
    full = evaluate(task, _bits(task, 8), [], teacher_score=teacher_ppl, screen=Screen(1.0))
    assert full.screened is None and full.values["fidelity"] == 1.0
    assert full.values["ppl"] > 0 and full.values["ppl_screen"] > 0 and full.values["decode_tok_s@local"] > 0


@pytest.mark.parametrize("kwargs", [{"max_increase": -0.1}, {"max_increase": 0.05, "share": 1.0},
                                    {"max_increase": 0.05, "slack": 0.5}])
def test_a_screen_outside_its_range_is_refused(kwargs):
    with pytest.raises(ConfigError, match="allowed: max_increase >= 0, 0 < share < 1, slack >= 1"):
        Screen(**kwargs)


def _point(increase: float, memory: float) -> dict:
    return {"ppl_increase_screen": increase, "memory_bytes": memory}


def _after(points, promoted: int = 0, planned: bool = False) -> Screen:
    return Screen(0.05, objectives=(("memory_bytes", "min"), ("decode_tok_s@local", "max")),
                  rung=Rung(points=tuple(points), promoted=promoted, planned=planned))


def test_best_first_orders_as_nsga_ii_selects():
    # fronts {0, 1, 2} then {3} then {4}; in the first, the two ends (infinitely crowded) before the middle,
    # the ends by their first objective
    assert best_first([(1, 5), (2, 4), (3, 3), (2, 6), (5, 5)]) == [0, 2, 1, 3, 4]


def test_the_rule_promotes_the_best_cheap_points_within_the_bound_and_the_quota():
    earlier = [_point(0.02, 100.0), _point(0.03, 90.0), _point(0.09, 50.0), _point(0.2, 10.0)]
    assert _after([]).promotion(_point(0.09, 500.0)) is None  # the first within the bound
    assert "exceeds 2 x 0.05" in _after([]).promotion(_point(0.11, 1.0))
    # 5 judged: the best 2 are promoted; the one beyond the bound is no rival
    assert _after(earlier, promoted=1).promotion(_point(0.01, 40.0)) is None  # dominates every rival
    ranked = _after(earlier, promoted=1).promotion(_point(0.04, 95.0))  # dominated by (0.03, 90)
    assert "ranks 4 of the 4 within the bound on (ppl_increase_screen, memory_bytes); the best 2" in ranked
    full = _after(earlier, promoted=2).promotion(_point(0.01, 40.0))
    assert "2 of the 5 candidates judged so far were promoted" in full
    # the planner's plans need only the bound
    assert _after(earlier, promoted=2, planned=True).promotion(_point(0.04, 95.0)) is None
    assert "exceeds" in _after(earlier, planned=True).promotion(_point(0.2, 1.0))


def test_a_job_promotes_at_most_its_share_of_the_candidates_it_judges():
    rng, points, promoted = random.Random(0), [], 0
    for n in range(1, 61):
        point = _point(rng.uniform(0.0, 0.12), rng.uniform(1.0, 3.0))
        promoted += _after(points, promoted).promotion(point) is None
        points.append(point)
        assert promoted <= max(1, int(0.4 * n + 1e-9)), n
    assert promoted >= 15, "a rule that promotes nothing would pass the line above"


def test_a_job_records_its_rule_and_counts_only_promoted_candidates(tmp_path):
    text = _tiny_llm.patterned_text(tmp_path / "walks.txt")
    run = local_job(tmp_path, {
        "name": "lm-fidelity", "task": f"causal-lm:{_tiny_llm.trained_folder(tmp_path / 'tiny', text)}",
        "text": [str(text)],
        "space": {"weight_bits": [2, 8, 32], "group_size": [32], "kv_bits": [32]},
        "objectives": {"ppl": "min", "size_bytes": "min"}, "constraints": ["ppl_increase <= 0.02"],
        "profiles": [], "search": {"budget": 3, "workers": 1, "sampler": "random", "seed": 2, "baselines": False}})
    front = json.loads((run.out / "front.json").read_text())
    assert len(front["candidates"]) == 3 and all(c["metrics"]["fidelity"] == 1.0 for c in front["candidates"])
    judged = len(front["candidates"]) + len(front["screened"])
    assert len(front["candidates"]) <= 0.4 * judged, "at most 40% of the candidates judged are evaluated in full"
    reasons = [s["reason"] for s in front["screened"]]
    assert any("exceeds 2 x 0.02" in r for r in reasons), "a 2-bit group doubles the perplexity: beyond the bound"
    for s in front["screened"]:
        assert s["reason"].startswith("not promoted") and s["metrics"]["fidelity"] < 1.0
        if "exceeds" in s["reason"]:
            assert s["metrics"]["ppl_increase_screen"] > 0.04
    rung = json.loads((run.out / "screen_rung.json").read_text())  # as written after the last trial
    assert rung["promoted"] == 3 and len(rung["points"]) == judged
    from mlflow import MlflowClient

    client = MlflowClient(json.loads((run.out / "job.json").read_text())["tracking_uri"])
    parent = client.get_run(json.loads((run.out / "job.json").read_text())["parent_run_id"])
    assert parent.data.params["promotion_rule"].startswith("scored first on 25% of the validation windows")
    import optuna

    state = json.loads((run.out / "job.json").read_text())
    study = optuna.load_study(study_name=state["study_name"], storage=state["storage"])
    for c in front["candidates"]:  # a promoted candidate's full figures, not its cheap ones, in Optuna and MLflow
        metrics = c["metrics"]
        assert metrics["ppl"] != metrics["ppl_screen"]
        assert study.trials[c["trial"]].values[0] == pytest.approx(metrics["ppl"])
        logged = client.get_run(c["run_id"]).data.metrics
        assert logged["fidelity"] == 1.0 and logged["ppl"] == pytest.approx(metrics["ppl"])
    for s in front["screened"]:
        assert study.trials[s["trial"]].state == optuna.trial.TrialState.PRUNED and "ppl" not in s["metrics"]
