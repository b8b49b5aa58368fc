"""Job-file validation through the `slimsearch run` command: one clear error line, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slimsearch.cli import main
from slimsearch.jobs.load import load_job
from slimsearch.jobs.spec import JobSpec
from slimsearch.spaces.choices import WEIGHT_BITS

VALID = {
    "name": "digits-check",
    "task": "digits",
    "space": {"prune_ratio": [0.0, 0.5], "weight_bits": [4, 8], "act_bits": [8, 32], "distill_steps": [0]},
    "profiles": ["raspberry-pi-4"],
    "search": {"budget": 2, "workers": 1},
}


def _job(**changes) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in VALID.items()}
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return data


# (job changes, field path, texts that must appear: what was given and what is allowed)
CASES = {
    "unknown_key": ({"colour": "red"}, "colour",
                    ["unknown key", *[f"'{name}'" for name in JobSpec.model_fields]]),
    "unknown_nested_key": ({"search__patience": 3}, "search.patience",
                           ["unknown key", "'budget'", "'workers'", "'sampler'", "'seed'"]),
    "weight_bits_1": ({"space__weight_bits": [1]}, "space.weight_bits",
                      ["1", str(list(WEIGHT_BITS))]),
    "prune_ratio_1": ({"space__prune_ratio": [0.5, 1.0]}, "space.prune_ratio", ["1.0", "0 <= ratio < 1"]),
    "unknown_profile": ({"profiles": ["raspberry-pi-99"]}, "profiles.0",
                        ["'raspberry-pi-99'", "'jetson-orin-nano'", "'raspberry-pi-4'"]),
    "unknown_profile_with_modes": ({"profiles": ["raspberry-pi-4", {"name": "jetson-nano", "power_modes": ["5W"]}]},
                                   "profiles.1.name", ["'jetson-nano'", "'jetson-orin-nano'"]),
    "unknown_power_mode": ({"profiles": ["raspberry-pi-4", {"name": "jetson-orin-nano", "power_modes": ["7W", "10W"]}]},
                           "profiles.1.power_modes", ["'jetson-orin-nano'", "'10W'", "['15W', '7W']"]),
    "no_power_modes": ({"profiles": [{"name": "jetson-orin-nano", "power_modes": []}]}, "profiles.0.power_modes",
                       ["at least one mode", "['15W', '7W']"]),
    "power_modes_key_typo": ({"profiles": [{"name": "jetson-orin-nano", "modes": ["7W"]}]}, "profiles.0.modes",
                             ["unknown key", "['file', 'name', 'power_modes']"]),
    "profile_twice": ({"profiles": ["jetson-orin-nano", {"name": "jetson-orin-nano", "power_modes": ["7W"]}]},
                      "profiles", ["'jetson-orin-nano' is named twice"]),
    "constraint_syntax": ({"constraints": ["size_bytes =< 5"]}, "constraints.0",
                          ["'size_bytes =< 5'", "with op one of <=, >=, ==, <, >"]),
    "constraint_metric": ({"constraints": ["flops <= 5"]}, "constraints.0",
                          ["unknown metric 'flops'", "'size_bytes'", "'latency_ms@raspberry-pi-4'"]),
    "profile_not_a_name": ({"profiles": [4]}, "profiles.0", ["a profile is a name, a profile file, or {name: ..., power_modes:", "4"]),
    "unknown_objective": ({"objectives": {"accuracy": "max", "flops": "min"}}, "objectives",
                          ["'flops'", "'accuracy'", "'size_bytes'", "'latency_ms@local'",
                           "'latency_ms@raspberry-pi-4'", "'energy_mj@raspberry-pi-4'"]),
    # the raw figure beside a paired local latency is a diagnostic: never an objective
    "raw_latency_objective": ({"objectives": {"accuracy": "max", "latency_ms_raw_b64@local": "min"}}, "objectives",
                              ["'latency_ms_raw_b64@local'", "'latency_ms_b64@local'"]),
    "unknown_sampler": ({"search__sampler": "cmaes"}, "search.sampler",
                        ["'cmaes'", "'nsga2'", "'tpe'", "'random'"]),
    "budget_0": ({"search__budget": 0}, "search.budget", ["0", "greater than or equal to 1"]),
    "threads_0": ({"search__threads_per_worker": 0}, "search.threads_per_worker", ["0", "greater than or equal to 1"]),
    "time_limit_0": ({"search__time_limit_s": 0}, "search.time_limit_s", ["0", "greater than 0"]),
    "time_limit_inf": ({"search__time_limit_s": float("inf")}, "search.time_limit_s", ["inf", "a finite number"]),
    "unknown_task": ({"task": "cifar100"}, "task", ["'cifar100'", "'mnist'", "'digits'", "package.module:function"]),
    # these two need the task's layers, so they are checked against the digits teacher
    "unknown_layer": ({"space__layers": {"conv9": {"weight_bits": [4]}}}, "space.layers",
                      ["'conv9'", "['conv1', 'conv2', 'conv3', 'fc1', 'fc2']"]),
    "unprunable_layer": ({"space__layers": {"fc2": {"prune_ratio": [0.5]}}}, "space.layers.fc2.prune_ratio",
                         ["'fc2'", "['conv1', 'conv2', 'conv3', 'fc1']"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_job_file_is_one_error_line_and_exit_2(case, write_job, tmp_path, capsys):
    changes, field, allowed = CASES[case]
    job = write_job(_job(**changes))
    out = tmp_path / "out"
    code = main(["run", str(job), "--out", str(out), "--executor", "local", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"slimsearch: error: {job}: {field}: ")
    for text in allowed:
        assert text in lines[0], text
    assert "Traceback" not in err
    assert not out.exists()


def test_yaml_syntax_error_names_the_line(write_job, tmp_path, capsys):
    job = tmp_path / "broken.yaml"
    job.write_text("name: digits\ntask: digits\nspace: {prune_ratio: [0.5\n")
    assert main(["run", str(job), "--out", str(tmp_path / "out"), "--executor", "local"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"slimsearch: error: {job}: not valid YAML at line ")
    assert not (tmp_path / "out").exists()


def test_missing_job_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["run", str(missing), "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"slimsearch: error: {missing}: cannot read the job file")


def test_command_line_budget_is_validated_like_the_file(write_job, tmp_path, capsys):
    job = write_job(_job())
    assert main(["run", str(job), "--budget", "0", "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    # The value came from the flag, so the message names the flag, not the job file's field.
    assert line == "slimsearch: error: --budget: Input should be greater than or equal to 1 (got 0)"
    assert not (tmp_path / "out").exists()


def test_the_installed_command_prints_no_traceback(write_job, tmp_path):
    job = write_job(_job(space__weight_bits=[1, 4]))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "slimsearch.cli", "run", str(job), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"slimsearch: error: {job}: space.weight_bits: weight_bits choice 1 is not allowed; "
        f"allowed: {list(WEIGHT_BITS)}"
    ]
    assert result.stdout == ""
    assert not out.exists()


def test_a_valid_job_file_loads_with_overrides(write_job):
    spec = load_job(write_job(_job()), {"search.budget": 7, "search.workers": 2, "search.threads_per_worker": 1})
    assert (spec.search.budget, spec.search.workers, spec.search.sampler.value) == (7, 2, "nsga2")
    assert spec.search.threads_per_worker == 1 and load_job(write_job(_job())).search.threads_per_worker is None
    assert spec.space.weight_bits == [4, 8]
    assert list(spec.objectives) == ["accuracy", "latency_ms_b64@local", "size_bytes"]
    assert JobSpec.from_json(spec.to_json()) == spec


def test_profiles_name_power_modes_to_search_fix_or_leave_at_the_default(write_job):
    spec = load_job(write_job(_job(profiles=[
        "raspberry-pi-4",
        {"name": "jetson-orin-nano", "power_modes": ["7W", "15W", "7W"]},
        {"name": "jetson-tx2", "power_modes": ["MAXQ"]},
    ])))
    assert spec.profile_names == ["raspberry-pi-4", "jetson-orin-nano", "jetson-tx2"]
    # listed modes, duplicates dropped; a profile without power_modes is not in here (default mode)
    assert spec.power_mode_choices() == {"jetson-orin-nano": ("7W", "15W"), "jetson-tx2": ("MAXQ",)}
    # the teacher is modelled at the default mode when the job lists it, else at the first listed
    assert spec.teacher_power_modes() == {"jetson-orin-nano": "15W", "jetson-tx2": "MAXQ"}
    # metric names do not carry the mode
    assert "energy_mj@jetson-orin-nano" in spec.metric_names()
    assert JobSpec.from_json(spec.to_json()) == spec


def test_the_mnist_example_searches_two_jetson_power_modes_against_modelled_energy():
    from pathlib import Path

    spec = load_job(Path(__file__).parents[1] / "examples" / "mnist.yaml")
    assert spec.power_mode_choices() == {"jetson-orin-nano": ("7W", "15W")}
    assert spec.objectives["energy_mj@jetson-orin-nano"].value == "min"
    assert spec.search.budget == 24


def _profile_file(folder, name: str, filename: str = "box.yaml"):
    """A profile file as `slimsearch hw calibrate` would write one: a shipped profile under another name."""
    import yaml

    from slimsearch.hardware_profiles import load_profile

    data = load_profile("raspberry-pi-4").to_dict()
    data["name"] = name
    path = folder / filename
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_profile_file_is_named_by_its_path_relative_to_the_job_file(tmp_path, write_job, monkeypatch):
    (tmp_path / "hw").mkdir()
    _profile_file(tmp_path / "hw", "my-box")
    job = write_job(_job(profiles=["hw/box.yaml"],
                         objectives={"accuracy": "max", "latency_ms@my-box": "min"}))
    monkeypatch.chdir("/")  # relative to the job file, not to where the command runs
    spec = load_job(job)
    assert spec.profile_names == ["my-box"]
    assert spec.profile_refs == [str((tmp_path / "hw" / "box.yaml").resolve())]
    assert "energy_mj@my-box" in spec.metric_names()


@pytest.mark.parametrize("entry, words", [
    ("hw/missing.yaml", ["profiles.0", "missing.yaml", "does not exist"]),
    ({"file": "hw/box.yaml", "name": "other"}, ["profiles.0", "holds profile 'my-box', not 'other'"]),
    ("hw/local.yaml", ["profiles.0", "reserved", "latency_ms@local"]),
])
def test_bad_profile_files_are_refused_in_one_line(tmp_path, write_job, capsys, entry, words):
    (tmp_path / "hw").mkdir()
    _profile_file(tmp_path / "hw", "my-box")
    _profile_file(tmp_path / "hw", "local", "local.yaml")
    job = write_job(_job(profiles=[entry]))
    assert main(["run", str(job), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    for word in words:
        assert word in line
    assert not (tmp_path / "out").exists()
