"""Early stopping inside a candidate: a digits job stops hopeless candidates, and the rule's parts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from slimsearch.jobs.early_stop import (CURVES_DIR, SNAPSHOT_FILE, STEPS_METRIC, STOPPED_METRIC, EarlyStop, gains,
                                          plausible_share, write_snapshot)
from tests._cli import cli as _cli
from tests._cli import local_job

STEPS = 40
JOB = {
    "name": "digits-early-stop",
    "task": "digits",
    # 2-bit weights wreck the digits MLP; after 10 of 40 steps such a candidate shows it
    "space": {"prune_ratio": [0.0, 0.5], "weight_bits": [2, 32], "act_bits": [32], "distill_steps": [STEPS]},
    "constraints": ["accuracy_drop <= 0.02"],
    "profiles": ["raspberry-pi-4"],
    "search": {"budget": 10, "workers": 1, "sampler": "random", "seed": 0},
}


@pytest.fixture(scope="module")
def job(tmp_path_factory, teacher_cache):
    ran = local_job(tmp_path_factory.mktemp("early-stop"), JOB)
    return SimpleNamespace(out=ran.out, result=ran.result, front=json.loads((ran.out / "front.json").read_text()))


def _curve(out: Path, candidate: dict) -> dict:
    from slimsearch.jobs.early_stop import curve_file
    from slimsearch.spaces import CompressionPlan

    return json.loads(curve_file(out, CompressionPlan.from_dict(candidate["plan"])).read_text())


@pytest.mark.slow
def test_hopeless_candidates_are_stopped_and_kept_off_the_front(job):
    candidates = sorted(job.front["candidates"], key=lambda c: c["trial"])
    stopped = [c for c in candidates if c["metrics"][STOPPED_METRIC] == 1.0]
    assert stopped, "no candidate was stopped: the rule was not exercised"
    assert len(stopped) < len(candidates)
    for c in candidates:
        done = c["metrics"][STEPS_METRIC]
        if c in stopped:
            assert done in (10, 20, 30) and not c["feasible"] and not c["on_front"]
            assert f"candidate {c['trial']} stopped at step {done:g} of {STEPS}" in job.result.stdout
        else:
            assert done == STEPS
    # the budget counts stopped candidates (they were fine-tuned, for part of their steps)
    assert len(candidates) == JOB["search"]["budget"]


@pytest.mark.slow
def test_each_stop_follows_from_the_candidates_finished_before_it(job):
    """Nothing stops before three candidates finished; a stopped candidate's metric at its check
    plus the largest share of the gap to the teacher that an earlier finished candidate, at least
    as far behind then, closed by its end (times this one's gap), plus the margin, breaks the
    constraint (1 worker: candidates run in trial order)."""
    teacher = job.front["teacher"]["accuracy"]
    finished = []
    for c in sorted(job.front["candidates"], key=lambda c: c["trial"]):
        curve = _curve(job.out, c)
        if c["metrics"][STOPPED_METRIC]:
            assert len(finished) >= 3
            share, now = curve["points"][-1]
            gap = teacher - now
            closed = [(f["final"] - v) / (teacher - v) for f in finished for s, v in f["points"]
                      if s == share and teacher - v >= gap]
            assert closed, "stopped without a finished candidate as far behind"
            assert teacher - (now + max(0.0, max(closed)) * gap + 0.01) > 0.02, curve["reason"]
            assert curve["stopped_at"] == c["metrics"][STEPS_METRIC] and "breaks accuracy_drop <= 0.02" in curve["reason"]
        else:
            assert [s for s, _ in curve["points"]] == [0.25, 0.5, 0.75] and curve["stopped_at"] is None
            finished.append({"points": curve["points"], "final": c["metrics"]["accuracy"]})


@pytest.mark.slow
def test_mlflow_tags_the_stopped_candidates(job):
    from mlflow.tracking import MlflowClient

    from slimsearch.storage.tracking import TRIAL_TAG

    client = MlflowClient(tracking_uri=f"sqlite:///{job.out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(JOB["name"])
    runs = client.search_runs([experiment.experiment_id], "tags.mlflow.parentRunId != ''", max_results=100)
    by_trial = {int(r.data.tags[TRIAL_TAG]): r for r in runs}
    for c in job.front["candidates"]:
        run = by_trial[c["trial"]]
        stopped = c["metrics"][STOPPED_METRIC] == 1.0
        assert run.data.tags["stopped_early"] == ("true" if stopped else "false")
        assert run.data.metrics[STEPS_METRIC] == c["metrics"][STEPS_METRIC]


@pytest.mark.slow
def test_export_refuses_a_stopped_candidate(job, tmp_path):
    stopped = next(c for c in job.front["candidates"] if c["metrics"][STOPPED_METRIC])
    result = _cli("export", str(job.out), "--run", stopped["run_id"], "--out", str(tmp_path / "export"))
    assert result.code == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"--run {stopped['run_id']}: candidate {stopped['trial']} was stopped early" in line
    assert not (tmp_path / "export").exists()


def test_gains_are_the_shares_of_the_gap_to_the_teacher_closed_after_each_check():
    curves = [{"points": [[0.25, 0.5], [0.5, 0.7], [0.75, 0.8]], "final": 0.9},
              {"points": [[0.25, 0.85], [0.5, 0.86], [0.75, 0.95]], "final": 0.9},
              {"points": [[0.25, 0.6], [0.5, 0.6]], "final": 0.65}]
    seen = gains(curves, "max", teacher=1.0)
    assert set(seen) == {"0.25", "0.5"}  # 0.75: only two curves
    def flat(pairs):
        return [x for pair in pairs for x in pair]

    assert flat(seen["0.25"]) == pytest.approx([0.15, 1 / 3, 0.4, 0.125, 0.5, 0.8])
    assert flat(seen["0.5"]) == pytest.approx([0.14, 0.04 / 0.14, 0.3, 0.2 / 0.3, 0.4, 0.125])
    assert gains(curves[:2], "max", teacher=1.0) == {}
    flipped = [{"points": [[s, -v] for s, v in c["points"]], "final": -c["final"]} for c in curves]
    assert {k: flat(v) for k, v in gains(flipped, "min", teacher=-1.0).items()} == \
        {k: pytest.approx(flat(v)) for k, v in seen.items()}
    # only candidates at least as far behind count; none that far: not judged
    assert plausible_share(seen["0.25"], 0.45) == pytest.approx(0.8)
    assert plausible_share(seen["0.25"], 0.1) == pytest.approx(0.8)
    assert plausible_share(seen["0.25"], 0.3) == pytest.approx(0.8)
    assert plausible_share(seen["0.5"], 0.35) == pytest.approx(0.125)
    assert plausible_share(seen["0.25"], 0.6) is None


def _digits_candidate(tmp_path):
    from slimsearch.spaces import CompressionPlan
    from slimsearch.spaces.plan import DistillPlan
    from slimsearch.tasks import load_task

    task = load_task("digits")
    plan = CompressionPlan(layers={}, distill=DistillPlan(steps=8), seed=0)
    return task, plan, EarlyStop(tmp_path, task, plan, ["raspberry-pi-4"])


@pytest.mark.parametrize("size_delta, member_latency_ms, stops", [(-1, 0.0, True), (+1, 0.0, False),
                                                                  (-1, 1e9, False)])
def test_a_front_member_as_good_on_every_objective_stops_it(tmp_path, teacher_cache, size_delta, member_latency_ms,
                                                            stops):
    """Dominance on the job's objectives, measured local latency included: a front member one byte
    smaller or larger than the candidate, faster or slower than its timed latency, with a higher
    metric than it can reach."""
    task, _, stopper = _digits_candidate(tmp_path)
    student = task.teacher
    size = stopper.costs(student)["size_bytes"]
    objectives = {"accuracy": "max", "size_bytes": "min", "latency_ms_b64@local": "min"}
    member = {"accuracy": 1.0, "size_bytes": size + size_delta, "latency_ms_b64@local": member_latency_ms}
    write_snapshot(tmp_path, metric="accuracy", direction="max", teacher=1.0, objectives=objectives, constraints=[],
                   front=[member], curves=[{"points": [[0.25, 0.5]], "final": 0.5}] * 3, margin=0.0)
    assert json.loads((tmp_path / SNAPSHOT_FILE).read_text())["gains"] == {"0.25": [[0.5, 0.0]] * 3}
    keep_going = stopper(stopper.every, student)
    assert keep_going is (not stops)
    if stops:
        assert "front member with accuracy 1" in stopper.reason and stopper.stopped_at == stopper.every
    if size_delta < 0:  # every other objective showed it dominated: its latency was timed
        assert stopper.measured(student)["latency_ms_b64@local"] > 0
    assert stopper.finish() == {STOPPED_METRIC: 1.0 if stops else 0.0, STEPS_METRIC: 2.0 if stops else 8.0}
    assert len(list((tmp_path / CURVES_DIR).iterdir())) == 1


def test_nothing_stops_before_the_gains_are_known(tmp_path, teacher_cache):
    task, _, stopper = _digits_candidate(tmp_path)
    assert stopper(stopper.every, task.teacher) is True  # no snapshot at all
    write_snapshot(tmp_path, metric="accuracy", direction="max", teacher=1.0, objectives={"accuracy": "max"},
                   constraints=["accuracy_drop <= 0"], front=[], curves=[{"points": [[0.25, 0.5]], "final": 0.5}] * 2,
                   margin=0.0)
    assert stopper(stopper.every, task.teacher) is True  # two finished curves are not enough


@pytest.mark.slow
def test_checking_a_candidate_leaves_its_training_unchanged(tmp_path, teacher_cache):
    """A candidate checked (scored, its costs computed, its latency timed) and not stopped ends exactly
    where it ends unchecked: export rebuilds candidates without checks."""
    import torch

    from slimsearch.evaluators import score
    from slimsearch.compress import apply_plan
    from slimsearch.spaces.plan import LayerPlan

    task, plan, stopper = _digits_candidate(tmp_path)
    plan = type(plan)(layers={name: LayerPlan(weight_bits=4, act_bits=8) for name, m in task.teacher.named_modules()
                              if isinstance(m, torch.nn.Linear)}, distill=plan.distill, seed=0)
    stopper = EarlyStop(tmp_path, task, plan, ["raspberry-pi-4"])
    objectives = {"accuracy": "max", "size_bytes": "min", "latency_ms_b64@local": "min"}
    member = {"accuracy": 1.0, "size_bytes": 0.0, "latency_ms_b64@local": 1e9}  # never faster: never stops it
    write_snapshot(tmp_path, metric="accuracy", direction="max", teacher=1.0, objectives=objectives, constraints=[],
                   front=[member], curves=[{"points": [[s, 0.5] for s in (0.25, 0.5, 0.75)], "final": 0.5}] * 3,
                   margin=0.0)
    checked = apply_plan(task, plan, on_chunk=stopper, chunk_every=stopper.every)
    assert len(stopper.points) == 3 and stopper.stopped_at is None and stopper._measured  # every check ran in full
    unchecked = apply_plan(task, plan)
    assert score(checked, task.val, task) == score(unchecked, task.val, task)
    for a, b in zip(checked.state_dict().values(), unchecked.state_dict().values()):
        assert torch.equal(a, b)


def test_a_candidate_with_fewer_than_four_steps_is_never_checked(tmp_path, teacher_cache):
    from slimsearch.compress import apply_plan
    from slimsearch.spaces.plan import DistillPlan

    task, plan, _ = _digits_candidate(tmp_path)
    plan = type(plan)(layers={}, distill=DistillPlan(steps=3), seed=0)
    stopper = EarlyStop(tmp_path, task, plan, ["raspberry-pi-4"])
    apply_plan(task, plan, on_chunk=stopper, chunk_every=stopper.every)
    assert stopper.every == 0 and stopper.points == []
    assert stopper.finish() == {STOPPED_METRIC: 0.0, STEPS_METRIC: 3.0}


def test_a_task_whose_metric_is_better_lower_is_judged_by_its_own_gap(tmp_path):
    """A causal LM's perplexity falls as it trains: the best it can reach is below it, and a constraint on
    ``ppl_increase`` (not ``ppl_drop``) judges it; the snapshot says the family and its direction."""
    from types import SimpleNamespace

    from slimsearch.jobs.early_stop import FrontSnapshot
    from slimsearch.metric_names import TaskFamily

    FrontSnapshot(tmp_path, lambda params: None, metric="ppl", teacher=20.0, objectives={"ppl": "min"},
                  constraints=["ppl_increase <= 0.05"], margin=0.0, complete=[], front=[],
                  family=TaskFamily.CAUSAL_LM)
    snapshot = json.loads((tmp_path / SNAPSHOT_FILE).read_text())
    assert (snapshot["direction"], snapshot["family"]) == ("min", "causal-lm")
    stopper = EarlyStop(tmp_path, None, SimpleNamespace(distill=SimpleNamespace(steps=8)), [])
    reason = stopper._hopeless(snapshot, 25.0, 2.0, None)  # at best 23: 15% above the teacher
    assert reason == "ppl 25.0000 now, at best 23.0000 at the end, which breaks ppl_increase <= 0.05"
    assert stopper._hopeless(snapshot, 22.0, 1.5, None) is None  # at best 20.5: within 5%; no front to beat
