"""The job registry: every job run on this machine, in the project's database, through SQLAlchemy.

Where: ``$SLIMSEARCH_REGISTRY`` (any SQLAlchemy URL, e.g. PostgreSQL), else
``sqlite:///$SLIMSEARCH_HOME/registry.db``, else ``sqlite:///~/.slimsearch/registry.db``.

Schema versions: the table ``schema_version`` holds one row, the number of
migrations applied; :data:`MIGRATIONS` lists them in order, and opening the
registry applies the missing ones, each in its own transaction. A new version
appends a function; none is ever edited. Why not Alembic: its environment,
script folder and ini file are machinery for an application's many tables and
branches; this registry is two tables in a file each user owns, upgraded where it
is opened. Moving to Alembic later is one ``alembic stamp`` at the current
version number.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

from slimsearch.exceptions import ConfigError
from slimsearch.storage.locks import driver_gone
from slimsearch.storage.urls import redact

ENV_URL = "SLIMSEARCH_REGISTRY"
ENV_HOME = "SLIMSEARCH_HOME"


class JobStatus(str, Enum):
    QUEUED = "queued"  # registered, not started: `slimsearch submit` queues a job until its Ray job runs it
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"  # interrupted (Ctrl-C, SIGTERM); --resume continues it
    # never stored: "running" in the registry, but the driver ended without saying so (SIGKILL, out of
    # memory, the machine restarted), seen when it no longer holds its job folder (locks.driver_gone)
    LOST = "lost"


def registry_url() -> str:
    """The registry's database URL (see the module docstring)."""
    if os.environ.get(ENV_URL):
        return os.environ[ENV_URL]
    home = Path(os.environ.get(ENV_HOME) or Path.home() / ".slimsearch")
    return f"sqlite:///{home.expanduser().resolve() / 'registry.db'}"


def config_hash(config_json: str) -> str:
    """sha256 of the job config with sorted keys, so equal configs hash equal."""
    return hashlib.sha256(json.dumps(json.loads(config_json), sort_keys=True).encode()).hexdigest()


def _tables(metadata):
    from sqlalchemy import Column, Float, ForeignKey, Integer, String, Table, Text

    jobs = Table(
        "jobs", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("name", String(255), nullable=False, index=True),
        Column("out", Text, nullable=False, unique=True),
        Column("config", Text, nullable=False),
        Column("config_hash", String(64), nullable=False),
        Column("status", String(16), nullable=False),
        Column("created", Float, nullable=False),
        Column("started", Float),
        Column("ended", Float),
        Column("study_name", String(255)),
        Column("storage", Text),
        Column("tracking_uri", Text),
        Column("experiment_id", String(64)),
        Column("parent_run_id", String(64)),
        Column("budget", Integer),
        Column("error", Text),
        Column("submission_id", String(128)),  # Ray Job Submission id (slimsearch submit), else NULL
        Column("submission_address", Text),  # the dashboard it was submitted to
    )
    exports = Table(
        "exports", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False, index=True),
        Column("created", Float, nullable=False),
        Column("run_id", String(64)),
        Column("trial", Integer),
        Column("out", Text, nullable=False),
        Column("formats", Text, nullable=False),
        Column("model_name", String(255)),
        Column("model_version", String(32)),
        Column("alias", String(255)),
    )
    return jobs, exports


def _v1(conn) -> None:
    from sqlalchemy import MetaData

    metadata = MetaData()
    _tables(metadata)
    metadata.create_all(conn)


def _v2(conn) -> None:
    """The Ray submission of a job (``slimsearch submit``): its id and dashboard address."""
    from sqlalchemy import inspect, text

    have = {c["name"] for c in inspect(conn).get_columns("jobs")}
    for name, kind in (("submission_id", "VARCHAR(128)"), ("submission_address", "TEXT")):
        if name not in have:  # a registry created at v2 or later has them from _v1's current tables
            conn.execute(text(f"ALTER TABLE jobs ADD COLUMN {name} {kind}"))


MIGRATIONS: list[Callable] = [_v1, _v2]  # append only: MIGRATIONS[i] takes the schema from version i to i + 1


