"""A user task (`module:function`): the runnable example in examples/user_task, loaded and searched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimsearch.cli import main
from slimsearch.exceptions import ConfigError
from slimsearch.tasks import Task, load_task

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "user_task"


def test_the_example_user_task_loads_with_its_own_metric():
    task = load_task("tabular_task:breast_cancer", path=str(EXAMPLE))
    assert isinstance(task, Task)
    assert task.metric_name == "balanced_accuracy"
    assert task.example_input.shape == (1, 30)
    from slimsearch.evaluators import score

    assert score(task.teacher, task.val, task) > 0.9  # a trained teacher, not a random one
    again = load_task("tabular_task:breast_cancer", path=str(EXAMPLE))
    assert again.teacher_sha256 == task.teacher_sha256  # the same teacher in every process that loads it


@pytest.mark.parametrize("name, words", [
    ("no_such_module_here:build", ["cannot import module 'no_such_module_here'"]),
    ("tabular_task:no_such_function", ["module 'tabular_task' has no function 'no_such_function'"]),
])
def test_a_task_that_cannot_be_loaded_says_what_is_missing(name, words):
    with pytest.raises(ConfigError) as err:
        load_task(name, path=str(EXAMPLE))
    for word in words:
        assert word in str(err.value)


def test_the_example_user_job_runs_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the module is found next to the job file, not in the working directory
    out = tmp_path / "out"
    code = main(["run", str(EXAMPLE / "breast_cancer.yaml"), "--budget", "2", "--executor", "local",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    front = json.loads((out / "front.json").read_text())
    assert front["metric"] == "balanced_accuracy"
    assert len(front["candidates"]) == 2
    assert all(0.0 <= c["metrics"]["balanced_accuracy"] <= 1.0 for c in front["candidates"])
