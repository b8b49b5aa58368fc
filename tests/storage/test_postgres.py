"""Several drivers on one study, PostgreSQL, an MLflow tracking server, and database passwords.

Everything here runs on real parts: a PostgreSQL server and an ``mlflow server`` started by
the fixtures in conftest.py, ``slimsearch run`` processes, Optuna's RDB storage, MLflow.

How drivers share a job: each ``slimsearch run`` gets its own ``--out`` folder (its own
job.json, MLflow parent run, front.json) and they name the same study: the same job name
and the same ``storage`` URL (job file or ``--storage``). The budget is the study's: together
they complete exactly ``search.budget`` candidates. Two drivers on one ``--out`` are refused
(the folder's job.json), and a SQLite study takes one driver at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # a real PostgreSQL server

SPACE = {  # 15 searched dimensions on digits' five layers: far more plans than any budget here
    "prune_ratio": [0.0, 0.25, 0.5],
    "weight_bits": [2, 3, 4, 5, 6, 8],
    "act_bits": [8, 32],
    "distill_steps": [0],
}


def _job(path: Path, name: str, *, budget: int, **extra) -> Path:
    data = {"name": name, "task": "digits", "space": SPACE, "profiles": ["raspberry-pi-4"],
            "objectives": {"accuracy": "max", "size_bytes": "min"},
            "search": {"budget": budget, "workers": 1, "sampler": "random", "seed": 0}, **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run_cmd(job: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "slimsearch.cli", "run", str(job), "--out", str(out), "--executor", "local",
            "--no-progress", *extra]


def _study(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


def _mlflow_texts(tracking_uri: str) -> list[str]:
    """Every param and tag value (and key) of every run in the store at ``tracking_uri``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    texts = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    return texts


# A driver process of the race test below: the driver's own ask/tell loop (run_trials) on a
# shared study, every process seeded alike, started together through a file barrier.
_RACER = r"""
import json, os, sys, time
from pathlib import Path
import optuna
from slimsearch.search.driver import Range, open_study, run_trials
from slimsearch.search.samplers import seeded_at_first_trial

url, budget, barrier, n = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
(barrier / str(os.getpid())).touch()
while len(list(barrier.iterdir())) < n:
    time.sleep(0.02)
objectives = {"score": "max"}
sampler = seeded_at_first_trial(lambda seed: optuna.samplers.RandomSampler(seed=seed), 0)
study = open_study(url, "race", objectives, sampler)

def evaluate(params):
    time.sleep(0.3)
    return {"score": params["x"] + params["y"]}

ran = run_trials(study, {"x": Range(0, 999), "y": [0, 1, 2, 3]}, evaluate, objectives, n_trials=budget,
                 study_budget=budget, screen_duplicates=True)
print(json.dumps({"driver": f"{os.getpid()}", "ran": [[r.number, r.state.value] for r in ran]}))
"""


def test_three_drivers_racing_on_a_new_postgres_study_complete_exactly_its_budget(postgres, tmp_path):
    """Three processes, seeded alike, open a new database at once and share a budget of 9: 9 trials
    complete, none twice, each process ran some; a trial that lost the race for a last place is
    recorded as screened, never evaluated. (Without the study budget they would complete 27.)"""
    url = postgres.database("race")
    script, barrier = tmp_path / "racer.py", tmp_path / "barrier"
    script.write_text(_RACER)
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), url, "9", str(barrier), "3"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))

    import optuna

    trials = _study(url, "race").get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 9
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 9
    assert all(sum(1 for _, state in r["ran"] if state == "complete") >= 1 for r in reports)
    assert sum(len(r["ran"]) for r in reports) == len(trials)
    others = [t for t in trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.state == optuna.trial.TrialState.PRUNED and "screened" in t.user_attrs for t in others)
    # each trial names the driver (host:pid) that asked it: three drivers took part
    assert len({t.user_attrs["driver"] for t in complete}) == 3


