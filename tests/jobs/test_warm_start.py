"""The planner's start of a causal-LM job searched by ``auto`` (jobs/warm_start.py): the plans it
enqueues lie in the job's space and within its predicted bound, its perplexity prediction, and its
sensitivity table read back from the job folder, by a second start and by ``--resume``."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("highspy")

from slimsearch.jobs.load import load_job  # noqa: E402
from tests import _tiny_llm  # noqa: E402
from tests._cli import cli, local_job, write_job  # noqa: E402
from tests._tiny_llm import one_thread  # noqa: E402, F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = {"weight_bits": [2, 4, 8, 32], "kv_bits": [8, 32], "ffn_keep": [0.5, 1.0]}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm-start")
    _tiny_llm.patterned_text(root / "notes.txt")
    _tiny_llm.trained_folder(root / "tiny", root / "notes.txt")  # learned: rounding its weights costs perplexity
    return root


def job_data(root, budget: int, name: str = "warm") -> dict:
    return {"name": name, "task": f"causal-lm:{root / 'tiny'}", "text": [str(root / "notes.txt")], "space": SPACE,
            "objectives": {"ppl": "min", "memory_bytes": "min"}, "constraints": ["ppl_increase <= 0.3"],
            "profiles": ["raspberry-pi-4"], "search": {"budget": budget, "workers": 1, "sampler": "auto",
                                                       "baselines": False}}


def test_the_enqueued_plans_lie_in_the_space_within_the_bound_and_the_table_is_read_back(made, tmp_path,
                                                                                           monkeypatch):
    import optuna

    from slimsearch import compress
    from slimsearch.evaluators import llm_sensitivity
    from slimsearch.evaluators.candidate import task_scores
    from slimsearch.jobs.warm_start import enqueue_front, planner_start
    from slimsearch.jobs.worker import build_space
    from slimsearch.tasks import load_task

    spec = load_job(write_job(made, job_data(made, 6), "warm.yaml"))
    task = load_task(spec.task, seed=0, path=spec.task_path, text=spec.task_text)
    space = build_space(spec, task)
    teacher = task_scores(task.teacher, task.val, task)["ppl"]
    lines: list[str] = []
    start = planner_start(spec, task, space, tmp_path, teacher_score=teacher, log=lines.append)
    assert not start.table.cached and any(line.endswith(" s)") and "measured" in line for line in lines)
    assert set(start.cuts) == {"ffn_keep"} and set(start.cuts["ffn_keep"]) == {0.5}
    study = optuna.create_study(directions=["minimize", "minimize"])
    enqueued = enqueue_front(start, spec, study, most=5, log=lines.append)
    assert 1 <= len(enqueued) <= 2  # ceil(6 / 3)
    choices = dict(space.choices)
    for params in enqueued:
        assert set(params) == set(choices) and all(v in choices[k] for k, v in params.items())
        assert params["ffn_keep"] == 1.0  # cuts are predicted, not planned: left at no cut
        predicted = start.estimate(params, "ppl", "ppl_increase")
        assert 0 < predicted["ppl"] <= teacher * 1.3 + 1e-9  # within the bound, as predicted (rounding may help)
        assert predicted["ppl_increase"] == pytest.approx(predicted["ppl"] / teacher - 1)
    for params in enqueued:  # each compresses something: the teacher itself is not a candidate
        assert any(v != 32 for k, v in params.items() if k.startswith(("weight_bits.", "kv_bits")))
    untouched = {"weight_bits": 32, "act_bits": 32, "kv_bits": 32, "head_bits": 32, "ffn_keep": 1.0,
                 "distill_steps": 0}
    float_plan = {k: untouched[k.partition(".")[0]] for k in choices}
    # nothing rounded: the teacher's own
    assert start.estimate(float_plan, "ppl", "ppl_increase") == {"ppl": teacher, "ppl_increase": 0.0}
    halved = start.estimate({**float_plan, "ffn_keep": 0.5}, "ppl", "ppl_increase")  # the cut measured alone
    assert halved["ppl"] == pytest.approx(teacher * math.exp(start.cuts["ffn_keep"][0.5])) and halved["ppl"] > teacher
    unmeasured = {**float_plan, "act_bits.qkv": 8}  # SmoothQuant inputs: not in the table
    assert start.estimate(unmeasured, "ppl", "ppl_increase") == {"ppl": None, "ppl_increase": None}
    hard = {**float_plan, **{k: 2 for k in choices if k.startswith("weight_bits.")}}
    assert start.estimate(hard, "ppl", "ppl_increase")["ppl"] > teacher  # 2-bit weights cost this model perplexity
    # the same plans are not enqueued twice
    assert enqueue_front(start, spec, study, most=5, log=lines.append) == ()
    assert len(study.get_trials()) == len(enqueued)

    def measure_again(*args, **kwargs):
        raise AssertionError("the losses were measured again instead of read from the job folder")

    monkeypatch.setattr(llm_sensitivity, "_losses", measure_again)
    monkeypatch.setattr(compress, "apply_plan", measure_again)
    again = planner_start(spec, task, space, tmp_path, teacher_score=teacher, log=lines.append)
    assert again.table.cached and any("read from the job folder" in line for line in lines)
    assert again.table.options == start.table.options and again.cuts == start.cuts


def test_the_planner_measures_the_plan_at_the_edge_and_moves_the_edge_in_where_the_sum_predicted_too_little(
        made, tmp_path, monkeypatch):
    import optuna

    from slimsearch import compress
    from slimsearch.evaluators.candidate import task_scores
    from slimsearch.jobs.warm_start import (CHECK_MARGIN, CHECKS, _params_of, _solve, baseline_budgets,
                                            checked, enqueue_front, plan_checker, planner_start)
    from slimsearch.jobs.worker import build_space
    from slimsearch.tasks import load_task

    spec = load_job(write_job(made, job_data(made, 6), "warm.yaml"))
    task = load_task(spec.task, seed=0, path=spec.task_path, text=spec.task_text)
    space = build_space(spec, task)
    start = planner_start(spec, task, space, tmp_path, teacher_score=task_scores(task.teacher, task.val, task)["ppl"],
                          log=lambda line: None)

    def gap(params: dict) -> float:
        return start.estimate(params, "ppl", "ppl_increase")["ppl_increase"]

    calls: list[dict] = []

    def twice(params: dict) -> float:  # every plan loses twice what the sum predicts
        calls.append(params)
        return 2 * gap(params)

    lines: list[str] = []
    moved = checked(start, spec, twice, log=lines.append)
    assert 1 <= len(calls) <= CHECKS and len(lines) == len(calls)
    assert moved.edge < 0.3 and moved.correction == pytest.approx(2.0)
    assert "ppl_increase" in moved.describe() and "x 2.00 where positive" in moved.describe()
    enqueued = enqueue_front(moved, spec, optuna.create_study(directions=["minimize"] * 2), most=5, log=lines.append)
    assert enqueued and 2 * gap(enqueued[0]) <= CHECK_MARGIN * 0.3 + 1e-9  # the edge moved in: within the margin
    assert all(gap(p) <= gap(enqueued[0]) + 1e-12 for p in enqueued)  # the cheapest, at the edge, first
    assert gap(enqueued[0]) > 0  # it still rounds something
    # the predictions carry what the sum missed
    assert moved.estimate(enqueued[0], "ppl", "ppl_increase")["ppl_increase"] == pytest.approx(
        math.expm1(2 * math.log1p(gap(enqueued[0]))))

    def offset(params: dict) -> float:  # every plan loses 10 points more than the sum predicts
        calls.append(params)
        return gap(params) + 0.1

    calls.clear()
    moved = checked(start, spec, offset, log=lines.append)
    assert 1 <= len(calls) <= CHECKS
    enqueued = enqueue_front(moved, spec, optuna.create_study(directions=["minimize"] * 2), most=5, log=lines.append)
    assert enqueued and offset(enqueued[0]) <= CHECK_MARGIN * 0.3 + 1e-9  # the line through two plans finds it

    # the plan of least predicted loss within each uniform recipe's bytes comes right after the edge's
    targets = baseline_budgets(task, spec)
    sizes = [t["size_bytes"] for t in targets]
    assert len(sizes) >= 2 and sizes == sorted(sizes, reverse=True)  # 4-bit, 8-bit (rows of 64: one group)
    assert all(set(t) == {"size_bytes", "latency_ms@raspberry-pi-4"} for t in targets)
    sized = dataclasses.replace(start, targets=targets)
    best = _solve(sized, targets[0], "nll")  # the least predicted loss within it
    assert all(best.totals[k] <= v * (1 + 1e-9) for k, v in targets[0].items())
    enqueued = enqueue_front(sized, spec, optuna.create_study(directions=["minimize"] * 2), most=5, log=lines.append)
    assert _params_of(sized, best.chosen) in enqueued[:2]

    check = plan_checker(task, space, tmp_path, start)
    measured = check(enqueued[0])
    assert -0.5 < measured < 2 * CHECK_MARGIN * 0.3  # built and scored: a plan predicted within the bound

    def built_again(*args, **kwargs):
        raise AssertionError("the plan was built again instead of read from the job folder")

    monkeypatch.setattr(compress, "apply_plan", built_again)
    assert plan_checker(task, space, tmp_path, start)(enqueued[0]) == measured


def test_a_per_block_space_chooses_each_blocks_weights_and_the_planner_plans_them_per_block(made, tmp_path):
    import optuna

    from slimsearch.compress import apply_plan
    from slimsearch.compress.llm_methods import record_of
    from slimsearch.evaluators.candidate import task_scores
    from slimsearch.exceptions import ConfigError
    from slimsearch.jobs.warm_start import _params_of, enqueue_front, planner_start
    from slimsearch.jobs.worker import build_space
    from slimsearch.tasks import load_task

    data = job_data(made, 6)
    data["space"] = {**SPACE, "per_block": True, "head_bits": [8, 32],
                     "layers": {"down": {"weight_bits": [8, 32]}, "1.down": {"weight_bits": [4, 32]}}}
    spec = load_job(write_job(made, data, "per-block.yaml"))
    task = load_task(spec.task, seed=0, path=spec.task_path, text=spec.task_text)
    space = build_space(spec, task)
    blocks = [f"{i}.{g}" for i in range(2) for g in ("qkv", "o", "gate_up", "down")]
    assert space.layers == tuple(blocks)
    choices = dict(space.choices)
    assert {k for k in choices if k.startswith("weight_bits.")} == {f"weight_bits.{b}" for b in blocks}
    assert choices["weight_bits.0.down"] == (8, 32)  # the group's override, in every block ...
    assert choices["weight_bits.1.down"] == (4, 32)  # ... but a block's own key wins
    assert choices["weight_bits.1.qkv"] == (2, 4, 8, 32)

    untouched = {"weight_bits": 32, "act_bits": 32, "kv_bits": 32, "head_bits": 32, "ffn_keep": 1.0,
                 "distill_steps": 0}
    float_plan = {k: untouched[k.partition(".")[0]] for k in choices}
    mixed = space.plan_from_params({**float_plan, "weight_bits.0.qkv": 4, "weight_bits.1.qkv": 8,
                                    "weight_bits.1.down": 4})
    quantized = record_of(apply_plan(task, mixed)).quantized
    assert {path: q.bits for path, q in quantized.items()} == {
        "model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.k_proj": 4, "model.layers.0.self_attn.v_proj": 4,
        "model.layers.1.self_attn.q_proj": 8, "model.layers.1.self_attn.k_proj": 8, "model.layers.1.self_attn.v_proj": 8,
        "model.layers.1.mlp.down_proj": 4}  # each block's groups as chosen, the rest float

    teacher = task_scores(task.teacher, task.val, task)["ppl"]
    start = planner_start(spec, task, space, tmp_path, teacher_score=teacher, log=lambda line: None)
    assert start.per_block and start.groups == tuple(blocks) and "per block" in start.describe()
    assert set(start.table.options["0.down"]) == {"float", "rtn-w8-g128"}  # restricted to what the space allows
    assert set(start.table.options["head"]) == {"float", "head8"}
    enqueued = enqueue_front(start, spec, optuna.create_study(directions=["minimize"] * 2), most=5,
                             log=lambda line: None)
    assert enqueued and any(params["head_bits"] == 8 for params in enqueued)
    for params in enqueued:
        assert set(params) == set(choices) and all(v in choices[k] for k, v in params.items())
        assert start.estimate(params, "ppl", "ppl_increase")["ppl_increase"] <= 0.3
        assert _params_of(start, start.options_of(params)) == params  # the table's options and back
    bad = {**data, "space": {**data["space"], "layers": {"2.down": {"weight_bits": [8]}}}}
    with pytest.raises(ConfigError, match=r"space.layers: unknown layer '2.down'; allowed: a linear group "
                                          r"\['qkv', 'o', 'gate_up', 'down'\] \(every block\) or one block's"):
        build_space(load_job(write_job(made, bad, "per-block-bad.yaml")), task)


@pytest.mark.slow
def test_a_job_runs_the_planned_plans_first_and_resume_reads_its_sensitivities_back(made):
    from mlflow import MlflowClient

    folder = made / "job"
    folder.mkdir()
    run = local_job(folder, job_data(made, 2, "warm-job"))
    assert "planner: sensitivity measured" in run.result.stdout
    (first,) = [line for line in run.result.stdout.splitlines() if "enqueued first" in line]
    front = json.loads((run.out / "front.json").read_text())
    assert len(front["candidates"]) == 2
    import optuna

    state = json.loads((run.out / "job.json").read_text())
    trials = optuna.load_study(study_name=state["study_name"], storage=state["storage"]).get_trials()
    planned = [t.number for t in trials if t.user_attrs.get("planner")]
    assert planned and planned == list(range(len(planned)))  # the planner's plans ran first
    assert f"planner: {len(planned)} of the" in first
    sensitivity = list(run.out.glob("sensitivity-*.json"))
    assert len(sensitivity) == 1
    stamp = sensitivity[0].stat().st_mtime_ns
    client = MlflowClient(state["tracking_uri"])
    assert "sensitivity per linear group" in client.get_run(state["parent_run_id"]).data.params["planner"]

    result = cli("run", str(run.job), "--out", str(run.out), "--executor", "local", "--no-progress", "--resume",
                 "--budget", "3")
    assert result.code == 0, result.stderr
    assert "planner: sensitivity read from the job folder" in result.stdout
    assert sensitivity[0].stat().st_mtime_ns == stamp  # read, not written again
    assert len(json.loads((run.out / "front.json").read_text())["candidates"]) == 3
