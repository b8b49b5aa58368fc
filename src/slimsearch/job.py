"""JobSpec: a validated job file (task, space, objectives, profiles, search, storage).

Every error in a job file becomes one :class:`ConfigError` line naming the file,
the field path, what was given and what is allowed.
"""

from __future__ import annotations

import json
import os
import re
import threading
from enum import Enum
from pathlib import Path
from typing import Any, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimsearch._io import safe_load
from slimsearch.exceptions import ConfigError
from slimsearch.search.samplers import Sampler
from slimsearch.spaces.schema import LayerChoices, SpaceSpec  # noqa: F401 - LayerChoices: part of the schema

LOCAL_PROFILE = "local"
# Metrics every candidate has, whatever the profiles.
BASE_METRICS = ("size_bytes", "params", "macs", "bitops", "latency_ms@local")


def local_latency_metrics(batch: int) -> tuple[str, ...]:
    """The measured latencies of a task whose larger timed batch is ``batch`` (Task.latency_batch)."""
    return ("latency_ms@local", f"latency_ms_b{batch}@local")


# Measured only where this machine exposes energy counters (RAPL); see hardware_profiles/_energy.py.
LOCAL_ENERGY_METRIC = "energy_mj@local"
# Metrics each named (modelled) profile adds, as ``name@profile``.
PROFILE_METRICS = ("latency_ms", "energy_mj", "cost_usd_per_1m")


class Direction(str, Enum):
    MAX = "max"
    MIN = "min"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_profile(name: str) -> str:
    from slimsearch.hardware_profiles import list_profiles

    known = list_profiles()
    if name not in known:
        raise ValueError(f"unknown profile {name!r}; allowed: {known} or a profile file (.yaml, .yml, .json)")
    return name


def _looks_like_file(text: str) -> bool:
    return text.endswith((".yaml", ".yml", ".json")) or "/" in text or os.sep in text


def _profile_file(path: str) -> str:
    """The name of the profile in file ``path`` (written by ``slimsearch hw profile`` or ``hw calibrate``)."""
    from slimsearch.hardware_profiles import load_profile

    try:
        name = load_profile(path).name
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if name == LOCAL_PROFILE:
        raise ValueError(f"profile file {path!r} is named {LOCAL_PROFILE!r}, which is reserved for the figures "
                         "measured on this machine (latency_ms@local); rename the profile in the file")
    return name


class ProfileTarget(_Frozen):
    """A target device: a profile name and, optionally, the power modes to search on it.

    In a job file either a bare name (``raspberry-pi-4``, modelled at its default
    mode) or ``{name: jetson-orin-nano, power_modes: [7W, 15W]}``. A profile file (one
    that ``slimsearch hw profile`` or ``hw calibrate`` wrote) is named by its path,
    bare or as ``{file: ..., power_modes: [...]}``; its metrics carry the profile's own
    name (``latency_ms@<name>``). Relative paths are relative to the job file.
    """

    file: Optional[str] = None  # a profile file (absolute once read by load_job); validated before ``name``
    name: str
    power_modes: Optional[list[str]] = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        if isinstance(data, str):  # a bare name or file: its error's path is the list entry itself
            return {"name": _profile_file(data), "file": data} if _looks_like_file(data) else {"name": _known_profile(data)}
        if not isinstance(data, (dict, ProfileTarget)):
            raise ValueError("a profile is a name, a profile file, or {name: ..., power_modes: [...]} "
                             "({file: ..., power_modes: [...]} for a file)")
        if isinstance(data, dict) and data.get("file") is not None:
            name = _profile_file(str(data["file"]))
            if data.get("name", name) != name:
                raise ValueError(f"profile file {data['file']!r} holds profile {name!r}, not {data['name']!r}")
            data = {**data, "name": name}
        return data

    @field_validator("name")
    @classmethod
    def _shipped_unless_file(cls, v: str, info) -> str:
        return v if info.data.get("file") is not None else _known_profile(v)

    @property
    def ref(self) -> str:
        """What :func:`~slimsearch.hardware_profiles.load_profile` loads it from: the file, else the name."""
        return self.file or self.name

    @field_validator("power_modes", mode="before")
    @classmethod
    def _power_modes(cls, v: Any, info) -> Optional[list[str]]:
        if v is None or "name" not in info.data:  # an unknown name has been reported already
            return v
        from slimsearch.hardware_profiles import load_profile

        name = info.data["name"]
        allowed = [mode.name for mode in load_profile(info.data.get("file") or name).power_modes]
        modes = _as_list(v)
        if not modes:
            raise ValueError(f"power_modes of {name!r} needs at least one mode; allowed: {allowed}")
        for mode in modes:
            if mode not in allowed:
                raise ValueError(f"{name!r} has no power mode {mode!r}; allowed: {allowed}")
        return list(dict.fromkeys(modes))


