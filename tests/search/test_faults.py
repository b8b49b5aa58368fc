"""Fault injection on real parts: Ray workers killed mid-candidate, a driver killed with SIGKILL or
stopped with SIGTERM or Ctrl-C and resumed, candidates that raise, diverge to NaN or pass a memory
limit, and an MLflow store that cannot be written for a while.

The faults come from ``faulty_task.py`` (the digits task whose distillation misbehaves on cue),
from ``kill -9`` of a real ``slimsearch run`` process, and from a real SQLite write lock held on
the job's MLflow store. Every check reads the real Optuna study and MLflow store of the job.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from .faulty_task import claims

HERE = Path(__file__).resolve().parent
NAME = "faults"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "slimsearch.trial"
TIME_LIMIT_S = 15  # a 10-step digits candidate takes about a second
SPACE = {"prune_ratio": [0.0, 0.25, 0.5], "weight_bits": [4, 8, 32], "act_bits": [8, 32], "distill_steps": [10]}


def _job(folder: Path, *, budget: int, task: str = "faulty_task:digits_with_faults", search=None,
         space=None) -> Path:
    data = {"name": NAME, "task": task, "space": space or SPACE, "profiles": ["raspberry-pi-4"],
            "search": {"budget": budget, "workers": 1, "seed": 0, **(search or {})}}
    if ":" in task:
        data["task_path"] = str(HERE)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _faults(monkeypatch, folder: Path, actions: str) -> Path:
    """Arm faulty_task: ``actions`` for the evaluations to come, claims written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("SLIMSEARCH_TEST_FAULTS", actions)
    monkeypatch.setenv("SLIMSEARCH_TEST_FAULT_DIR", str(folder))
    return folder


def _trials(out: Path) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=NAME, storage=f"sqlite:///{out / 'study.db'}").get_trials(deepcopy=False)


def _by_state(trials, state: str) -> list:
    return [t for t in trials if t.state.name == state]