@dataclass(frozen=True)
class JobRecord:
    id: int
    name: str
    out: str
    config: str
    config_hash: str
    status: str
    created: float
    started: Optional[float]
    ended: Optional[float]
    study_name: Optional[str]
    storage: Optional[str]
    tracking_uri: Optional[str]
    experiment_id: Optional[str]
    parent_run_id: Optional[str]
    budget: Optional[int]
    error: Optional[str]
    submission_id: Optional[str] = None
    submission_address: Optional[str] = None
    exports: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {**self.__dict__, "exports": list(self.exports)}


_TURNS_KEY = 0x51153A7C  # PostgreSQL advisory lock key of slimsearch's registry migrations


def _take_turns(conn) -> None:
    """On PostgreSQL, wait until no other process is migrating the registry (an advisory lock held
    until the transaction ends): PostgreSQL runs concurrent ``CREATE TABLE IF NOT EXISTS`` and
    ``INSERT ... WHERE NOT EXISTS`` side by side, and both may fail or both insert. SQLite
    serializes every write with its file lock already."""
    from sqlalchemy import text

    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _TURNS_KEY})


class Registry:
    """The job registry at ``url`` (default :func:`registry_url`). The constructor only stores."""

    def __init__(self, url: Optional[str] = None):
        self.url = url
        self._engine = None
        self._jobs = self._exports = None

    def _open(self):
        if self._engine is not None:
            return self._engine
        from sqlalchemy import MetaData, create_engine, event

        url = self.url or registry_url()
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})

            @event.listens_for(engine, "connect")
            def _fk(dbapi_conn, _record):  # SQLite enforces foreign keys only when asked
                dbapi_conn.execute("PRAGMA foreign_keys=ON")
        else:
            engine = create_engine(url)
        self.migrate(engine)
        self._jobs, self._exports = _tables(MetaData())
        self._engine = engine
        return engine

    @staticmethod
    def schema_version(engine) -> int:
        from sqlalchemy import inspect, text

        if not inspect(engine).has_table("schema_version"):
            return 0
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT version FROM schema_version")).scalar_one())

    @classmethod
    def migrate(cls, engine) -> int:
        """Apply the migrations the database lacks; return the version it is at. A database newer
        than this slimsearch is refused rather than written to. Drivers that open a new registry
        at the same moment (several machines, one PostgreSQL) take turns: each step re-reads the
        version under :func:`_take_turns` and applies only what is still missing."""
        from sqlalchemy import text

        with engine.begin() as conn:
            _take_turns(conn)
            conn.execute(text("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"))
            # one statement, so SQLite's write lock makes it atomic too
            conn.execute(text("INSERT INTO schema_version (version) SELECT 0 "
                              "WHERE NOT EXISTS (SELECT 1 FROM schema_version)"))
        version = cls.schema_version(engine)
        if version > len(MIGRATIONS):
            raise ConfigError(f"job registry {engine.url!r}: schema version {version} is newer than this "
                              f"slimsearch knows ({len(MIGRATIONS)}); upgrade slimsearch")
        for step in range(version, len(MIGRATIONS)):
            with engine.begin() as conn:
                _take_turns(conn)
                if int(conn.execute(text("SELECT version FROM schema_version")).scalar_one()) > step:
                    continue  # another process applied it meanwhile
                MIGRATIONS[step](conn)
                conn.execute(text("UPDATE schema_version SET version = :v"), {"v": step + 1})
        return len(MIGRATIONS)

    # ---------------------------------------------------------------- writes

    def record_start(self, *, name: str, out: Path, config_json: str, study_name: str, storage: str,
                     tracking_uri: str, experiment_id: Optional[str], parent_run_id: Optional[str],
                     budget: int, status: JobStatus = JobStatus.RUNNING) -> int:
        """Register the job in folder ``out`` (or update it, when resumed) and return its id.

        Database passwords in the config and URLs are stored as ``***`` (:func:`redact`); the
        job folder's ``job.json`` keeps what reopening the study needs."""
        from sqlalchemy import insert, select, update

        engine = self._open()
        now = time.time()
        config_json = redact(config_json)
        values = {"name": name, "config": config_json, "config_hash": config_hash(config_json),
                  "status": JobStatus(status).value, "started": now, "ended": None, "study_name": study_name,
                  "storage": redact(storage), "tracking_uri": redact(tracking_uri), "experiment_id": experiment_id,
                  "parent_run_id": parent_run_id, "budget": budget, "error": None}
        key = str(Path(out).resolve())
        with engine.begin() as conn:
            found = conn.execute(select(self._jobs.c.id).where(self._jobs.c.out == key)).scalar_one_or_none()
            if found is not None:
                conn.execute(update(self._jobs).where(self._jobs.c.id == found).values(**values))
                return int(found)
            return int(conn.execute(insert(self._jobs).values(out=key, created=now, **values))
                       .inserted_primary_key[0])

    def record_end(self, job_id: int, status: JobStatus, error: Optional[str] = None) -> None:
        from sqlalchemy import update

        with self._open().begin() as conn:
            conn.execute(update(self._jobs).where(self._jobs.c.id == job_id).values(
                status=JobStatus(status).value, ended=time.time(), error=(error or None) and redact(error)[:2000]))

    def record_submission(self, job_id: int, *, submission_id: str, address: str) -> None:
        """The Ray Job Submission id and dashboard address of a job handed to a cluster."""
        from sqlalchemy import update

        from slimsearch.storage.urls import redact

        with self._open().begin() as conn:
            conn.execute(update(self._jobs).where(self._jobs.c.id == job_id).values(
                submission_id=submission_id, submission_address=redact(address)))

    def record_export(self, job_id: int, *, out: Path, formats: list[str], run_id: Optional[str],
                      trial: Optional[int], model_name: Optional[str] = None, model_version: Optional[str] = None,
                      alias: Optional[str] = None) -> None:
        from sqlalchemy import insert

        with self._open().begin() as conn:
            conn.execute(insert(self._exports).values(
                job_id=job_id, created=time.time(), run_id=run_id, trial=trial, out=str(Path(out).resolve()),
                formats=",".join(formats), model_name=model_name, model_version=model_version, alias=alias))

    # ---------------------------------------------------------------- reads

    def _record(self, conn, row) -> JobRecord:
        from sqlalchemy import select

        ex = conn.execute(select(self._exports).where(self._exports.c.job_id == row.id)
                          .order_by(self._exports.c.id)).mappings().all()
        fields = dict(row._mapping)
        if fields["status"] == JobStatus.RUNNING.value and not fields["submission_id"] \
                and driver_gone(fields["out"]):  # a submitted job runs elsewhere: its Ray job says
            fields["status"] = JobStatus.LOST.value
        return JobRecord(**fields, exports=tuple(
            {k: v for k, v in e.items() if k not in ("id", "job_id")} for e in ex))

    def jobs(self) -> list[JobRecord]:
        """Every registered job, oldest first."""
        from sqlalchemy import select

        with self._open().connect() as conn:
            rows = conn.execute(select(self._jobs).order_by(self._jobs.c.id)).all()
            return [self._record(conn, r) for r in rows]

    def find(self, ref: str) -> Optional[JobRecord]:
        """The job whose id, name (the latest of that name) or folder is ``ref``; None if none is."""
        from sqlalchemy import select

        engine = self._open()
        t = self._jobs
        with engine.connect() as conn:
            row = None
            if ref.isdigit():
                row = conn.execute(select(t).where(t.c.id == int(ref))).first()
            if row is None:
                row = conn.execute(select(t).where(t.c.name == ref).order_by(t.c.id.desc())).first()
            if row is None:
                row = conn.execute(select(t).where(t.c.out == str(Path(ref).expanduser().resolve()))).first()
            return None if row is None else self._record(conn, row)

    def find_by_out(self, out: Path) -> Optional[JobRecord]:
        from sqlalchemy import select

        with self._open().connect() as conn:
            row = conn.execute(select(self._jobs).where(self._jobs.c.out == str(Path(out).resolve()))).first()
            return None if row is None else self._record(conn, row)


def safely(action: Callable[[], object], log=None):
    """Run a registry write; a registry that cannot be written must not stop a search or an export,
    so a failure is reported through ``log`` and None returned."""
    try:
        return action()
    except Exception as exc:  # noqa: BLE001 - the registry is bookkeeping, the job is what matters
        if log is not None:
            log(redact(f"[slimsearch] job registry not updated ({type(exc).__name__}: {exc})"))
        return None