def test_resume_recovers_only_the_interrupted_trials_of_its_own_job(postgres):
    """Two jobs share a study and each has a trial RUNNING; --resume of one (recover_interrupted
    with its owner) requeues its own trial and leaves the other job's, still being evaluated."""
    import optuna

    from slimsearch.search._study import open_study, recover_interrupted
    from slimsearch.search.driver import run_trials

    url = postgres.database("owners")
    objectives = {"score": "max"}

    def stopped(params):  # the driver stops mid-candidate (Ctrl-C; a kill leaves the same state)
        raise KeyboardInterrupt

    for seed, owner in enumerate(("/jobs/a", "/jobs/b")):
        study = open_study(url, "owners", objectives, optuna.samplers.RandomSampler(seed=seed))
        with pytest.raises(KeyboardInterrupt):
            run_trials(study, {"x": list(range(100))}, stopped, objectives, n_trials=2, study_budget=4, owner=owner)
    study = open_study(url, "owners", objectives, optuna.samplers.RandomSampler(seed=2))
    a_params = [t.params for t in study.trials if t.user_attrs["owner"] == "/jobs/a"]
    assert recover_interrupted(study, owner="/jobs/a") == 1
    states = {t.user_attrs.get("owner", "queued"): t.state for t in study.get_trials(deepcopy=False)}
    assert states == {"/jobs/a": optuna.trial.TrialState.FAIL, "/jobs/b": optuna.trial.TrialState.RUNNING,
                      "queued": optuna.trial.TrialState.WAITING}
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == a_params