# Bounds of the search settings, set by what consumes them (the value beyond each fails only once the job runs).
MAX_INT32 = 2**31 - 1  # budget: an INTEGER column on PostgreSQL (the job registry's budget, Optuna's trial
# numbers); seed: numpy takes [0, 2**32 - 1], and a resumed or shared study's sampler is seeded with
# seed + the number of its first trial
MAX_THREADS = 8192  # torch threads: the most CPUs one Linux machine can have (NR_CPUS); far beyond a
# machine's cores, starting the threads fails or crashes the worker
MAX_RAY_CPUS = 10**14  # workers x threads_per_worker CPUs are asked of Ray, whose largest resource quantity is this
MAX_MEMORY_MB = 2**42  # RLIMIT_AS is set to the worker's size plus this, which must fit in a C long
MAX_TIME_LIMIT_S = threading.TIMEOUT_MAX  # the longest wait a timer thread takes


class SearchSpec(_Frozen):
    budget: int = Field(24, ge=1, le=MAX_INT32, description="trained candidates")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=MAX_RAY_CPUS)
    threads_per_worker: Optional[int] = Field(None, ge=1, le=MAX_THREADS, description="torch threads of each worker "
                                              "(default: the machine's cores shared out among the workers, at least 1)")
    sampler: Sampler = Sampler.NSGA2
    seed: int = Field(0, ge=0, le=MAX_INT32)
    max_retries: int = Field(1, ge=0, le=10, description="times a candidate whose Ray worker died is run "
                             "again before it is recorded as failed (a candidate that raises is not retried)")
    memory_limit_mb: Optional[int] = Field(None, ge=64, le=MAX_MEMORY_MB, description="address space one "
                                           "candidate's evaluation may add to its worker, in MiB; above it the "
                                           "candidate fails")
    time_limit_s: Optional[float] = Field(None, gt=0, le=MAX_TIME_LIMIT_S, allow_inf_nan=False,
                                          description="wall-clock seconds one candidate's evaluation may take; "
                                          "beyond it the candidate fails and its worker goes on")
    early_stopping: bool = Field(True, description="stop fine-tuning a candidate that cannot plausibly reach the "
                                 "front or meet the constraints (checked at 1/4, 1/2 and 3/4 of its steps)")
    # finite: the job reaches its workers as JSON, where inf and nan become null
    early_stopping_margin: float = Field(0.01, ge=0, allow_inf_nan=False, description="added to the best metric "
                                         "a candidate could plausibly still reach before it is judged hopeless "
                                         "(metric units)")

    @field_validator("threads_per_worker")
    @classmethod
    def _ray_cpus(cls, v: Optional[int], info) -> Optional[int]:
        workers = info.data.get("workers")
        if v is not None and workers is not None and workers * v > MAX_RAY_CPUS:
            raise ValueError(f"workers x threads_per_worker = {workers} x {v} CPUs; allowed: at most 10**14 "
                             "CPUs in all (Ray's largest resource quantity)")
        return v