def _children(out: Path) -> list:
    """The job's candidate runs in its MLflow store (deleted runs excluded, as MLflow shows them)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(NAME)
    return [r for r in client.search_runs([experiment.experiment_id], max_results=1000) if PARENT_TAG in r.data.tags]


def _assert_mlflow_matches_study(out: Path) -> dict:
    """One MLflow child run per finished trial (no trial number twice), with the study's state, error and
    values; the runs by trial number."""
    from slimsearch.storage.tracking import mlflow_key

    finished = [t for t in _trials(out) if t.state.name in ("COMPLETE", "FAIL", "PRUNED")]
    runs = _children(out)
    numbers = [int(r.data.tags[TRIAL_TAG]) for r in runs]
    assert len(numbers) == len(set(numbers)), f"a trial logged twice: {sorted(numbers)}"
    by_trial = {int(r.data.tags[TRIAL_TAG]): r for r in runs}
    assert sorted(by_trial) == sorted(t.number for t in finished)
    for t in finished:
        run = by_trial[t.number]
        if t.state.name == "FAIL":
            assert run.info.status == "FAILED"
            assert run.data.tags["error"] == t.user_attrs["error"]
        else:
            assert run.info.status == "FINISHED"
            assert "error" not in run.data.tags
        metrics = t.user_attrs.get("metrics", {})
        assert {mlflow_key(k): v for k, v in metrics.items() if v is not None} == run.data.metrics
        assert {k: str(v) for k, v in t.params.items()} == {k: v for k, v in run.data.params.items() if k != "plan"}
    return by_trial


def _assert_complete_trials_distinct(trials, budget: int) -> None:
    complete = _by_state(trials, "COMPLETE")
    assert len(complete) == budget
    keys = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(keys)) == len(keys), "a completed candidate was run again"


# --- a Ray worker killed mid-candidate; a candidate that raises, goes NaN, passes the memory limit


@pytest.fixture(scope="module")
def ray_faults(tmp_path_factory, teacher_cache):
    """One job on real Ray (1 worker, max_retries 1, memory limit 1024 MiB, time limit 15 s) whose
    evaluations, in order: are killed, killed again (the same candidate: its retry), raise, go NaN, ask
    for 4 GiB, hang, are killed (a new candidate), then run normally."""
    import ray

    from slimsearch.jobs.load import load_job
    from slimsearch.jobs.runner import run_job

    folder = tmp_path_factory.mktemp("ray-faults")
    with pytest.MonkeyPatch.context() as mp:
        # set before run_job starts Ray, so its workers inherit it
        faults = _faults(mp, folder / "faults", "kill,kill,raise,nan,alloc,hang,kill")
        spec = load_job(_job(folder, budget=2, search={"max_retries": 1, "memory_limit_mb": 1024,
                                                       "time_limit_s": TIME_LIMIT_S}))
        out = folder / "out"
        lines = []
        try:
            result = run_job(spec, out, executor="ray", progress=False, log=lines.append)
        finally:
            if ray.is_initialized():
                ray.shutdown()
    return SimpleNamespace(out=out, result=result, claims=claims(faults), trials=_trials(out), log=lines)


def _failed_with(trials, text: str) -> list:
    return [t for t in _by_state(trials, "FAIL") if text in t.user_attrs["error"]]


@pytest.mark.slow
def test_ray_worker_killed_mid_candidate_is_retried_then_failed_and_the_search_completes(ray_faults):
    actions = [a for a, _ in ray_faults.claims]
    assert actions[:7] == ["kill", "kill", "raise", "nan", "alloc", "hang", "kill"]
    assert actions[7:] == ["ok", "ok"]  # the candidate killed once, run again, and one more
    # every kill took its worker with it: each evaluation after one ran in a fresh process
    pids = [pid for _, pid in ray_faults.claims]
    for i, (action, _) in enumerate(ray_faults.claims[:-1]):
        if action == "kill":
            assert pids[i + 1] != pids[i]
    _assert_complete_trials_distinct(ray_faults.trials, budget=2)
    # three kills: the candidate killed twice (max_retries 1) failed, the one killed once completed
    died = _failed_with(ray_faults.trials, "Ray worker running this candidate failed 2 time(s)")
    assert len(died) == 1
    assert "search.max_retries = 1" in died[0].user_attrs["error"]
    assert "died" in died[0].user_attrs["error"]
    assert len(_by_state(ray_faults.trials, "FAIL")) == 5
    assert not _by_state(ray_faults.trials, "RUNNING")
    assert len(ray_faults.result.candidates) == 2


@pytest.mark.slow
def test_candidate_that_raises_is_failed_with_its_error_and_the_search_goes_on(ray_faults):
    (raised,) = _failed_with(ray_faults.trials, "injected fault: this candidate's loss function raised")
    assert raised.user_attrs["error"].startswith("RuntimeError: ")
    by_trial = _assert_mlflow_matches_study(ray_faults.out)
    assert by_trial[raised.number].info.status == "FAILED"
    assert any(t.number > raised.number for t in _by_state(ray_faults.trials, "COMPLETE"))


@pytest.mark.slow
def test_candidate_whose_loss_becomes_nan_is_failed_naming_the_step(ray_faults):
    (nan,) = _failed_with(ray_faults.trials, "loss became NaN at step 3 of 10")
    assert nan.user_attrs["error"].startswith("FloatingPointError: distillation loss became NaN at step 3")
    by_trial = _assert_mlflow_matches_study(ray_faults.out)
    assert "loss became NaN at step 3" in by_trial[nan.number].data.tags["error"]


@pytest.mark.slow
def test_candidate_over_the_memory_limit_is_failed_naming_the_limit(ray_faults):
    (over,) = _failed_with(ray_faults.trials, "exceeded search.memory_limit_mb = 1024 MiB")
    assert over.user_attrs["error"].startswith("MemoryError: ")
    assert "4294967296 bytes" in over.user_attrs["error"]  # what it asked for
    by_trial = _assert_mlflow_matches_study(ray_faults.out)
    assert by_trial[over.number].info.status == "FAILED"
    # the limit is lifted after each candidate: the later ones in the same kind of worker completed
    assert any(t.number > over.number for t in _by_state(ray_faults.trials, "COMPLETE"))


@pytest.mark.slow
def test_candidate_past_the_time_limit_is_failed_naming_it_and_its_worker_goes_on(ray_faults):
    (late,) = _failed_with(ray_faults.trials, f"exceeded its time limit (time_limit_s = {TIME_LIMIT_S} s")
    assert late.user_attrs["error"].startswith("TimeoutError: ")
    assert "(at faulty_task.py:" in late.user_attrs["error"]  # where it hung
    by_trial = _assert_mlflow_matches_study(ray_faults.out)
    assert by_trial[late.number].info.status == "FAILED"
    # stopped inside its worker, not by killing it: the next candidate ran in the same process
    actions = [a for a, _ in ray_faults.claims]
    hung = actions.index("hang")
    assert ray_faults.claims[hung + 1][1] == ray_faults.claims[hung][1]
    assert any(t.number > late.number for t in _by_state(ray_faults.trials, "COMPLETE"))


@pytest.mark.slow
def test_failed_candidates_are_listed_in_front_json_and_never_on_the_front(ray_faults):
    data = json.loads((ray_faults.out / "front.json").read_text())
    failed = {t.number: t.user_attrs["error"] for t in _by_state(ray_faults.trials, "FAIL")}
    assert {f["trial"]: f["error"] for f in data["failed"]} == failed
    assert not {c["trial"] for c in data["front"]} & set(failed)


# --- the driver killed with SIGKILL mid-search, then resumed


def _slimsearch_run(job: Path, out: Path, executor: str, *extra: str, new_session: bool = False) -> subprocess.Popen:
    """`slimsearch run` as its own process, its output going to ``<job folder>/run-<n>.log``."""
    n = len(list(job.parent.glob("run-*.log")))
    log = open(job.parent / f"run-{n}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "slimsearch.cli", "run", str(job), "--out", str(out),
                             "--executor", executor, "--no-progress", *extra],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
                            start_new_session=new_session)
    log.close()
    proc.log = Path(log.name)
    return proc


def _cli(*args: str) -> str:
    """What ``slimsearch ARGS`` prints, run in this process."""
    import contextlib
    import io

    from slimsearch.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def _wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 900) -> None:
    """Until ``path`` exists; fails if ``proc`` ends first (a liveness bound, not a timing check)."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"slimsearch run ended (code {proc.returncode}) before {path.name}:\n{proc.log.read_text()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _gone(pid: int, limit_s: float = 120) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_driver_killed_mid_search_resumes_to_exactly_the_budget(tmp_path, monkeypatch, executor):
    from slimsearch.storage.registry import Registry

    budget = 3
    faults = _faults(monkeypatch, tmp_path / "faults", "ok,hang")
    job, out = _job(tmp_path, budget=budget), tmp_path / "out"
    proc = _slimsearch_run(job, out, executor)
    try:
        _wait_for(faults / "hanging", proc)  # the second candidate is running; the first is recorded
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert Registry().find_by_out(out).status == "lost"  # not "running" for good: its driver is gone
    assert "its driver ended without saying so" in _cli("status", str(out))
    hanging_pid = int((faults / "hanging").read_text())
    # the candidate ran in the driver (local) or in a Ray worker process (ray)
    assert (hanging_pid == proc.pid) == (executor == "local")
    # no process of the killed run keeps evaluating (with Ray: its worker goes with the driver)
    assert _gone(hanging_pid)
    before = _trials(out)
    assert len(_by_state(before, "COMPLETE")) == 1
    (interrupted,) = _by_state(before, "RUNNING")
    recorded = {t.number: (t.params, t.values, t.datetime_complete) for t in _by_state(before, "COMPLETE")}

    resumed = _slimsearch_run(job, out, executor, "--resume")
    resumed.wait(timeout=1800)
    output = resumed.log.read_text()
    assert resumed.returncode == 0, output
    assert "1 trial(s) interrupted by the last stop will run again" in output
    assert f"1 of {budget} candidates done" in output
    assert Registry().find_by_out(out).status == "finished"

    trials = _trials(out)
    _assert_complete_trials_distinct(trials, budget)
    # the trial recorded before the kill was kept as it was, not run again
    for number, (params, values, completed) in recorded.items():
        kept = trials[number]
        assert (kept.params, kept.values, kept.datetime_complete) == (params, values, completed)
    # the interrupted one is failed, and its candidate ran again as a new trial
    assert trials[interrupted.number].state.name == "FAIL"
    assert trials[interrupted.number].user_attrs["error"] == "interrupted: the driver stopped"
    assert any(t.params == interrupted.params for t in _by_state(trials, "COMPLETE"))
    assert not _by_state(trials, "RUNNING")
    assert [a for a, _ in claims(faults)] == ["ok", "hang", "ok", "ok"]  # 3 complete + the interrupted one
    _assert_mlflow_matches_study(out)
    data = json.loads((out / "front.json").read_text())
    assert sorted(c["trial"] for c in data["candidates"]) == sorted(t.number for t in _by_state(trials, "COMPLETE"))


# --- the driver stopped with SIGTERM or Ctrl-C mid-search, then resumed


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "stopped by SIGTERM"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_driver_stopped_mid_search_says_so_everywhere_and_resumes(tmp_path, monkeypatch, sig, code, said):
    """On Ray, as the MNIST example runs. Before: SIGTERM met Ray's own handlers (a stack dump, then
    death, the job "running" forever in the registry and MLflow), and Ray Tune took Ctrl-C as the
    search's end (exit 0, job "finished", a false reason printed)."""
    from mlflow.tracking import MlflowClient

    from slimsearch.storage.registry import Registry

    budget = 3
    faults = _faults(monkeypatch, tmp_path / "faults", "ok,hang")
    job, out = _job(tmp_path, budget=budget), tmp_path / "out"
    # its own process group, as a terminal's foreground job: Ctrl-C reaches Ray's processes too
    proc = _slimsearch_run(job, out, "ray", new_session=True)
    try:
        _wait_for(faults / "hanging", proc)  # the second candidate is running; the first is recorded
        assert Registry().find_by_out(out).status == "running"
        if sig == signal.SIGINT:  # a terminal's Ctrl-C: to the whole group
            os.killpg(proc.pid, sig)
        else:  # `kill PID`, as a scheduler or an init system stops a process
            proc.send_signal(sig)
        assert proc.wait(timeout=300) == code, proc.log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = proc.log.read_text()
    assert output.strip().splitlines()[-1] == (f"slimsearch: {said}; finished candidates are saved, "
                                                "--resume continues"), output
    assert "SIGTERM received" not in output and "stopped after" not in output
    assert _gone(int((faults / "hanging").read_text()))  # the Ray worker went with the driver
    trials = _trials(out)
    assert len(_by_state(trials, "COMPLETE")) == 1 and len(_by_state(trials, "RUNNING")) == 1
    assert Registry().find_by_out(out).status == "stopped"
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    parent = client.get_run(json.loads((out / "job.json").read_text())["parent_run_id"])
    assert parent.info.status == "KILLED"

    resumed = _slimsearch_run(job, out, "ray", "--resume")
    assert resumed.wait(timeout=1800) == 0, resumed.log.read_text()
    assert "1 trial(s) interrupted by the last stop will run again" in resumed.log.read_text()
    _assert_complete_trials_distinct(_trials(out), budget)
    _assert_mlflow_matches_study(out)
    assert Registry().find_by_out(out).status == "finished"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


# --- the MLflow store cannot be written for a while


class _MlflowLock:
    """Holds a real SQLite write lock on the job's MLflow store from the moment the job starts running
    candidates until ``release_after`` "not writable" messages (never, for None)."""

    def __init__(self, out: Path, release_after=None):
        self.db, self.release_after = out / "mlflow.db", release_after
        self.con, self.lines, self.failures = None, [], 0

    def __call__(self, line: str) -> None:  # run_job's log
        self.lines.append(line)
        if "candidates done; running" in line:
            self.con = sqlite3.connect(self.db, isolation_level=None)
            self.con.execute("BEGIN EXCLUSIVE")
        if "MLflow store not writable" in line:
            self.failures += 1
            if self.failures == self.release_after:
                self.release()

    def release(self) -> None:
        if self.con is not None:
            self.con.execute("COMMIT")
            self.con.close()
            self.con = None


DIGITS = {"prune_ratio": [0.0, 0.25, 0.5], "weight_bits": [4, 8, 32], "act_bits": [8, 32], "distill_steps": [0]}


@pytest.mark.slow
def test_mlflow_store_locked_for_a_while_gets_every_candidate_once_it_is_back(tmp_path):
    from slimsearch.jobs.load import load_job
    from slimsearch.jobs.runner import run_job

    out = tmp_path / "out"
    lock = _MlflowLock(out, release_after=1)
    spec = load_job(_job(tmp_path, budget=2, task="digits", space=DIGITS))
    try:
        run_job(spec, out, executor="local", progress=False, log=lock)
    finally:
        lock.release()
    text = "\n".join(lock.lines)
    assert "MLflow store not writable ((sqlite3.OperationalError) database is locked" in text
    assert "1 candidate(s) wait to be logged" in text
    assert "MLflow store writable again" in text
    _assert_complete_trials_distinct(_trials(out), budget=2)
    by_trial = _assert_mlflow_matches_study(out)
    assert len(by_trial) == 2


@pytest.mark.slow
def test_mlflow_store_down_until_the_end_stops_cleanly_and_resume_logs_everything(tmp_path):
    from slimsearch.exceptions import JobStateError
    from slimsearch.jobs.load import load_job
    from slimsearch.jobs.runner import run_job

    out = tmp_path / "out"
    job = _job(tmp_path, budget=1, task="digits", space=DIGITS)
    lock = _MlflowLock(out)  # never released while the job runs
    try:
        with pytest.raises(JobStateError) as err:
            run_job(load_job(job), out, executor="local", progress=False, log=lock, source=str(job))
    finally:
        lock.release()
    message = str(err.value)
    assert "could not be written when the job ended ((sqlite3.OperationalError) database is locked" in message
    assert "1 of 1 candidate(s) are not logged there yet" in message
    assert f"slimsearch run {job} --out {out} --resume" in message
    # nothing lost: the study holds the candidate and the job folder its front
    assert len(_by_state(_trials(out), "COMPLETE")) == 1
    assert len(json.loads((out / "front.json").read_text())["candidates"]) == 1
    assert _children(out) == []

    result = run_job(load_job(job), out, resume=True, executor="local", progress=False, log=lambda *a: None)
    assert len(result.candidates) == 1
    by_trial = _assert_mlflow_matches_study(out)
    assert len(by_trial) == 1
    assert result.candidates[0]["run_id"] == by_trial[result.candidates[0]["trial"]].info.run_id


def test_a_candidate_run_left_half_written_is_replaced_not_duplicated(tmp_path):
    """What a logger killed between MLflow's create_run and set_terminated leaves: a RUNNING child run
    (made here directly, in a real store). The job's reconciliation logs the candidate once, whole."""
    from slimsearch.storage.tracking import ROLE_TAG, Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", NAME, artifact_root=tmp_path / "mlartifacts")
    parent = tracker.start_parent(NAME, {"budget": 2})
    tracker.log_candidate(0, {"w": 8}, {"accuracy": 0.9}, {}, "{}")
    half = tracker.client.create_run(tracker._experiment_id(), run_name="trial-1",
                                     tags={PARENT_TAG: parent, TRIAL_TAG: "1", ROLE_TAG: "candidate"})
    assert sorted(tracker.children()) == [0]  # the half-written run does not count as logged ...
    assert tracker.client.get_run(half.info.run_id).info.lifecycle_stage == "deleted"  # ... and is gone
    tracker.log_candidate(1, {"w": 4}, {"accuracy": 0.8}, {}, "{}")
    runs = _children(tmp_path)
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in runs) == [0, 1]
    assert {int(r.data.tags[TRIAL_TAG]): r.data.metrics["accuracy"] for r in runs} == {0: 0.9, 1: 0.8}
    assert all(r.info.status == "FINISHED" for r in runs)
