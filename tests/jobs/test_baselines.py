"""A causal-LM job's uniform recipes: which they are, and that a resumed job evaluates only those it lacks.

``evaluate`` is replaced by a FAKE here (it counts calls and returns fixed metrics): what is tested is
the bookkeeping; the real evaluation of every recipe runs in tests/jobs/test_causal_lm_job.py.
"""

import json

from slimsearch.evaluators.metrics import Metrics, Provenance
from slimsearch.jobs.baselines import BASELINES_FILE, baseline_plans, load_baselines, run_baselines

GROUPS = ("qkv", "o", "gate_up", "down")


class FakeTask:
    layers = GROUPS


def fake_evaluate(calls):
    def evaluate(task, plan, profiles, *, teacher_score, device, reference=None):
        calls.append(plan)
        if plan.weight_method == "awq":
            raise RuntimeError("no calibration text")
        return Metrics(values={"ppl": 20.0, "decode_tok_s@local": 50.0},
                       provenance={"decode_tok_s@local": Provenance.MEASURED})
    return evaluate


def test_the_recipes_are_uniform_over_every_group():
    plans = baseline_plans(GROUPS)
    assert list(plans) == ["rtn-w4g128", "gptq-w4g128", "awq-w4g128", "rtn-w8g128", "w8a8-smoothquant"]
    for name, plan in plans.items():
        assert set(plan.layers) == set(GROUPS) and len(set(plan.layers.values())) == 1
    w8a8 = plans["w8a8-smoothquant"].layers["down"]
    assert (w8a8.weight_bits, w8a8.group_size, w8a8.act_bits) == (8, 0, 8)
    assert plans["gptq-w4g128"].weight_method == "gptq" and plans["gptq-w4g128"].layers["o"].weight_bits == 4
    assert all(plan.power_modes == {} for plan in plans.values())
    moded = baseline_plans(GROUPS, {"jetson-orin-nano": "15W"})
    assert all(plan.power_modes == {"jetson-orin-nano": "15W"} for plan in moded.values())


def test_a_second_run_evaluates_only_the_recipes_missing_and_a_failure_does_not_stop_the_rest(tmp_path):
    calls, logged = [], []
    entries = run_baselines(FakeTask(), [], tmp_path, teacher_score=19.0, log=logged.append,
                            evaluate=fake_evaluate(calls))
    assert len(calls) == 5 and [e["name"] for e in entries] == [
        "rtn-w4g128", "gptq-w4g128", "rtn-w8g128", "w8a8-smoothquant"]
    assert any("baseline awq-w4g128 failed: RuntimeError: no calibration text" in line for line in logged)
    assert entries[0]["provenance"] == {"decode_tok_s@local": "measured"}
    assert [e["name"] for e in load_baselines(tmp_path)] == [e["name"] for e in entries]
    again = run_baselines(FakeTask(), [], tmp_path, teacher_score=19.0, log=logged.append,
                          evaluate=fake_evaluate(calls))
    assert len(calls) == 6 and calls[-1].weight_method == "awq"  # only the one that failed is tried again
    assert again == entries


def test_a_recorded_recipe_whose_plan_changed_is_evaluated_again(tmp_path):
    calls = []
    run_baselines(FakeTask(), [], tmp_path, teacher_score=19.0, log=lambda _: None, evaluate=fake_evaluate(calls))
    recorded = json.loads((tmp_path / BASELINES_FILE).read_text())
    recorded[0]["plan"]["weight_method"] = "an older recipe"
    (tmp_path / BASELINES_FILE).write_text(json.dumps(recorded))
    run_baselines(FakeTask(), [], tmp_path, teacher_score=19.0, log=lambda _: None, evaluate=fake_evaluate(calls))
    assert [p.weight_method for p in calls[5:]] == ["rtn", "awq"]
