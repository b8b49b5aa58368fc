"""A job's MLflow store: a new SQLite store starts as a copy of MLflow's empty schema, kept in the cache."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from slimsearch.storage.tracking import Tracker


def _schema(db: Path) -> tuple[list, list]:
    """Every table and index with its definition, and the schema revision. A definition is compared
    as a set of lines: MLflow's own builds list a table's constraints in varying order."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        revision = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    return [(kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
            for kind, name, sql in rows], revision


def _use(db: Path) -> list[str]:
    """A parent run logged through slimsearch's Tracker, read back with a client of MLflow's own."""
    from mlflow.tracking import MlflowClient

    tracker = Tracker(f"sqlite:///{db}", "exp", artifact_root=db.parent / "artifacts")
    run_id = tracker.start_parent("exp", {"budget": "3"})
    tracker.log_parent_metrics({"teacher.accuracy": 0.9})
    run = MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(run_id)
    assert run.data.params["budget"] == "3" and run.data.metrics["teacher.accuracy"] == 0.9
    return [e.name for e in MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()]


def test_a_new_store_is_the_store_mlflow_builds_and_works_as_one(tmp_path, teacher_cache):
    from mlflow.tracking import MlflowClient

    built = tmp_path / "built" / "mlflow.db"
    built.parent.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{built}").search_experiments()  # MLflow's own migrations
    first, second = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    for db in (first, second):
        db.parent.mkdir()
        assert sorted(_use(db)) == ["Default", "exp"]
    # the same tables, indexes and schema revision as the store MLflow builds
    assert _schema(first) == _schema(second) == _schema(built)
    (empty,) = (teacher_cache / "mlflow").glob("empty-store-*.db")
    assert not list(empty.parent.glob("*.tmp")) and not list(first.parent.glob("*.tmp"))
    # and a new store is that cached one, copied (not built again by MLflow's migrations)
    from slimsearch.storage.tracking import _seed_sqlite_store

    third = tmp_path / "c" / "mlflow.db"
    third.parent.mkdir()
    _seed_sqlite_store(f"sqlite:///{third}")
    assert third.read_bytes() == empty.read_bytes()


def test_an_existing_store_is_opened_as_it_is(tmp_path, teacher_cache):
    db = tmp_path / "mlflow.db"
    _use(db)
    Tracker(f"sqlite:///{db}", "exp").start_parent("exp", {"budget": "4"})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "exp"]
    assert len(client.search_runs([experiment.experiment_id])) == 2  # the first run is still there


def test_without_a_usable_cache_mlflow_builds_the_store_itself(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("SLIMSEARCH_CACHE", str(blocked))  # the cache cannot be made under a file
    db = tmp_path / "job" / "mlflow.db"
    db.parent.mkdir()
    assert sorted(_use(db)) == ["Default", "exp"]
    assert not list(db.parent.glob("*.tmp"))
