"""search.device and search.gpus_per_worker: validated in the job file, resolved against the machine
(jobs/resources.py: device, workers, threads, the Ray trial's request), and a GPU the machine lacks
refused by ``slimsearch run`` in one line, exit 2, before anything is written.

The resolution is pure (the GPU count is a parameter), so the GPU cases run on a machine without one;
the refusal runs the real command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from slimsearch.exceptions import ConfigError
from slimsearch.jobs.load import load_job
from slimsearch.jobs.resources import resolve_resources
from slimsearch.jobs.spec import JobSpec, SearchSpec

JOB = {"name": "device-job", "task": "digits", "profiles": ["raspberry-pi-4"],
       "space": {"prune_ratio": [0.0], "weight_bits": [8], "act_bits": [32], "distill_steps": [0]},
       "search": {"budget": 1}}
GPUS_HERE = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _job(**search) -> dict:
    return {**JOB, "search": {**JOB["search"], **search}}


def test_device_and_gpu_share_default_to_auto_and_unset_and_round_trip_through_json():
    spec = JobSpec.model_validate(_job(device="cuda:1", gpus_per_worker=0.5))
    assert (spec.search.device, spec.search.gpus_per_worker) == ("cuda:1", 0.5)
    assert JobSpec.from_json(spec.to_json()) == spec
    default = JobSpec.model_validate(JOB).search
    assert (default.device, default.gpus_per_worker, default.workers) == ("auto", None, None)


@pytest.mark.parametrize("search, field, words", [
    ({"device": "gpu"}, "search.device", ["not a device", "allowed: 'auto'", "'cuda:N'", "(got 'gpu')"]),
    ({"device": "cuda:x"}, "search.device", ["not a device", "(got 'cuda:x')"]),
    ({"gpus_per_worker": -1}, "search.gpus_per_worker", ["greater than or equal to 0"]),
    ({"gpus_per_worker": 1.5}, "search.gpus_per_worker", ["whole number of GPUs", "(got 1.5)"]),
    ({"device": "cpu", "gpus_per_worker": 1}, "search.gpus_per_worker", ["device 'cpu' uses no GPU", "allowed: 0"]),
])
def test_bad_device_settings_are_one_line_naming_the_field_and_what_is_allowed(write_job, search, field, words):
    with pytest.raises(ConfigError) as info:
        load_job(write_job(_job(**search)))
    message = str(info.value)
    assert "\n" not in message and f"job.yaml: {field}: " in message
    for word in words:
        assert word in message


def _search(**kw) -> SearchSpec:
    return SearchSpec(**kw)


@pytest.mark.parametrize("search, gpus, executor, expected", [
    # (device, worker_device, workers, threads, gpus_per_worker)
    ({}, 0, "ray", ("cpu", "cpu", 8, 1, 0.0)),  # today's behaviour: one worker per core, CPU only
    ({"device": "cpu"}, 2, "ray", ("cpu", "cpu", 8, 1, 0.0)),
    ({}, 2, "ray", ("cuda", "cuda", 2, 4, 1.0)),  # auto with GPUs: one worker per GPU, a whole GPU each
    ({"gpus_per_worker": 0.5}, 1, "ray", ("cuda", "cuda", 2, 4, 0.5)),  # a fraction: two share the GPU
    ({"device": "cuda:1"}, 2, "ray", ("cuda:1", "cuda", 2, 4, 1.0)),  # a Ray trial's GPU is the one Ray gives it
    ({"device": "cuda:1"}, 2, "local", ("cuda:1", "cuda:1", 2, 4, 0.0)),  # this process: that very GPU
    ({"workers": 3, "threads_per_worker": 2, "gpus_per_worker": 0.25}, 1, "ray", ("cuda", "cuda", 3, 2, 0.25)),
])
def test_resolved_resources(search, gpus, executor, expected):
    r = resolve_resources(_search(**search), cpus=8, gpus=gpus, executor=executor)
    assert (r.device, r.worker_device, r.workers, r.threads, r.gpus_per_worker) == expected


def test_the_ray_trial_request_carries_the_gpu_share_only_on_a_gpu():
    assert resolve_resources(_search(), cpus=8, gpus=0).trial() == {"cpu": 1}
    assert resolve_resources(_search(gpus_per_worker=0.5), cpus=8, gpus=1).trial() == {"cpu": 4, "gpu": 0.5}


def test_a_driver_without_a_gpu_scores_the_teacher_on_its_cpu_while_the_cluster_trials_use_gpus():
    r = resolve_resources(_search(device="cuda"), cpus=8, gpus=4, driver_gpus=0)
    assert (r.device, r.worker_device, r.gpus_per_worker) == ("cpu", "cuda", 1.0)


@pytest.mark.parametrize("search, gpus, words", [
    ({"device": "cuda"}, 0, ["job.yaml: search.device: ", "no CUDA GPU", "allowed: 'cpu' or 'auto'"]),
    ({"device": "cuda:1"}, 1, ["job.yaml: search.device: ", "has 1 CUDA GPU(s)"]),
    ({"device": "cuda", "gpus_per_worker": 0}, 1, ["job.yaml: search.gpus_per_worker: ", "Ray hides the GPUs"]),
    ({"gpus_per_worker": 2}, 1, ["job.yaml: search.gpus_per_worker: ", "no trial would start", "at most 1"]),
])
def test_resources_the_machine_lacks_are_refused_in_one_line(search, gpus, words):
    with pytest.raises(ConfigError) as info:
        resolve_resources(_search(**search), cpus=8, gpus=gpus, source="job.yaml")
    for word in words:
        assert word in str(info.value)


def test_a_flag_is_named_instead_of_the_field():
    with pytest.raises(ConfigError, match=r"^--device: device 'cuda'"):
        resolve_resources(_search(device="cuda"), cpus=8, gpus=0, source="job.yaml",
                          flags={"search.device": "--device"})


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimsearch.cli", "run", *args, "--executor", "local",
                           "--no-progress"], capture_output=True, text=True, env=dict(os.environ), timeout=300)


@pytest.mark.parametrize("how", ["job-file", "flag"])
def test_slimsearch_run_refuses_a_gpu_this_machine_lacks_before_writing_anything(tmp_path, write_job, how):
    """``cuda:<the GPU count>`` names a GPU past the last one on any machine; plain ``cuda`` too where there is none."""
    device = f"cuda:{GPUS_HERE}"
    job = write_job(_job(device=device) if how == "job-file" else JOB)
    out = tmp_path / "out"
    done = _run(str(job), "--out", str(out), *(["--device", device] if how == "flag" else []))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    where = f"{job}: search.device: " if how == "job-file" else "--device: "
    assert lines[0].startswith(f"slimsearch: error: {where}device {device!r}: this machine has ")
    assert not out.exists()  # nothing written: not even the job folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


@pytest.mark.skipif(GPUS_HERE > 0, reason="'cuda' is refused only on a machine without CUDA")
def test_slimsearch_run_refuses_cuda_without_a_gpu(tmp_path, write_job):
    out = tmp_path / "out"
    done = _run(str(write_job(_job(device="cuda"))), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"slimsearch: error: {tmp_path / 'job.yaml'}: search.device: device 'cuda': this machine has no CUDA GPU "
        "that torch can use (torch.cuda.is_available() is False); allowed: 'cpu' or 'auto'"]
    assert not out.exists()
