"""Reading a job file into a JobSpec, and checking before anything is written that the stores it names open.

Every error in a job file becomes one :class:`ConfigError` line naming the file,
the field path, what was given and what is allowed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, get_args, get_origin

from pydantic import BaseModel, ValidationError

from slimsearch._io import safe_load
from slimsearch.exceptions import ConfigError
from slimsearch.jobs.spec import CORPORA, JobSpec, looks_like_file
from slimsearch.tasks._registry import CAUSAL_LM_PREFIX


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
    apply_overrides(data, overrides)
    _resolve_paths(data, path.parent)
    return validate_job(data, source=str(path), flags=flags)


def apply_overrides(data: dict, overrides: dict[str, Any] | None) -> dict:
    """Set each dotted path of ``overrides`` in a job's data (in place); returns ``data``."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):  # else the data's own wrong type is reported when it is validated
            node[leaf] = value
    return data


def _resolve_paths(data: dict, base: Path) -> None:
    """Make the job's file paths absolute against the job file's folder (in place), so the job
    means the same thing from any working directory, in Ray workers and at export."""
    def absolute(text: str) -> str:
        return str((base / os.path.expanduser(text)).resolve())

    task = data.get("task")
    if isinstance(task, str) and task.startswith(CAUSAL_LM_PREFIX) and task[len(CAUSAL_LM_PREFIX):].strip():
        data["task"] = CAUSAL_LM_PREFIX + absolute(task[len(CAUSAL_LM_PREFIX):])
    elif isinstance(task, str) and ":" in task:
        data["task_path"] = absolute(data["task_path"]) if isinstance(data.get("task_path"), str) else str(base.resolve())
    text = data.get("text")
    if isinstance(text, str) and text not in CORPORA:
        data["text"] = absolute(text)
    elif isinstance(text, list):
        data["text"] = [absolute(t) if isinstance(t, str) else t for t in text]
    profiles = data.get("profiles")
    for i, entry in enumerate(profiles if isinstance(profiles, list) else []):
        if isinstance(entry, str) and looks_like_file(entry):
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
