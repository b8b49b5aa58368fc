"""MLflow conventions: one parent run per job, one nested child run per candidate.

Uses ``MlflowClient`` with explicit run ids instead of the fluent ``mlflow.start_run``
API, so nothing depends on a process-global active run and each candidate is one
``log_batch`` call.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Mapping, Optional

from slimsearch._io import atomic_path

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "slimsearch.trial"
JOB_TAG = "slimsearch.job"
ROLE_TAG = "slimsearch.role"
BASELINE_TAG = "baseline"  # on a reference run: the uniform recipe it evaluated (jobs/baselines.py)
MODEL_TAG = "slimsearch.model"  # on a candidate run: the URI of its logged ONNX model


def mlflow_key(name: str) -> str:
    """The MLflow name of metric ``name``: MLflow forbids ``@``, so ``latency_ms@pi`` is ``latency_ms/pi``."""
    return name.replace("@", "/")


def _client(tracking_uri: str):
    import logging

    # MLflow's usage telemetry fetches its config from and posts to the internet from a
    # thread of its own; off unless the user sets it (as Ray's usage stats, ray_runtime.start_ray).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if tracking_uri.startswith("sqlite:"):
        _seed_sqlite_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    if tracking_uri.startswith("sqlite:"):
        _wal(client)
    return client


def _seed_sqlite_store(tracking_uri: str) -> None:
    """Start a new SQLite store as a copy of an empty one with MLflow's schema, kept per MLflow version
    in slimsearch's cache.

    MLflow builds a new store by running its whole chain of Alembic migrations, about 100
    scripts: 1.4 s on an idle core and 2-3 s while Ray starts beside it, on the path of every
    new job's first candidate. A copy of the tables those migrations made is the same store
    (MLflow checks its schema revision on opening it) and takes milliseconds. MLflow adds its
    own "Default" experiment on opening, as for a store it made. The empty store is made
    once with MLflow's own table initialisation; where that is not available (another MLflow
    layout), or the cache cannot be written, MLflow builds the store as usual.
    """
    import shutil

    from slimsearch.storage.urls import sqlite_path

    path = sqlite_path(tracking_uri)
    if path is None or path.exists() or not path.parent.is_dir():
        return
    try:
        import mlflow
        from mlflow.store.db.utils import _initialize_tables  # private: the migrations alone, no experiment
        from sqlalchemy import create_engine

        from slimsearch.tasks._cache import cache_dir

        empty = cache_dir() / "mlflow" / f"empty-store-{mlflow.__version__}.db"
        if not empty.exists():
            empty.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(empty) as making:  # whole or absent: drivers making it at once each write their own
                engine = create_engine(f"sqlite:///{making}")
                try:
                    _initialize_tables(engine)
                finally:
                    engine.dispose()
        copy = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(empty, copy)
        try:
            os.link(copy, path)  # never over a store another driver created meanwhile
        except FileExistsError:
            pass
        finally:
            copy.unlink()
    except Exception:  # noqa: BLE001 - only a shortcut: MLflow then builds the store as it always does
        return


@contextlib.contextmanager
def global_tracking_uri(tracking_uri: str):
    """MLflow's process-wide tracking URI set to ``tracking_uri`` inside the block, the previous one
    restored after it. For the MLflow calls that read only the global URI: the fluent
    ``log_model``, and ``create_model_version`` of a ``models:/m-...`` source (it looks the
    logged model up through a default ``MlflowClient()``)."""
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        if previous is not None:
            mlflow.set_tracking_uri(previous)


def log_onnx_model(tracking_uri: str, run_id: str, onnx_path: Path):
    """Log the ONNX file as an MLflow model (ONNX flavour) under run ``run_id``; MLflow's ``ModelInfo``.

    The one place that uses the fluent API: ``mlflow.onnx.log_model`` logs into the
    active run only.
    """
    import mlflow
    import mlflow.onnx
    import onnx

    with global_tracking_uri(tracking_uri):
        with mlflow.start_run(run_id=run_id):
            # The flavour's own requirements, given rather than inferred: inference imports the
            # model in a subprocess, 10-15 s per model, to find the same two packages.
            info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model",
                                         pip_requirements=mlflow.onnx.get_default_pip_requirements())
        mlflow.MlflowClient(tracking_uri=tracking_uri).set_tag(run_id, MODEL_TAG, info.model_uri)
    return info


def _wal(client) -> None:
    """SQLite store in WAL mode with ``synchronous=NORMAL``: one commit no longer waits for fsyncs, which
    made logging a candidate cost 150-250 ms on a busy disk (benchmarks/tracking.py). A power cut may
    lose the last runs logged, never corrupt the store; the Optuna study is the record, and
    ``run_job`` logs any trial it holds that MLflow lacks when the job ends or resumes."""
    from sqlalchemy import event

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    engine = getattr(store, "engine", None)
    if engine is None:  # another MLflow layout: keep its defaults
        return

    def pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()  # pooled connections reopen with the pragmas


class Tracker:
    """Writes a job's runs to an MLflow store. The constructor only stores its arguments."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Optional[Path] = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self._client_obj = None
        self._experiment_id_cached: Optional[str] = None
        self.parent_id: Optional[str] = None
        self._partial: dict[int, str] = {}  # trial number -> run begun but not completed (store failed meanwhile)

    @property
    def client(self):
        if self._client_obj is None:
            self._client_obj = _client(self.tracking_uri)
        return self._client_obj

    def _experiment_id(self) -> str:
        if self._experiment_id_cached is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                self._experiment_id_cached = found.experiment_id
            else:
                # a tracking server keeps artifacts where it is configured to (e.g. an object store)
                served = self.tracking_uri.startswith(("http://", "https://"))
                location = self.artifact_root.resolve().as_uri() if self.artifact_root and not served else None
                self._experiment_id_cached = self.client.create_experiment(self.experiment,
                                                                           artifact_location=location)
        return self._experiment_id_cached

    def start_parent(self, job_name: str, params: Mapping[str, str], parent_id: Optional[str] = None) -> str:
        """Create the job's parent run, or reopen ``parent_id`` when resuming."""
        if parent_id:
            self.client.update_run(parent_id, status="RUNNING")
            self.parent_id = parent_id
            return parent_id
        run = self.client.create_run(self._experiment_id(), run_name=job_name,
                                     tags={JOB_TAG: job_name, ROLE_TAG: "job"})
        self.parent_id = run.info.run_id
        from mlflow.entities import Param

        self.client.log_batch(self.parent_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return self.parent_id

    def log_candidate(self, number: int, params: Mapping[str, str], values: Mapping[str, Optional[float]],
                      provenance: Mapping[str, str], plan_json: str, *, failed: Optional[str] = None,
                      tags: Optional[Mapping[str, str]] = None) -> str:
        """One nested child run holding a candidate's plan, metrics, provenance tags and ``tags``.

        A metric whose value is None is not logged (MLflow has no 'absent' value and NaN
        would read as a number); pass its reason in ``tags``.

        If the store fails part way (unreachable, locked), the error propagates and the
        half-written run is deleted when the candidate is logged again or at :meth:`children`,
        so a trial never has two runs.
        """
        from mlflow.entities import Metric, Param

        if number in self._partial:
            self.client.delete_run(self._partial[number])
            del self._partial[number]
        tags = {**(tags or {}), PARENT_TAG: self.parent_id, TRIAL_TAG: str(number), ROLE_TAG: "candidate"}
        tags.update({f"provenance.{mlflow_key(k)}": v for k, v in provenance.items()})
        if failed:
            tags["error"] = failed[:5000]
        run = self.client.create_run(self._experiment_id(), run_name=f"trial-{number}", tags=tags)
        run_id = run.info.run_id
        self._partial[number] = run_id
        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), float(v), now, 0) for k, v in values.items() if v is not None]
        params_list = [Param(k, str(v)) for k, v in params.items()] + [Param("plan", plan_json[:6000])]
        self.client.log_batch(run_id, metrics=metrics, params=params_list)
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        del self._partial[number]
        return run_id

    def log_baseline(self, name: str, values: Mapping[str, Optional[float]], provenance: Mapping[str, str],
                     plan_json: str) -> str:
        """One nested child run holding a reference recipe's plan and metrics, tagged ``baseline``
        (not a trial: :meth:`children` leaves it out); its run id."""
        from mlflow.entities import Metric, Param

        tags = {PARENT_TAG: self.parent_id, ROLE_TAG: "baseline", BASELINE_TAG: name}
        tags.update({f"provenance.{mlflow_key(k)}": v for k, v in provenance.items()})
        run = self.client.create_run(self._experiment_id(), run_name=f"baseline-{name}", tags=tags)
        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), float(v), now, 0) for k, v in values.items() if v is not None]
        self.client.log_batch(run.info.run_id, metrics=metrics, params=[Param("plan", plan_json[:6000])])
        self.client.set_terminated(run.info.run_id, status="FINISHED")
        return run.info.run_id

    def children(self) -> dict[int, str]:
        """Trial number -> child run id, for every candidate completely logged under the parent.

        A child run still RUNNING was begun by a logger that stopped part way (the store failed,
        or the driver was killed, mid-candidate): it is deleted here, so the candidate is logged
        again whole, once.
        """
        runs = self.client.search_runs(
            [self._experiment_id()], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'", max_results=50000
        )
        out = {}
        for r in runs:
            if TRIAL_TAG not in r.data.tags:
                continue
            if r.info.status == "RUNNING":
                self.client.delete_run(r.info.run_id)
                self._partial.pop(int(r.data.tags[TRIAL_TAG]), None)
            else:
                out[int(r.data.tags[TRIAL_TAG])] = r.info.run_id
        return out

    def log_onnx_model(self, run_id: str, onnx_path: Path) -> Optional[str]:
        """Log a front member's ONNX graph under its run (once: a run holding a model keeps it) and
        delete the file; the model's URI, or None when there is no file or the run has one already."""
        if not onnx_path.exists() or self.client.get_run(run_id).data.tags.get(MODEL_TAG):
            return None
        uri = log_onnx_model(self.tracking_uri, run_id, onnx_path).model_uri
        onnx_path.unlink()
        return uri

    def set_pareto(self, children: Mapping[int, str], front: set[int]) -> None:
        for number, run_id in children.items():
            self.client.set_tag(run_id, "pareto", "true" if number in front else "false")

    def log_parent_metrics(self, values: Mapping[str, Optional[float]],
                           tags: Optional[Mapping[str, str]] = None) -> None:
        """Metrics (None values skipped) and tags on the job's parent run."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id, metrics=[Metric(mlflow_key(k), float(v), now, 0) for k, v in values.items()
                                                       if v is not None],
                              tags=[RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()])

    def log_parent_series(self, name: str, value: float, step: int) -> None:
        """One point of a metric series on the parent run (e.g. hypervolume after each evaluation)."""
        self.client.log_metric(self.parent_id, mlflow_key(name), float(value), step=step)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.parent_id, str(path))

    def log_dict(self, data: dict, name: str) -> None:
        self.client.log_text(self.parent_id, json.dumps(data, indent=2), name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_id, status=status)
