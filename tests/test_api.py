"""The Python API: ``slimsearch.run`` does what ``slimsearch run`` does, and ``jobs``/``search``
are both callable and the packages of their names."""

from __future__ import annotations

import json

import pytest

import slimsearch
from slimsearch import ConfigError
from tests._cli import cli, write_job

JOB = {
    "name": "digits-api",
    "task": "digits",
    "space": {"prune_ratio": [0.0, 0.5], "weight_bits": [8, 32], "act_bits": [32], "distill_steps": [0]},
    "profiles": ["raspberry-pi-4"],
    "search": {"budget": 2, "workers": 1},
}


@pytest.mark.slow  # a whole MNIST job (30-70 s): the full suite
def test_run_from_python_gives_the_front_the_command_gives(tmp_path, teacher_cache, slimsearch_home):
    job = write_job(tmp_path, JOB)
    result = slimsearch.run(job, out=tmp_path / "py", executor="local", progress=False, budget=3, log=lambda _: None)
    assert len(result.candidates) == 3 and result.front and not result.stopped
    command = cli("run", str(job), "--out", str(tmp_path / "cli"), "--executor", "local", "--no-progress",
                  "--budget", "3")
    assert command.code == 0, command.stderr
    py, cl = (json.loads((tmp_path / d / "front.json").read_text()) for d in ("py", "cli"))
    plans = [sorted(json.dumps(c["plan"], sort_keys=True) for c in f["candidates"]) for f in (py, cl)]
    assert plans[0] == plans[1]  # the same seed proposes the same plans by either door
    mine = [r for r in slimsearch.jobs() if r.out in (str((tmp_path / "py").resolve()), str((tmp_path / "cli").resolve()))]
    assert [(r.name, r.status) for r in mine] == [("digits-api", "finished")] * 2


@pytest.mark.slow  # a whole MNIST job (30-70 s): the full suite
def test_run_takes_a_job_as_data_and_resumes_it(tmp_path, teacher_cache, slimsearch_home):
    first = slimsearch.run(dict(JOB), out=tmp_path / "out", executor="local", progress=False, log=lambda _: None)
    again = slimsearch.run(dict(JOB), out=tmp_path / "out", executor="local", progress=False, resume=True,
                           budget=3, log=lambda _: None)
    assert len(first.candidates) == 2 and len(again.candidates) == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"budgets": 3}, "run: unknown keyword 'budgets'; allowed: ['budget', "),
    ({"budget": 0}, "budget=: Input should be greater than or equal to 1"),
    ({"executor": "dask"}, "executor: 'dask' is not an executor; allowed: ['ray', 'local']"),
])
def test_bad_input_from_python_is_one_config_error_and_writes_nothing(tmp_path, kwargs, message):
    with pytest.raises(ConfigError) as info:
        slimsearch.run(dict(JOB), out=tmp_path / "out", **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_jobs_and_search_are_callable_and_packages():
    import slimsearch.jobs.query
    import slimsearch.search.pareto

    assert callable(slimsearch.jobs) and callable(slimsearch.search)
    assert slimsearch.search.pareto.pareto_front([[1, 2], [2, 1], [2, 2]], ["min", "min"]) == [0, 1]
    result = slimsearch.search({"x": [0, 1, 2]}, lambda p: {"y": float(p["x"])}, {"y": "max"}, budget=3,
                               executor="local", sampler="random")
    assert max(t.values["y"] for t in result.trials if t.values) == 2.0


def test_export_stays_callable_once_its_module_is_imported():
    import slimsearch.export  # what the command and the job code import

    assert callable(slimsearch.export) and slimsearch.export.export_job
