"""After a digits job: `slimsearch jobs|status|front|report|export|ui` and their Python mirrors."""

from __future__ import annotations

import json
import shutil
import urllib.request
from types import SimpleNamespace

import pytest

import slimsearch
from tests._cli import cli, local_job
from tests._real import missing

NAME = "digits-registry"
JOB = {
    "name": NAME,
    "task": "digits",
    "space": {"prune_ratio": [0.0, 0.25, 0.5], "weight_bits": [4, 8, 32], "act_bits": [8, 32],
              "distill_steps": [0, 10]},
    "profiles": ["raspberry-pi-4"],
    "search": {"budget": 3, "workers": 1},
}


@pytest.fixture(scope="module")
def job(tmp_path_factory, teacher_cache, slimsearch_home):
    out = local_job(tmp_path_factory.mktemp("registry-job"), JOB).out
    (record,) = [j for j in slimsearch.jobs() if j.out == str(out.resolve())]
    return SimpleNamespace(out=out.resolve(), id=record.id, front=json.loads((out / "front.json").read_text()))


def test_the_run_is_registered_as_finished(job):
    record = next(j for j in slimsearch.jobs() if j.id == job.id)
    assert (record.name, record.status, record.budget, record.study_name) == (NAME, "finished", 3, NAME)
    state = json.loads((job.out / "job.json").read_text())
    assert record.parent_run_id == state["parent_run_id"] and record.experiment_id
    assert record.ended >= record.started
    table = cli("jobs")
    assert table.code == 0
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["id", "name", "status", "budget"]
    assert any(r.split()[:4] == [str(job.id), NAME, "finished", "3"] for r in rows)


@pytest.mark.parametrize("how", ["id", "name", "folder"])
def test_status_by_id_name_or_folder(job, how):
    ref = {"id": str(job.id), "name": NAME, "folder": str(job.out)}[how]
    result = cli("status", ref, "--json")
    assert result.code == 0, result.stderr
    status = json.loads(result.stdout)
    assert (status["done"], status["budget"], status["status"]) == (3, 3, "finished")
    assert status["front_size"] == len(job.front["front"])
    # the hypervolume of the job's candidates against the teacher-based reference, recomputed from
    # front.json (with measured latencies the 3 candidates may all be dominated by the teacher: 0 then)
    from slimsearch.search.pareto import hypervolume_reference, hypervolume_series

    objectives = job.front["objectives"]
    cands = [{"trial": c["trial"], "metrics": {n: c["metrics"][n] for n in objectives}, "feasible": c["feasible"]}
             for c in job.front["candidates"]]
    expected = hypervolume_series(cands, objectives, hypervolume_reference(objectives, job.front["teacher"], cands))
    assert status["hypervolume"] == pytest.approx(expected[-1]) and status["seconds_left"] is None
    text = cli("status", ref).stdout
    assert "progress: 3/3 candidates" in text and f"front: {len(job.front['front'])} candidates" in text


def test_an_unknown_job_is_one_line_and_exit_2(job):
    result = cli("status", "no-such-job")
    assert result.code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("slimsearch: error: JOB 'no-such-job': no registered job has this id or name")


def test_front_table_and_json_agree_with_front_json(job):
    data = json.loads(cli("front", NAME, "--json").stdout)
    assert [c["trial"] for c in data["front"]] == [c["trial"] for c in job.front["front"]]
    assert data["front"][0]["describe"] == job.front["front"][0]["describe"]
    assert slimsearch.front(NAME) == job.front["front"]
    table = cli("front", str(job.id)).stdout
    assert f"Pareto front: {len(job.front['front'])} of 3 candidates" in table