class JobSpec(_Frozen):
    """A whole job file."""

    name: str
    task: str
    space: SpaceSpec = SpaceSpec()
    objectives: dict[str, Direction] = {
        "accuracy": Direction.MAX,
        "latency_ms_b64@local": Direction.MIN,
        "size_bytes": Direction.MIN,
    }
    constraints: list[str] = Field([], description="e.g. 'accuracy_drop <= 0.01' or 'latency_ms@jetson-orin-nano <= 5'; "
                                   "a candidate that breaks one never enters the front")
    profiles: list[ProfileTarget] = [ProfileTarget(name="raspberry-pi-4")]
    search: SearchSpec = SearchSpec()
    task_path: Optional[str] = Field(None, description="folder a package.module:function task is imported from "
                                     "first; default: the job file's folder")
    storage: Optional[str] = Field(None, description="Optuna storage URL; default sqlite in the job folder")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; default sqlite in the job folder")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # It names the job folder (runs/<name>) and the study: no path separators, no '..'.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError("allowed: 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        from slimsearch.tasks import BUILTIN_TASKS

        if v not in BUILTIN_TASKS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"unknown task {v!r}; allowed: one of {list(BUILTIN_TASKS)} or 'package.module:function'")
        return v

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, v: list[ProfileTarget]) -> list[ProfileTarget]:
        names = [p.name for p in v]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"profile {name!r} is named twice; name each profile once "
                                 "(list its power modes in one entry)")
        return v

    @property
    def profile_names(self) -> list[str]:
        """The target profiles' names, in job-file order."""
        return [p.name for p in self.profiles]

    @property
    def profile_refs(self) -> list[str]:
        """What each target profile is loaded from (its file, else its name), in job-file order."""
        return [p.ref for p in self.profiles]

    def power_mode_choices(self) -> dict[str, tuple[str, ...]]:
        """``profile -> power modes`` for the profiles whose modes the job lists.

        Two or more modes are searched, one is fixed; a profile not in the result is
        modelled at its default mode.
        """
        return {p.name: tuple(p.power_modes) for p in self.profiles if p.power_modes is not None}

    def teacher_power_modes(self) -> dict[str, str]:
        """The mode each listed profile's teacher figures are modelled at: the profile's default
        when the job lists it, else the first mode listed."""
        from slimsearch.hardware_profiles import load_profile

        out = {}
        refs = dict(zip(self.profile_names, self.profile_refs))
        for name, modes in self.power_mode_choices().items():
            default = load_profile(refs[name]).default_power_mode.name
            out[name] = default if default in modes else modes[0]
        return out

    @model_validator(mode="after")
    def _objectives(self) -> "JobSpec":
        if not self.objectives:
            raise ValueError("objectives: at least one objective is needed")
        allowed = self.metric_names()
        user_task = ":" in self.task
        for metric in self.objectives:
            if metric not in allowed and not (user_task and "@" not in metric):
                raise ValueError(f"objectives: unknown metric {metric!r}; allowed: {allowed}")
        from slimsearch.search._types import Constraint

        parsed = []
        for i, text in enumerate(self.constraints):
            try:
                parsed.append(Constraint.parse(text))
            except ConfigError as exc:
                raise ValueError(f"constraints.{i}: {exc}") from None
            metric = parsed[-1].metric
            if metric not in allowed and not (user_task and "@" not in metric):
                raise ValueError(f"constraints.{i}: {text!r}: unknown metric {metric!r}; allowed: {allowed}")
        _check_satisfiable(parsed)
        return self

    def metric_names(self) -> list[str]:
        """Every metric a candidate of this job has: the task's own, then sizes and costs.

        A user task's metrics are known only once it is loaded; ``run_job`` checks them.
        """
        from slimsearch.tasks._registry import BUILTIN_LATENCY_BATCH, BUILTIN_METRICS, DEFAULT_LATENCY_BATCH

        task_metrics = BUILTIN_METRICS.get(self.task, ("accuracy",))
        batch = BUILTIN_LATENCY_BATCH.get(self.task, DEFAULT_LATENCY_BATCH)
        names = [*task_metrics, f"{task_metrics[0]}_drop", *BASE_METRICS, *local_latency_metrics(batch)[1:]]
        names.append(LOCAL_ENERGY_METRIC)
        names += [f"{m}@{p}" for p in self.profile_names for m in PROFILE_METRICS]
        return names

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        return cls.model_validate_json(text)


