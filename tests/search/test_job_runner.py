"""Whole digits jobs through `slimsearch run`: front.json, the Optuna study, MLflow runs, resume and Ray."""

from __future__ import annotations

import json
from itertools import permutations
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests._cli import cli, local_job, write_job

NAME = "digits-search"
JOB = {
    "name": NAME,
    "task": "digits",
    "space": {"prune_ratio": [0.0, 0.25, 0.5], "weight_bits": [4, 8, 32], "act_bits": [8, 32],
              "distill_steps": [0, 10]},
    "profiles": ["raspberry-pi-4"],
    "search": {"budget": 4, "workers": 1},
}
PARENT_TAG = "mlflow.parentRunId"


def _run(*args: str) -> SimpleNamespace:
    """`slimsearch run ...` in this process; its exit code, stdout and stderr."""
    return cli("run", *args, "--no-progress")




def _study(out: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=NAME, storage=f"sqlite:///{out / 'study.db'}")


def _complete(study) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def _runs(out: Path) -> tuple[list, list]:
    """The job's parent runs and the child runs under them, from the MLflow store in the job folder."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    return parents, children


def _dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    no_worse = all((x >= y) if d == "max" else (x <= y) for x, y, d in zip(a, b, directions))
    return no_worse and a != b


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, teacher_cache):
    return local_job(tmp_path_factory.mktemp("job"), JOB)


def test_front_json_holds_exactly_the_non_dominated_candidates(finished_job):
    data = json.loads((finished_job.out / "front.json").read_text())
    objectives = data["objectives"]
    assert objectives == {"accuracy": "max", "latency_ms_b64@local": "min", "size_bytes": "min"}
    names, directions = list(objectives), list(objectives.values())
    candidates = data["candidates"]
    assert sorted(c["trial"] for c in candidates) == [0, 1, 2, 3]
    assert data["failed"] == []
    point = {c["trial"]: [c["metrics"][m] for m in names] for c in candidates}
    front = [c["trial"] for c in data["front"]]
    assert front == sorted(c["trial"] for c in candidates if c["on_front"])
    assert front
    for a, b in permutations(front, 2):
        assert not _dominates(point[a], point[b], directions), (a, b)
    for c in candidates:
        if c["trial"] not in front:
            assert any(_dominates(point[f], point[c["trial"]], directions) for f in front), c["trial"]
    for c in candidates:
        assert 0.0 <= c["metrics"]["accuracy"] <= 1.0
        assert c["metrics"]["size_bytes"] < data["teacher"]["size_bytes"]
        assert c["provenance"]["latency_ms@local"] == "measured"
        assert c["provenance"]["latency_ms@raspberry-pi-4"] == "modelled"
    assert 0.9 <= data["teacher"]["accuracy"] <= 1.0
    assert (finished_job.out / "front.html").stat().st_size > 0
    # what the command printed agrees with the file
    assert f"Pareto front: {len(front)} of 4 candidates" in finished_job.result.stdout
    assert "latency_ms@raspberry-pi-4 [modelled]" in finished_job.result.stdout
    assert "latency_ms@local [measured]" in finished_job.result.stdout


def test_study_holds_one_complete_trial_per_candidate(finished_job):
    data = json.loads((finished_job.out / "front.json").read_text())
    trials = _complete(_study(finished_job.out))
    assert [t.number for t in trials] == [0, 1, 2, 3]
    by_trial = {c["trial"]: c for c in data["candidates"]}
    for t in trials:
        assert t.params == by_trial[t.number]["params"]
        assert t.values == [by_trial[t.number]["metrics"][m] for m in data["objectives"]]


def test_mlflow_has_one_parent_and_one_child_run_per_candidate(finished_job):
    data = json.loads((finished_job.out / "front.json").read_text())
    parents, children = _runs(finished_job.out)
    assert len(parents) == 1
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["teacher.accuracy"] == pytest.approx(data["teacher"]["accuracy"])
    assert {r.data.tags[PARENT_TAG] for r in children} == {parent.info.run_id}
    by_trial = {int(r.data.tags["slimsearch.trial"]): r for r in children}
    assert sorted(by_trial) == [0, 1, 2, 3] and len(children) == 4
    for c in data["candidates"]:
        run = by_trial[c["trial"]]
        assert run.info.run_id == c["run_id"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["pareto"] == ("true" if c["on_front"] else "false")
        assert run.data.metrics["accuracy"] == pytest.approx(c["metrics"]["accuracy"])
        assert run.data.metrics["size_bytes"] == c["metrics"]["size_bytes"]
        assert run.data.tags["provenance.latency_ms/local"] == "measured"
        assert run.data.tags["provenance.latency_ms/raspberry-pi-4"] == "modelled"
        assert json.loads(run.data.params["plan"]) == c["plan"]
    assert {n for n, r in by_trial.items() if r.data.tags["pareto"] == "true"} == {c["trial"] for c in data["front"]}


def test_local_latency_is_paired_with_the_teachers_from_the_jobs_start_and_the_raw_one_kept(finished_job):
    # the front uses the paired figure; front.json and MLflow keep the raw one, its CV and noisy flag beside it
    data = json.loads((finished_job.out / "front.json").read_text())
    state = json.loads((finished_job.out / "job.json").read_text())
    parents, children = _runs(finished_job.out)
    (parent,) = parents
    for name in ("latency_ms@local", "latency_ms_b64@local"):
        assert f"{state['teacher'][name]:.4g}" in parent.data.params["local_latency"]
        for kind in ("act-qdq", "w8a8"):  # act_bits 8 is a choice: the teacher as those graphs too, measured once
            assert state["reference_kinds"][f"{kind}:{name}"] > 0
            figure = f"{kind}:{name}={state['reference_kinds'][f'{kind}:{name}']:.4g}"
            assert figure in parent.data.params["local_latency"]
    by_run = {r.info.run_id: r for r in children}
    for c in data["candidates"]:
        m, run = c["metrics"], by_run[c["run_id"]]
        for paired, raw, cv, noisy in (("latency_ms_b64@local", "latency_ms_raw_b64@local", "latency_cv_b64@local",
                                        "latency_noisy_b64@local"),
                                       ("latency_ms@local", "latency_ms_raw@local", "latency_cv@local",
                                        "latency_noisy@local")):
            assert m[paired] > 0 and m[raw] > 0 and m[cv] >= 0 and m[noisy] in (0.0, 1.0)
            assert c["provenance"][raw] == "measured"
            assert run.data.metrics[raw.replace("@", "/")] == pytest.approx(m[raw])
            assert run.data.metrics[paired.replace("@", "/")] == pytest.approx(m[paired])


def test_running_the_job_again_without_resume_is_refused(finished_job):
    before = (finished_job.out / "front.json").read_bytes()
    result = _run(str(finished_job.job), "--out", str(finished_job.out), "--executor", "local")
    assert result.code == 2
    (line,) = result.stderr.splitlines()
    assert line == (f"slimsearch: error: {finished_job.out}: already holds a job; "
                    "pass --resume to continue it or choose another --out")
    assert result.stdout == ""  # said before the task loads, with nothing else printed
    assert (finished_job.out / "front.json").read_bytes() == before
    assert len(_complete(_study(finished_job.out))) == 4
    assert len(_runs(finished_job.out)[1]) == 4


def test_resume_with_a_changed_job_is_refused(finished_job):
    changed = dict(JOB, space=dict(JOB["space"], weight_bits=[2, 4]))
    job = write_job(finished_job.job.parent, changed, "changed.yaml")
    result = _run(str(job), "--out", str(finished_job.out), "--resume", "--executor", "local")
    assert result.code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"slimsearch: error: {finished_job.out}: the job file differs")
    assert "['space']" in line
    assert "search.budget, search.workers, search.threads_per_worker and search.time_limit_s may change" in line
    assert len(_complete(_study(finished_job.out))) == 4


def test_resume_needs_a_job_folder(tmp_path):
    job = write_job(tmp_path, JOB)
    result = _run(str(job), "--out", str(tmp_path / "nothing-here"), "--resume", "--executor", "local")
    assert result.code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"slimsearch: error: {tmp_path / 'nothing-here'}: no job to resume here")
    assert result.stdout == "" and not (tmp_path / "nothing-here").exists()


def _snapshot(trial) -> tuple:
    return (trial.number, trial.params, trial.values, trial.user_attrs, trial.datetime_start,
            trial.datetime_complete)


@pytest.fixture(scope="module")
def resumed_job(tmp_path_factory, teacher_cache):
    folder = tmp_path_factory.mktemp("resume")
    job, out = write_job(folder, JOB), folder / "out"
    first = _run(str(job), "--out", str(out), "--executor", "local", "--budget", "3", "--threads", "1")
    assert first.code == 0, first.stderr
    trials_before = [_snapshot(t) for t in _complete(_study(out))]
    runs_before = {int(r.data.tags["slimsearch.trial"]): (r.info.run_id, r.info.start_time) for r in _runs(out)[1]}
    # a time limit may be added on --resume (a job stopped because a candidate hung)
    second = _run(str(job), "--out", str(out), "--executor", "local", "--budget", "5", "--resume", "--threads", "2",
                  "--time-limit", "600")
    assert second.code == 0, second.stderr
    return SimpleNamespace(out=out, trials_before=trials_before, runs_before=runs_before, stdout=second.stdout)


@pytest.mark.slow  # a job of 20-40 s: the full suite
def test_resume_runs_only_the_missing_candidates(resumed_job):
    assert len(resumed_job.trials_before) == 3
    assert "3 of 5 candidates done; running 2" in resumed_job.stdout
    trials = _complete(_study(resumed_job.out))
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    # the first three trials were not run again: same params, values, metrics and times
    assert [_snapshot(t) for t in trials[:3]] == resumed_job.trials_before
    parents, children = _runs(resumed_job.out)
    assert len(parents) == 1
    by_trial = {int(r.data.tags["slimsearch.trial"]): r for r in children}
    assert sorted(by_trial) == [0, 1, 2, 3, 4] and len(children) == 5
    assert {n: (by_trial[n].info.run_id, by_trial[n].info.start_time) for n in range(3)} == resumed_job.runs_before
    data = json.loads((resumed_job.out / "front.json").read_text())
    assert sorted(c["trial"] for c in data["candidates"]) == [0, 1, 2, 3, 4]


def test_resume_may_change_the_threads_per_worker_and_records_each_starts_count(resumed_job):
    # export rebuilds a trial with its worker's thread count (it changes float rounding in training)
    assert "running 2 on 1 worker(s) x 2 thread(s)" in resumed_job.stdout
    state = json.loads((resumed_job.out / "job.json").read_text())
    assert state["threads"] == [[0, 1], [3, 2]]


def test_resume_may_add_a_time_limit_and_keeps_it(resumed_job):
    state = json.loads((resumed_job.out / "job.json").read_text())
    assert state["spec"]["search"]["time_limit_s"] == 600


def test_resumed_trials_are_new_plans(resumed_job):
    trials = _complete(_study(resumed_job.out))
    earlier = [t.params for t in trials[:3]]
    assert [t.number for t in trials if t.number >= 3 and t.params in earlier] == []


@pytest.mark.slow
def test_ray_executor_runs_each_candidate_once(tmp_path, request):
    import ray

    from slimsearch.jobs.load import load_job
    from slimsearch.jobs.runner import run_job

    assert not ray.is_initialized()
    request.addfinalizer(lambda: ray.shutdown() if ray.is_initialized() else None)
    spec = load_job(write_job(tmp_path, JOB), {"search.budget": 4, "search.workers": 2})
    out = tmp_path / "out"
    result = run_job(spec, out, executor="ray", progress=False, log=lambda *args: None)
    assert not ray.is_initialized()  # run_job started Ray and shut it down
    trials = _complete(_study(out))
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert len(result.candidates) == 4
    parents, children = _runs(out)
    assert len(parents) == 1
    assert sorted(int(r.data.tags["slimsearch.trial"]) for r in children) == [0, 1, 2, 3]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {c["trial"] for c in result.front} <= {0, 1, 2, 3}


def test_hidden_state_matching_on_a_task_without_hidden_states_is_refused(tmp_path):
    job = write_job(tmp_path, dict(JOB, space=dict(JOB["space"], distill_hidden_weight=[0.0, 1.0])))
    result = _run(str(job), "--out", str(tmp_path / "out"), "--executor", "local")
    assert result.code == 2
    (line,) = result.stderr.splitlines()
    assert line == (f"slimsearch: error: {job}: space.distill_hidden_weight: task 'digits' exposes no hidden "
                    "states to match; allowed: [0]")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a job of 20-40 s: the full suite
def test_a_candidate_that_breaks_a_constraint_never_enters_the_front(tmp_path):
    # accuracy is not estimated before training, so these candidates are trained, then found infeasible
    job = write_job(tmp_path, dict(JOB, constraints=["accuracy >= 1.01"], search={"budget": 2, "workers": 1}))
    out = tmp_path / "out"
    result = _run(str(job), "--out", str(out), "--executor", "local")
    assert result.code == 0, result.stderr
    front = json.loads((out / "front.json").read_text())
    assert len(front["candidates"]) == 2
    assert all(c["feasible"] is False and not c["on_front"] for c in front["candidates"])
    assert front["front"] == []
    (parent,), children = _runs(out)
    assert [r.data.tags["pareto"] for r in children] == ["false", "false"]
    from slimsearch.jobs.query import progress

    status = progress(out)
    assert status.front_size == 0  # `slimsearch status` counts the same front (it counted 2)
    # and the front's hypervolume, in `status` and the parent run, is that of no candidate (it counted both)
    assert status.hypervolume == 0.0 and parent.data.metrics["hypervolume"] == 0.0


def test_a_plan_estimated_to_break_a_constraint_is_screened_not_trained(tmp_path, teacher_cache):
    import optuna

    from slimsearch.deploy.pack import packed_size
    from slimsearch.tasks import load_task

    limit = packed_size(load_task("digits").teacher) // 2  # 8-bit weights fit, 32-bit ones (mostly) do not
    space = {"prune_ratio": [0.0], "weight_bits": [8, 32], "act_bits": [32], "distill_steps": [0]}
    job = write_job(tmp_path, dict(JOB, space=space, constraints=[f"size_bytes <= {limit}"],
                                   search={"budget": 1, "workers": 1, "sampler": "random"}))
    out = tmp_path / "out"
    result = _run(str(job), "--out", str(out), "--executor", "local")
    assert result.code == 0, result.stderr
    trials = _study(out).get_trials(deepcopy=False)
    (trained,) = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    measured = trained.user_attrs["metrics"]["size_bytes"]
    assert measured <= limit and trained.user_attrs["estimate"]["size_bytes"] == measured  # the estimate is exact
    screened = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert screened, "every proposal fitted: no screening was exercised"
    for t in screened:  # never trained: no metrics, a reason, and the estimate it was judged on
        assert "metrics" not in t.user_attrs
        assert t.user_attrs["estimate"]["size_bytes"] > limit
        assert t.user_attrs["screened"].startswith("estimated infeasible: size_bytes = ")
    _, children = _runs(out)
    tags = sorted(r.data.tags["screened"] for r in children)
    assert tags == ["false"] + ["true"] * len(screened)
    front = json.loads((out / "front.json").read_text())
    assert [c["trial"] for c in front["candidates"]] == [trained.number]