def test_front_table_labels_the_teachers_figures_even_when_the_front_is_empty(job, tmp_path):
    """The teacher row is the only one then: its latencies and energy still say measured or modelled."""
    import shutil

    folder = tmp_path / "empty-front"
    shutil.copytree(job.out, folder, ignore=shutil.ignore_patterns("mlartifacts", "ray", "models"))
    data = json.loads((folder / "front.json").read_text())
    (folder / "front.json").write_text(json.dumps({**data, "front": []}))
    table = cli("front", str(folder))
    assert table.code == 0, table.stderr
    header, teacher = table.stdout.splitlines()[1:3]
    assert "latency_ms@local [measured]" in header and "latency_ms@raspberry-pi-4 [modelled]" in header, header
    assert teacher.startswith("teacher ")
    labelled = json.loads(cli("front", str(folder), "--json").stdout)["teacher_provenance"]
    assert labelled["latency_ms@local"] == "measured" and labelled["latency_ms@raspberry-pi-4"] == "modelled"


def test_output_into_a_reader_that_stopped_ends_quietly(job):
    """`slimsearch front JOB | head`: no BrokenPipeError traceback, exit 141 (128 + SIGPIPE)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "slimsearch.cli", "front", str(job.out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the command writes its first line
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (141, "")


def test_report_is_written_and_logged_to_the_parent_run(job):
    from mlflow.tracking import MlflowClient

    assert (job.out / "report.html").stat().st_size > 1_000_000  # plotly.js inline
    state = json.loads((job.out / "job.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    names = {a.path for a in client.list_artifacts(state["parent_run_id"])}
    assert {"report.html", "front.json", "front.html"} <= names


@pytest.mark.slow
def test_report_of_a_real_job_renders_in_chromium(job):
    from slimsearch.dashboards.browser import find_chromium, render

    if find_chromium() is None:
        missing("no chromium binary on PATH (.ci/run installs Debian's chromium)")
    shown = render(job.out / "report.html")
    assert (shown.state, shown.errors) == ("rendered", [])
    assert "fig-0:Pareto front (all objectives)" in shown.traces


@pytest.fixture(scope="module")
def exported(job, tmp_path_factory):
    import mlflow

    out = tmp_path_factory.mktemp("export") / "pi4"
    # a process whose MLflow points at another store (as an earlier job leaves it): export must
    # still log and register in the job's own store, and leave the process's choice alone
    elsewhere = f"sqlite:///{tmp_path_factory.mktemp('elsewhere') / 'mlflow.db'}"
    mlflow.set_tracking_uri(elsewhere)
    result = cli("export", NAME, "--out", str(out), "--where", "accuracy>=0.5",
                 "--minimize", "latency_ms@raspberry-pi-4", "--format", "onnx")
    assert result.code == 0, result.stderr
    assert mlflow.get_tracking_uri() == elsewhere
    return SimpleNamespace(out=out, manifest=json.loads((out / "manifest.json").read_text()), stdout=result.stdout)


def test_export_picks_the_fastest_candidate_meeting_where(job, exported):
    m = exported.manifest
    meeting = [c for c in job.front["candidates"] if c["metrics"]["accuracy"] >= 0.5]
    best = min(meeting, key=lambda c: c["metrics"]["latency_ms@raspberry-pi-4"])
    assert m["trial"] == best["trial"]
    assert m["selection"] == "lowest latency_ms@raspberry-pi-4 where accuracy >= 0.5"
    record = next(j for j in slimsearch.jobs() if j.id == job.id)
    assert [e["alias"] for e in record.exports] == ["best-raspberry-pi-4"]


def test_registry_alias_loads_the_exported_model_and_reproduces_its_test_metric(job, exported):
    import mlflow.onnx
    import onnx

    from slimsearch.deploy.onnx_graph import ort_predict
    from slimsearch.tasks import load_task

    reg = exported.manifest["registry"]
    assert reg["uri"] == f"models:/slimsearch-{NAME}@best-raspberry-pi-4"
    mlflow.set_tracking_uri(reg["tracking_uri"])
    model = mlflow.onnx.load_model(reg["uri"])
    written = onnx.load(str(exported.out / "model.onnx"))
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in written.graph.node]
    assert sorted(i.name for i in model.graph.initializer) == sorted(i.name for i in written.graph.initializer)
    import onnxruntime as ort

    task = load_task("digits")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    score = task.metric(ort_predict(session, task.test.x), task.test.y)
    assert score == pytest.approx(exported.manifest["test_accuracy_by_format"]["onnx"], abs=1e-9)
    # rebuilt with the worker's thread count, the model is the one the search measured
    state = json.loads((job.out / "job.json").read_text())
    assert exported.manifest["rebuilt_with_threads"] == state["threads"][-1][1]
    assert score == pytest.approx(exported.manifest["test_accuracy_recorded"], abs=1e-6)


@pytest.mark.parametrize("where, message", [
    ("accuracy>=1.5", "--where 'accuracy>=1.5': no candidate meets it; closest: trial "),
    ("accuracy=>0.9", "--where 'accuracy=>0.9': 'accuracy=>0.9' is not 'metric OP number'"),
    ("acuracy>=0.9", "--where 'acuracy>=0.9': no metric 'acuracy'; the candidates have ["),
])
def test_export_refuses_a_where_it_cannot_meet_or_read(job, tmp_path, where, message):
    result = cli("export", NAME, "--out", str(tmp_path / "x"), "--where", where)
    assert result.code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"slimsearch: error: {message}"), line
    assert not (tmp_path / "x").exists()


def test_export_refuses_an_out_that_escapes(job, tmp_path):
    result = cli("export", NAME, "--out", str(tmp_path / "a" / ".." / ".." / "elsewhere"))
    assert result.code == 2 and "'..' is not allowed" in result.stderr
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("keep me")
    (out / "model.onnx").symlink_to(victim)
    result = cli("export", NAME, "--out", str(out), "--format", "onnx")
    assert result.code == 2
    (line,) = result.stderr.splitlines()
    assert f"model.onnx there resolves to {victim}, outside the export folder" in line
    assert victim.read_text() == "keep me"


def test_export_refuses_a_job_whose_teacher_changed(job, tmp_path):
    copy = tmp_path / "job"
    copy.mkdir()
    shutil.copy(job.out / "front.json", copy)
    state = json.loads((job.out / "job.json").read_text())
    state["teacher_sha256"] = "0" * 64
    (copy / "job.json").write_text(json.dumps(state))
    result = cli("export", str(copy), "--out", str(tmp_path / "x"))
    assert result.code == 2
    assert "the teacher of task 'digits' changed since the search" in result.stderr
    assert not (tmp_path / "x" / "model.onnx").exists()


@pytest.mark.slow
def test_ui_serves_the_jobs_experiment_on_loopback(job):
    from slimsearch.storage.ui import start_ui

    state = json.loads((job.out / "job.json").read_text())
    server = start_ui(state["tracking_uri"], log_path=job.out / "mlflow-ui.log")
    try:
        server.wait_ready(timeout=180)
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url + "/", timeout=30) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        api = f"{server.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={NAME}"
        with urllib.request.urlopen(api, timeout=30) as resp:
            assert json.loads(resp.read())["experiment"]["name"] == NAME
    finally:
        server.stop()
    assert server.process.poll() is not None


def test_parent_run_has_the_hypervolume_after_each_evaluation_and_children_their_tags(job):
    from mlflow.tracking import MlflowClient

    state = json.loads((job.out / "job.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    history = sorted(client.get_metric_history(state["parent_run_id"], "hypervolume"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3]
    values = [m.value for m in history]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(slimsearch.status(NAME).hypervolume)
    for c in job.front["candidates"]:
        tags = client.get_run(c["run_id"]).data.tags
        assert (tags["screened"], tags["stopped_early"]) == ("false", "false")


def test_front_members_carry_their_onnx_model_and_it_reproduces_their_metric(job):
    import mlflow.onnx
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    from slimsearch.deploy.onnx_graph import ort_predict
    from slimsearch.storage.tracking import MODEL_TAG
    from slimsearch.tasks import load_task

    state = json.loads((job.out / "job.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    mlflow.set_tracking_uri(state["tracking_uri"])
    task = load_task("digits")
    assert job.front["front"]
    for c in job.front["candidates"]:
        tags = client.get_run(c["run_id"]).data.tags
        if not c["on_front"]:
            assert MODEL_TAG not in tags, f"trial {c['trial']} is off the front yet holds a model"
            continue
        model = mlflow.onnx.load_model(tags[MODEL_TAG])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        score = task.metric(ort_predict(session, task.val.x), task.val.y)
        assert abs(score - c["metrics"]["accuracy"]) <= 0.005, c["trial"]
    assert list((job.out / "models").iterdir()) == []  # logged, then removed; the dominated ones deleted


@pytest.mark.slow
def test_ui_command_prints_its_loopback_url_and_stops_on_ctrl_c(job):
    import os
    import signal
    import subprocess
    import sys

    from slimsearch.storage.ui import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slimsearch.cli", "ui", str(job.id), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # printed once the UI answers
        assert f"on http://127.0.0.1:{port} " in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)


@pytest.mark.slow
def test_report_command_draws_a_given_random_search_baseline_and_takes_a_screenshot(job, tmp_path):
    from slimsearch.dashboards.browser import find_chromium

    page, png = tmp_path / "r.html", tmp_path / "r.png"
    args = ["report", NAME, "--baseline", str(job.out), "--out", str(page)]
    if find_chromium() is not None:
        args += ["--screenshot", str(png)]
    result = cli(*args)
    assert result.code == 0, result.stderr
    import html

    assert f"random search: job '{NAME}' (3 evaluations)" in html.unescape(page.read_text(encoding="utf-8"))
    if find_chromium() is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = cli("report", NAME, "--baseline", "no-such-job")
    assert bad.code == 2 and "JOB 'no-such-job'" in bad.stderr


@pytest.mark.slow  # two jobs (17 s): the full suite
@pytest.mark.parametrize("faults, failed", [("raise," * 12, 10), ("raise", 1)], ids=["every-candidate", "one"])
def test_run_exits_1_only_when_every_candidate_failed(tmp_path, monkeypatch, teacher_cache, faults, failed):
    """A job none of whose candidates completed exits 1 with the runner's reason as its one stderr line, so a
    pipeline does not go on to export; a job where some failed and the others completed exits 0."""
    from pathlib import Path

    from tests._cli import write_job

    monkeypatch.setenv("SLIMSEARCH_TEST_FAULTS", faults)  # tests/search/faulty_task.py: one action per candidate
    monkeypatch.setenv("SLIMSEARCH_TEST_FAULT_DIR", str(tmp_path))
    job = write_job(tmp_path, {**JOB, "name": "failing", "task": "faulty_task:digits_with_faults",
                               "task_path": str(Path(__file__).resolve().parent / "search"),
                               "space": {**JOB["space"], "distill_steps": [5]},
                               "search": {"budget": 2, "workers": 1, "seed": 0}})
    out = tmp_path / "out"
    result = cli("run", str(job), "--out", str(out), "--executor", "local", "--no-progress")
    front = json.loads((out / "front.json").read_text())
    assert len(front["failed"]) == failed
    if failed == 10:  # the failure cap of a 2-candidate run
        assert result.code == 1
        assert result.stderr.splitlines() == ["slimsearch: stopped after 0 of 2 candidates: 10 candidates failed "
                                              "(see front.json's 'failed' or the runs' error tags)"]
        assert front["candidates"] == []
    else:
        assert result.code == 0, result.stderr
        assert "stopped after" not in result.stderr
        assert len(front["candidates"]) == 2
