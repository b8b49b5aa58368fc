"""The multi-fidelity screen of causal-LM candidates: its rule, and the candidates it promotes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from slimsearch.compress import apply_plan  # noqa: E402
from slimsearch.evaluators import evaluate  # noqa: E402
from slimsearch.evaluators.fidelity import Screen  # noqa: E402
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
    assert front["screened"], "a 2-bit group doubles the perplexity: some candidates are not promoted"
    for s in front["screened"]:
        assert s["reason"].startswith("not promoted") and s["metrics"]["ppl_increase_screen"] > 0.04
    from mlflow import MlflowClient

    client = MlflowClient(json.loads((run.out / "job.json").read_text())["tracking_uri"])
    parent = client.get_run(json.loads((run.out / "job.json").read_text())["parent_run_id"])
    assert parent.data.params["promotion_rule"].startswith("scored first on 25% of the validation windows")
