"""A digits job with a searched power mode: what Optuna, MLflow, front.json and front.html record."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests._cli import local_job, write_job
from tests.search.test_job_runner import _run

NAME = "digits-power"
JETSON = "jetson-orin-nano"
PROFILES = ["raspberry-pi-4", JETSON, "nvidia-t4"]
JOB = {
    "name": NAME,
    "task": "digits",
    "space": {"prune_ratio": [0.0, 0.5], "weight_bits": [8, 32], "act_bits": [8, 32], "distill_steps": [0]},
    "objectives": {"accuracy": "max", f"energy_mj@{JETSON}": "min"},
    "profiles": ["raspberry-pi-4", {"name": JETSON, "power_modes": ["7W", "15W"]}, "nvidia-t4"],
    "search": {"budget": 4, "workers": 1, "sampler": "random"},
}


@pytest.fixture(scope="module")
def power_job(tmp_path_factory, teacher_cache):
    ran = local_job(tmp_path_factory.mktemp("power"), JOB)
    out, result = ran.out, ran.result
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(NAME).experiment_id], max_results=100)
    children = {int(r.data.tags["slimsearch.trial"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    data = json.loads((out / "front.json").read_text())
    return SimpleNamespace(out=out, result=result, children=children, parent=parent, data=data)


@pytest.mark.slow  # their job takes 45 s: the full suite
def test_mlflow_has_energy_and_cost_for_every_named_profile(power_job):
    assert sorted(power_job.children) == [0, 1, 2, 3]
    for run in power_job.children.values():
        metrics, tags = run.data.metrics, run.data.tags
        for profile in PROFILES:
            assert metrics[f"energy_mj/{profile}"] > 0
            assert metrics[f"latency_ms/{profile}"] > 0
            assert tags[f"provenance.energy_mj/{profile}"] == "modelled"
        # a rented device has a cost; the others have none, and a tag says why instead of a NaN
        assert metrics["cost_usd_per_1m/nvidia-t4"] > 0
        for profile in ("raspberry-pi-4", JETSON):
            assert f"cost_usd_per_1m/{profile}" not in metrics
            assert tags[f"absent.cost_usd_per_1m/{profile}"] == (
                f"{profile} has no price per hour in its profile (not rented): no cost is modelled")
        assert "absent.cost_usd_per_1m/nvidia-t4" not in tags
        assert not any(v != v for v in metrics.values())  # no NaN anywhere
    parent = power_job.parent.data
    assert parent.metrics["teacher.cost_usd_per_1m/nvidia-t4"] > 0
    assert "absent.teacher.cost_usd_per_1m/raspberry-pi-4" in parent.tags
    assert parent.tags[f"teacher.power_mode.{JETSON}"] == "15W"  # the default mode, one of those listed


@pytest.mark.slow  # their job takes 45 s: the full suite
def test_the_searched_power_mode_is_a_param_a_tag_and_in_the_plan(power_job):
    modes = set()
    by_trial = {c["trial"]: c for c in power_job.data["candidates"]}
    for number, run in power_job.children.items():
        mode = run.data.params[f"power_mode.{JETSON}"]
        modes.add(mode)
        assert run.data.tags[f"power_mode.{JETSON}"] == mode
        # profiles the job lists no modes for are modelled at their default, and say so
        assert run.data.tags["power_mode.raspberry-pi-4"] == "stock"
        assert run.data.tags["power_mode.nvidia-t4"] == "70W"
        assert "power_mode.raspberry-pi-4" not in run.data.params  # not searched
        plan = json.loads(run.data.params["plan"])
        assert plan["power_modes"] == {JETSON: mode}
        assert by_trial[number]["params"][f"power_mode.{JETSON}"] == mode
        assert by_trial[number]["describe"].endswith(f"{JETSON} at {mode}")
    assert modes <= {"7W", "15W"}


@pytest.mark.slow  # their job takes 45 s: the full suite
def test_the_front_shows_accuracy_against_modelled_energy(power_job):
    data = power_job.data
    assert data["objectives"] == {"accuracy": "max", f"energy_mj@{JETSON}": "min"}
    for c in data["candidates"]:
        assert c["provenance"][f"energy_mj@{JETSON}"] == "modelled"
    html = (power_job.out / "front.html").read_text()
    assert f"energy_mj@{JETSON} (modelled)" in html
    stdout = power_job.result.stdout
    assert f"energy_mj@{JETSON} [modelled]" in stdout
    assert f"{JETSON} at " in stdout  # the plan column names the mode


def test_front_info_plots_the_first_objective_against_each_other_one():
    from slimsearch.dashboards.front import front_infos

    candidates = [{"trial": i, "describe": f"plan {i}",
                   "metrics": {"accuracy": a, "size_bytes": s, f"energy_mj@{JETSON}": e}}
                  for i, (a, s, e) in enumerate([(0.9, 100, 2.0), (0.8, 50, 3.0), (0.7, 80, 1.0)])]
    objectives = {"accuracy": "max", "size_bytes": "min", f"energy_mj@{JETSON}": "min"}
    infos = front_infos(candidates, objectives, front={0, 1, 2},
                        provenance={f"energy_mj@{JETSON}": "modelled"})
    assert [(i.y_name, i.x_name) for i in infos] == [("accuracy", "size_bytes"), ("accuracy", f"energy_mj@{JETSON}")]
    energy = infos[1]
    assert energy.x_label == f"energy_mj@{JETSON} (modelled)" and energy.y_label == "accuracy"
    assert energy.step == [(1.0, 0.7), (2.0, 0.9)]  # trial 1 is dominated on this pair
    assert f"energy_mj@{JETSON} (modelled): 2" in energy.points[0][4]


def test_local_energy_as_an_objective_needs_energy_counters(tmp_path):
    from slimsearch.hardware_profiles._energy import energy_meter

    if energy_meter() is not None:
        pytest.skip("this machine exposes RAPL counters")
    job = write_job(tmp_path, dict(JOB, objectives={"accuracy": "max", "energy_mj@local": "min"}))
    result = _run(str(job), "--out", str(tmp_path / "out"), "--executor", "local")
    assert result.code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"slimsearch: error: {job}: objectives: 'energy_mj@local' is measured only where")
    assert "energy_mj@<profile>" in line
    assert not (tmp_path / "out").exists()
