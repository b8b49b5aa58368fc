"""The job registry: schema versions, job records, statuses, exports, lookup by id, name and folder."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, text

from slimsearch.exceptions import ConfigError
from slimsearch.storage.registry import MIGRATIONS, JobStatus, Registry, config_hash, registry_url


def _start(registry, tmp_path, name="j", folder="out"):
    return registry.record_start(name=name, out=tmp_path / folder, config_json='{"name": "%s", "b": 1}' % name,
                                 study_name=name, storage="sqlite:///s.db", tracking_uri="sqlite:///m.db",
                                 experiment_id="1", parent_run_id="abc", budget=4)


def test_default_location_follows_slimsearch_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMSEARCH_REGISTRY", raising=False)
    monkeypatch.setenv("SLIMSEARCH_HOME", str(tmp_path))
    assert registry_url() == f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("SLIMSEARCH_REGISTRY", "sqlite:///elsewhere.db")
    assert registry_url() == "sqlite:///elsewhere.db"


def test_a_new_database_is_migrated_to_the_latest_version(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    registry = Registry(url)
    assert registry.jobs() == []
    engine = create_engine(url)
    assert Registry.schema_version(engine) == len(MIGRATIONS) == 2
    assert {"jobs", "exports", "schema_version"} <= set(inspect(engine).get_table_names())
    assert Registry.migrate(engine) == 2  # idempotent


def test_a_database_newer_than_the_code_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    Registry(url).jobs()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = 99"))
    with pytest.raises(ConfigError, match="schema version 99 is newer"):
        Registry(url).jobs()


def test_jobs_are_recorded_found_and_finished(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    first = _start(registry, tmp_path, "alpha", "a")
    second = _start(registry, tmp_path, "alpha", "b")
    third = _start(registry, tmp_path, "beta", "c")
    assert (first, second, third) == (1, 2, 3)
    registry.record_end(first, JobStatus.FINISHED)
    registry.record_end(second, JobStatus.STOPPED, "KeyboardInterrupt: ")
    registry.record_end(third, JobStatus.FAILED, "RuntimeError: boom")
    jobs = registry.jobs()
    assert [(j.id, j.name, j.status) for j in jobs] == [(1, "alpha", "finished"), (2, "alpha", "stopped"),
                                                        (3, "beta", "failed")]
    assert jobs[2].error == "RuntimeError: boom" and jobs[0].ended >= jobs[0].started
    assert jobs[0].config_hash == config_hash('{"b": 1, "name": "alpha"}')  # key order does not matter
    assert registry.find("1").out == str(tmp_path / "a")
    assert registry.find("alpha").id == 2  # the latest of that name
    assert registry.find(str(tmp_path / "c")).name == "beta"
    assert registry.find("nothing") is None
    # resuming a job in the same folder updates its row instead of adding one
    assert _start(registry, tmp_path, "alpha", "a") == 1
    assert registry.find("1").status == "running" and len(registry.jobs()) == 3


def test_exports_belong_to_their_job(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    job = _start(registry, tmp_path)
    registry.record_export(job, out=tmp_path / "x", formats=["onnx"], run_id="r1", trial=2, model_name="m",
                           model_version="1", alias="best-raspberry-pi-4")
    (record,) = registry.jobs()
    (export,) = record.exports
    assert export["alias"] == "best-raspberry-pi-4" and export["trial"] == 2 and export["formats"] == "onnx"


def test_a_random_search_twin_is_found_as_the_baseline(tmp_path):
    import json

    from slimsearch.jobs.query import find_random_baseline

    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    base = {"task": "digits", "space": {"weight_bits": [4, 8]}, "objectives": {"accuracy": "max", "size_bytes": "min"},
            "profiles": ["raspberry-pi-4"]}

    def job(folder, name, sampler, status=JobStatus.FINISHED, **changes):
        spec = dict(base, name=name, search={"budget": 4, "workers": 1, "seed": 0, "sampler": sampler}, **changes)
        out = tmp_path / folder
        out.mkdir()
        (out / "job.json").write_text(json.dumps({"spec": spec}))
        (out / "front.json").write_text("{}")
        job_id = registry.record_start(name=name, out=out, config_json=json.dumps(spec), study_name=name,
                                       storage="s", tracking_uri="t", experiment_id="1", parent_run_id="p",
                                       budget=4)
        registry.record_end(job_id, status)
        return out

    mine = job("mine", "digits", "nsga2")
    assert find_random_baseline(mine, registry) is None
    job("other-space", "digits-r1", "random", space={"weight_bits": [2, 4]})
    job("stopped", "digits-r2", "random", status=JobStatus.STOPPED)
    twin = job("twin", "digits-random", "random")
    assert find_random_baseline(mine, registry) == twin