def test_two_slimsearch_runs_share_a_postgres_study_and_registry(postgres, tmp_path, digits_task):
    """`slimsearch run` twice at once, each with its own --out, the same job name and study URL: the
    study ends with exactly the budget of candidates, none repeated; one driver has the password
    in its URL, the other gets it from PGPASSWORD (libpq); the job registry is PostgreSQL too.
    The password is in no output, no registry row, no MLflow param or tag, and no file of the job
    folders but job.json, which only its owner may read."""
    study_url = postgres.database("shared_study")
    registry_url = postgres.database("registry")
    password = postgres.password
    bare_url = postgres.url("shared_study", password=False)
    job_a = _job(tmp_path / "a.yaml", "shared", budget=4, storage=study_url)
    job_b = _job(tmp_path / "b.yaml", "shared", budget=4)
    env = {**os.environ, "SLIMSEARCH_REGISTRY": registry_url}
    out_a, out_b = tmp_path / "driver-a", tmp_path / "driver-b"
    procs = [
        subprocess.Popen(_run_cmd(job_a, out_a), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen(_run_cmd(job_b, out_b, "--storage", bare_url), env={**env, "PGPASSWORD": password},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert password not in out + err

    import optuna

    trials = _study(study_url, "shared").get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 4
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    print("trials completed per driver:", dict(Counter(t.user_attrs["driver"] for t in complete)))

    # each job folder's front.json is the shared study as it was when that driver ended: the
    # last to end reports every candidate, the other those done by then
    reported = [sorted(c["trial"] for c in json.loads((out / "front.json").read_text())["candidates"])
                for out in (out_a, out_b)]
    numbers = sorted(t.number for t in complete)
    assert numbers in reported
    assert all(set(r) <= set(numbers) for r in reported)
    from slimsearch.jobs.query import progress
    from slimsearch.storage.registry import Registry

    registry = Registry(registry_url)
    assert progress(str(out_a), registry).done == 4

    jobs = {Path(r.out).name: r for r in registry.jobs()}
    assert set(jobs) == {"driver-a", "driver-b"}
    assert {r.status for r in jobs.values()} == {"finished"}
    assert jobs["driver-a"].storage == study_url.replace(f":{password}@", ":***@")
    assert jobs["driver-b"].storage == bare_url
    assert json.loads(jobs["driver-a"].config)["storage"] == study_url.replace(f":{password}@", ":***@")
    assert password not in json.dumps([r.to_dict() for r in jobs.values()])
    for out in (out_a, out_b):
        texts = _mlflow_texts(f"sqlite:///{out / 'mlflow.db'}")
        assert any(t.startswith("storage=postgresql://slim") for t in texts)
        assert not [t for t in texts if password in t]
    # in the job folders the password is only in job.json (it reopens the study), readable by its owner only
    holding = [p.relative_to(tmp_path) for p in tmp_path.glob("driver-*/**/*")
               if p.is_file() and password.encode() in p.read_bytes()]
    assert holding == [Path("driver-a/job.json")]
    assert (out_a / "job.json").stat().st_mode & 0o077 == 0


def test_a_sqlite_study_refuses_a_second_driver(tmp_path, digits_task):
    """While one driver runs on a SQLite study, a second (another --out naming the same file, or
    --resume of the running job) stops with one line and exit 2, before writing a job."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    job = _job(tmp_path / "job.yaml", "sqlite-shared", budget=40, storage=storage)
    first = subprocess.Popen(_run_cmd(job, tmp_path / "first"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "first" / "job.json").exists():
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first driver did not start its job in 300 s"
            time.sleep(0.5)
        seconds = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for cmd in (_run_cmd(job, tmp_path / "second"), _run_cmd(job, tmp_path / "first", "--resume"))]
        for proc in seconds:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 2, err[-2000:]
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            assert lines[0].startswith(f"slimsearch: error: {job}: storage: {storage} is in use by another "
                                       f"slimsearch driver (pid {first.pid})")
        assert not (tmp_path / "second" / "job.json").exists()
        assert first.poll() is None  # the running driver goes on
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGINT)  # stops like Ctrl-C: candidates done are kept
            try:
                first.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait(30)


def test_a_running_job_on_a_postgres_study_refuses_a_resume_and_once_killed_shows_lost(postgres, tmp_path,
                                                                                      digits_task):
    """No SQLite lock guards a PostgreSQL study, so the job folder's does: `--resume` of a job still
    running is one line and exit 2 (it would have marked the running driver's trials as
    interrupted); after the driver is SIGKILLed the registry shows the job "lost", not "running"."""
    from slimsearch.storage.registry import Registry

    job = _job(tmp_path / "job.yaml", "pg-folder", budget=40, storage=postgres.database("folder_study"))
    out = tmp_path / "first"
    first = subprocess.Popen(_run_cmd(job, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while Registry().find_by_out(out) is None:
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first driver did not register its job in 300 s"
            time.sleep(0.5)
        assert Registry().find_by_out(out).status == "running"
        second = subprocess.run(_run_cmd(job, out, "--resume"), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines() == [
            f"slimsearch: error: --out {out.resolve()}: this job is being run by another slimsearch driver "
            f"(pid {first.pid}): wait for it to end or stop it (Ctrl-C, or `kill {first.pid}`)"]
        assert first.poll() is None  # the running driver goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    assert Registry().find_by_out(out).status == "lost"


def test_runs_reach_an_mlflow_tracking_server_with_a_postgres_backend(postgres, mlflow_server, tmp_path,
                                                                      digits_task):
    """`slimsearch run --tracking-uri http://...`: the server (backend store in PostgreSQL) holds
    the job's parent run and one child run per candidate; artifacts go to the server's artifact
    root; no param or tag holds the study database's password."""
    from mlflow.tracking import MlflowClient

    study_url = postgres.database("served_study")
    job = _job(tmp_path / "job.yaml", "served", budget=2, storage=study_url)
    proc = subprocess.run(_run_cmd(job, tmp_path / "out", "--tracking-uri", mlflow_server.url),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert postgres.password not in proc.stdout + proc.stderr
    assert f"MLflow: {mlflow_server.url}" in proc.stdout

    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("served")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("slimsearch.role") == "job"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = _study(study_url, "served").get_trials(deepcopy=False)
    assert sorted(int(r.data.tags["slimsearch.trial"]) for r in children) == sorted(t.number for t in trials)
    assert len(children) == 2
    assert all("accuracy" in r.data.metrics for r in children)
    assert parent.data.params["storage"] == study_url.replace(f":{postgres.password}@", ":***@")
    assert not [t for t in _mlflow_texts(mlflow_server.url) if postgres.password in t]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "front.json" in names
    assert list(mlflow_server.artifact_root.rglob("front.json"))  # in the server's root, not the job folder
    assert not (tmp_path / "out" / "mlartifacts").exists()
    # `slimsearch ui` points to the server's own UI instead of starting one on an http store
    ui = subprocess.run([sys.executable, "-m", "slimsearch.cli", "ui", str(tmp_path / "out")], capture_output=True,
                        text=True, timeout=120)
    assert ui.returncode == 0, ui.stderr[-2000:]
    assert f"MLflow UI of job out: {mlflow_server.url} " in ui.stdout


@pytest.mark.parametrize("field", ["storage", "tracking_uri"])
def test_an_unreachable_database_is_one_line_without_its_password(tmp_path, capsys, field):
    from slimsearch.cli import main

    secret = "hunter2-Zq81"
    job = _job(tmp_path / "job.yaml", "unreachable", budget=2,
               **{field: f"postgresql://slim:{secret}@127.0.0.1:1/study"})
    code = main(["run", str(job), "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"slimsearch: error: {job}: {field}: cannot connect to "
                               "postgresql://slim:***@127.0.0.1:1/study")
    assert secret not in captured.err + captured.out
    assert not (tmp_path / "out").exists()