def _check_satisfiable(constraints: list) -> None:
    """Refuse constraints that no value can meet together (``size_bytes <= 1000`` and
    ``size_bytes >= 2000``): such a job would train its whole budget for an empty front."""
    lower: dict[str, tuple[float, bool, int]] = {}  # metric -> (bound, strict, index)
    upper: dict[str, tuple[float, bool, int]] = {}
    for i, c in enumerate(constraints):
        bounds, tighter = (lower, max) if c.op in (">=", ">") else (upper, min)
        new = (c.limit, c.op in (">", "<"), i)
        old = bounds.get(c.metric)
        if old is None or tighter(new[0], old[0]) != old[0] or (new[0] == old[0] and new[1]):
            bounds[c.metric] = new
        lo, hi = lower.get(c.metric), upper.get(c.metric)
        if lo and hi and (lo[0] > hi[0] or (lo[0] == hi[0] and (lo[1] or hi[1]))):
            first, second = sorted((lo[2], hi[2]))
            raise ValueError(f"constraints.{second}: {str(constraints[second])!r} contradicts constraints.{first} "
                             f"{str(constraints[first])!r}: no value of {c.metric} meets both; allowed: "
                             "constraints that leave some value of each metric")


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def load_job(path: str | os.PathLike, overrides: dict[str, Any] | None = None,
             flags: dict[str, str] | None = None) -> JobSpec:
    """Read and validate a job file; ``overrides`` maps dotted paths to values (from the CLI).

    ``flags`` names the command-line flag each override came from (``{"search.budget":
    "--budget"}``), so an error in an overridden value names the flag, not the job field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the job file ({exc.strerror}); allowed: a YAML job file") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); allowed: a YAML job file") from None
    data = safe_load(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file must be a mapping with keys {list(JobSpec.model_fields)}, "
                          f"got {'an empty file' if data is None else type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):  # else the file's own wrong type is reported below
            node[leaf] = value
    _resolve_paths(data, path.parent)
    return validate_job(data, source=str(path), flags=flags)


def _resolve_paths(data: dict, base: Path) -> None:
    """Make the job's file paths absolute against the job file's folder (in place), so the job
    means the same thing from any working directory, in Ray workers and at export."""
    def absolute(text: str) -> str:
        return str((base / os.path.expanduser(text)).resolve())

    if isinstance(data.get("task"), str) and ":" in data["task"]:
        data["task_path"] = absolute(data["task_path"]) if isinstance(data.get("task_path"), str) else str(base.resolve())
    profiles = data.get("profiles")
    for i, entry in enumerate(profiles if isinstance(profiles, list) else []):
        if isinstance(entry, str) and _looks_like_file(entry):
            profiles[i] = absolute(entry)
        elif isinstance(entry, dict) and isinstance(entry.get("file"), str):
            entry["file"] = absolute(entry["file"])


def validate_job(data: dict, *, source: str = "<job>", flags: dict[str, str] | None = None) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        loc = ".".join(str(p) for p in exc.errors(include_url=False)[0]["loc"])
        if flags and loc in flags:  # the value came from a command-line flag: name the flag
            raise ConfigError(_one_line(exc, label=flags[loc])) from None
        raise ConfigError(f"{source}: {_one_line(exc)}") from None


def _one_line(exc: ValidationError, label: str | None = None) -> str:
    err = exc.errors(include_url=False)[0]
    loc = label or ".".join(str(p) for p in err["loc"])
    msg = " ".join(err["msg"].split())
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        return f"{loc}: unknown key; allowed keys here: {allowed}"
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    given = err.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"


def _allowed_keys(loc: tuple) -> list[str]:
    """The field names of the model found at ``loc`` inside JobSpec."""
    model: Any = JobSpec
    skip_key = False
    for part in loc:
        if skip_key:  # the key of a dict[str, Model] field
            skip_key = False
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = field.annotation
        # Optional[X] -> X; dict[str, X] and list[X] -> X, and the next loc part is the key or index.
        while get_origin(model) is not None:
            args = [a for a in get_args(model) if a is not type(None)]
            if get_origin(model) in (dict, list):
                model, skip_key = args[-1], True
                break
            model = args[0]
    if get_origin(model) is None and isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def dump_job(spec: JobSpec) -> dict:
    """The job as plain JSON-ready data (for MLflow params and the job folder)."""
    return json.loads(spec.to_json())


# URL schemes that name a database SQLAlchemy opens (Optuna storage, MLflow backend store).
_DB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle")
# The databases MLflow keeps runs in, and its other tracking stores (mlflow.tracking's store registry).
_MLFLOW_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_MLFLOW_SERVER_SCHEMES = ("http", "https")
_MLFLOW_NAMED_STORES = ("databricks", "databricks-uc", "uc")
_TRACKING_ALLOWED = ("allowed: a running MLflow tracking server, a database URL, or leave it out for SQLite in the "
                     "job folder")
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def check_reachable(spec: JobSpec, *, source: str = "<job>", flags: dict[str, str] | None = None) -> None:
    """Refuse, before anything is written, a ``storage`` or ``tracking_uri`` that cannot be opened.

    Database URLs are opened once through SQLAlchemy (a connection, no table created); an
    SQLite file is checked without opening it (that would create it): an existing one must
    be an SQLite database, and the file and its folder writable. An HTTP tracking server
    must accept a TCP connection; a tracking URI must name a store MLflow has. Passwords
    never appear in the message. ``flags`` names the command-line flag a field's value came
    from (``{"storage": "--storage"}``).
    """
    from urllib.parse import urlsplit

    for field, url in (("storage", spec.storage), ("tracking_uri", spec.tracking_uri)):
        if not url:
            continue
        where = (flags or {}).get(field) or f"{source}: {field}"
        if field == "storage":
            _check_database(url, where)
            continue
        scheme = urlsplit(url).scheme.split("+", 1)[0].lower()
        if scheme in _MLFLOW_DB_SCHEMES:
            _check_database(url, where)
        elif scheme in _MLFLOW_SERVER_SCHEMES:
            _check_server(url, where)
        elif scheme in ("", "file") and url not in _MLFLOW_NAMED_STORES:
            _check_file_store(url, where)
        elif url not in _MLFLOW_NAMED_STORES:
            from slimsearch.storage import redact

            kinds = [*_MLFLOW_SERVER_SCHEMES, *_MLFLOW_DB_SCHEMES, *_MLFLOW_NAMED_STORES]
            raise ConfigError(f"{where}: {redact(url)!r}: MLflow has no tracking store of kind {scheme!r}; "
                              f"allowed: a tracking URI of kind {kinds}, or leave it out for SQLite in the job folder")


def _check_file_store(url: str, where: str) -> None:
    """A folder of MLflow runs (``file:`` URI or a path), which MLflow opens only when
    ``MLFLOW_ALLOW_FILE_STORE`` is true (its file store is in maintenance mode)."""
    from urllib.parse import unquote, urlsplit

    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        raise ConfigError(f"{where}: {url!r} names an MLflow file store (a folder of runs), which MLflow opens "
                          f"only with MLFLOW_ALLOW_FILE_STORE=true; {_TRACKING_ALLOWED}")
    path = Path(unquote(urlsplit(url).path) if url.lower().startswith("file:") else url).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where}: {url!r}: {path} is a file, not a folder of MLflow runs; {_TRACKING_ALLOWED}")


def _check_database(url: str, where: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    from slimsearch.storage import redact

    choices = ("a reachable database URL (sqlite:////abs/path.db, postgresql://user:password@host:port/db), "
               "or leave it out for SQLite in the job folder")
    allowed = f"allowed: {choices}"
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise ConfigError(f"{where}: {redact(url)!r} is not a database URL; {allowed}") from None
    shown = parsed.render_as_string(hide_password=True)
    secret = parsed.password

    def scrub(text: str) -> str:
        text = " ".join(str(text).split())
        return text.replace(str(secret), "***") if secret else text

    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_file(parsed.database, f"{where}: {shown}", allowed)
        return
    connect_args = {"connect_timeout": 10} if parsed.get_backend_name() in ("postgresql", "mysql", "mariadb") else {}
    try:
        engine = create_engine(parsed, connect_args=connect_args)
    except sa_exc.NoSuchModuleError:
        raise ConfigError(f"{where}: {shown}: unknown database kind {parsed.drivername!r}; {allowed}") from None
    except ImportError as exc:
        raise ConfigError(f"{where}: {shown}: its database driver is not installed ({scrub(exc)}); "
                          f"install it (e.g. pip install 'psycopg[binary]' for PostgreSQL); allowed: {choices}") from None
    try:
        with engine.connect():
            pass
    except sa_exc.DBAPIError as exc:
        reason = scrub(str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__)
        raise ConfigError(f"{where}: cannot connect to {shown} ({reason}); {allowed}") from None
    finally:
        engine.dispose()


def _check_sqlite_file(database: Optional[str], where: str, allowed: str) -> None:
    """An SQLite database file a job can keep: on disk, an SQLite database (or new, or empty), writable."""
    if database in (None, "", ":memory:"):
        raise ConfigError(f"{where}: an in-memory database ends with this process, and --resume, status and "
                          f"export reopen it; {allowed}")
    path = Path(database).expanduser().resolve()
    if not path.parent.is_dir():
        raise ConfigError(f"{where}: folder {path.parent} does not exist; {allowed}")
    if path.is_dir():
        raise ConfigError(f"{where}: {path} is a folder, not a database file; {allowed}")
    if path.exists():
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path} ({exc.strerror}); {allowed}") from None
        if head and head != SQLITE_HEADER:  # SQLite takes an empty file as a new database
            raise ConfigError(f"{where}: {path} is not an SQLite database (it lacks SQLite's file header); {allowed}")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{where}: {path} is read-only to this user; {allowed}")
    if not os.access(path.parent, os.W_OK | os.X_OK):  # a new file, its journal and the job's lock go there
        raise ConfigError(f"{where}: folder {path.parent} is read-only to this user; {allowed}")


def _check_server(url: str, where: str) -> None:
    import socket
    from urllib.parse import urlsplit

    from slimsearch.storage import redact

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=10).close()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot reach the tracking server {redact(url)} ({exc.strerror or exc}); "
                          f"{_TRACKING_ALLOWED}") from None
