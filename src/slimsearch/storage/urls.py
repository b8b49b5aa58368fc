"""Database and tracking URLs: embedded defaults in the job folder, redaction, the SQLite driver lock."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import IO, Optional

from slimsearch.exceptions import JobStateError


def default_storage_url(out: Path) -> str:
    """The Optuna study database of a job: SQLite in its folder."""
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def default_tracking_uri(out: Path) -> str:
    """The MLflow backend store of a job: SQLite in its folder."""
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


# scheme://user:password@ — the password stops at the '@' and never spans whitespace or quotes,
# so a URL inside longer text (a job's JSON, an error message) is redacted and nothing after it.
_USERINFO = re.compile(r"""([A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s"'<>]*:)[^@\s"'<>]*@""")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it (``scheme://user:password@``) replaced by
    ``***``: for logs, MLflow params, the job registry and error messages. A lone URL or any
    text holding URLs, such as a job's JSON."""
    return _USERINFO.sub(r"\1***@", str(text))


def sqlite_path(url: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URL; None for other databases and in-memory SQLite."""
    match = re.match(r"sqlite(?:\+\w+)?:///([^?]*)", url)
    if match is None or match.group(1) in ("", ":memory:"):
        return None
    return Path(match.group(1)).expanduser().resolve()


def claim_sqlite(url: str, where: str) -> Optional[IO]:
    """Hold the SQLite study at ``url`` for this driver until the returned file is closed; None
    when ``url`` is not a SQLite file.

    A second driver (another job folder naming the same ``storage``, or ``--resume`` of a job
    still running) is refused, naming ``where``: SQLite serializes writers with file locks
    that fail on network filesystems and time out under load, and a resumed driver would
    mark the running one's trials as interrupted. Several drivers share a study through
    PostgreSQL. The lock is an advisory ``flock`` on ``<database>.lock``, released by the
    operating system when the driver exits, however it ends.
    """
    path = sqlite_path(url)
    if path is None:
        return None
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one driver per study is then the user's to keep
        return None
    handle = open(_lock_path(path), "a+")
    for _ in range(5):  # for 0.25 s: driver_gone's probe may hold it for a moment
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            time.sleep(0.05)
    else:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise JobStateError(f"{where}: {redact(url)} is in use by another slimsearch driver (pid {holder}); "
                            "a SQLite study takes one driver at a time: wait for it to end or stop it, or give "
                            "several drivers a PostgreSQL storage URL") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def driver_gone(url: str) -> bool:
    """True when a driver has held the SQLite study at ``url`` (:func:`claim_sqlite`) and none
    holds it now: the one that ran it ended, however (SIGKILL, out of memory, the machine
    restarted). False while a driver holds it, and whenever it cannot tell (not a SQLite
    URL, no lock file here, no ``flock``). The probe takes a shared lock for a moment, which
    :func:`claim_sqlite` retries past.
    """
    path = sqlite_path(url)
    if path is None or not _lock_path(path).is_file():
        return False
    try:
        import fcntl
    except ImportError:
        return False
    try:
        handle = open(_lock_path(path))
    except OSError:  # another user's job, say
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return True


def _lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")
