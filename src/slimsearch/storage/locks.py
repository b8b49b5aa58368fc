"""Driver locks: one driver at a time on a SQLite study and on a job folder, and telling a job whose
driver died from one that runs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO, Optional

from slimsearch.exceptions import JobStateError
from slimsearch.storage.urls import redact, sqlite_path

DRIVER_LOCK = "driver.lock"  # in a job folder: held by the driver running that job (claim_folder)


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
    return _hold(path.with_name(path.name + ".lock"), f"{where}: {redact(url)} is in use by another slimsearch "
                 "driver (pid {pid}); a SQLite study takes one driver at a time: wait for it to end or stop it, "
                 "or give several drivers a PostgreSQL storage URL")


def claim_folder(out: Path) -> Optional[IO]:
    """Hold job folder ``out`` for this driver until the returned file is closed (``driver.lock``).

    Whatever the storage, ``--resume`` of a job still running is refused (on PostgreSQL it
    would mark the running driver's trials as interrupted), and :func:`driver_gone` can tell
    a job whose driver died from one that runs.
    """
    return _hold(Path(out) / DRIVER_LOCK, f"--out {out}: this job is being run by another slimsearch driver "
                 "(pid {pid}): wait for it to end or stop it (Ctrl-C, or `kill {pid}`)")


def driver_gone(out: str | Path) -> bool:
    """True when a driver has held job folder ``out`` (:func:`claim_folder`) and none holds it
    now: the one that ran it ended, however (SIGKILL, out of memory, the machine restarted).
    False while a driver holds it, and whenever it cannot tell (no lock file: a job from
    before this lock, or a folder this process cannot read; no ``flock``). The probe takes a
    shared lock for a moment, which :func:`_hold` retries past.
    """
    try:
        import fcntl

        handle = open(Path(out) / DRIVER_LOCK)
    except (ImportError, OSError):  # Windows; no lock file; another user's job
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return True


def _hold(lock_path: Path, refusal: str) -> Optional[IO]:
    """An exclusive ``flock`` on ``lock_path`` (created if need be), held until the file is
    closed, with this process's pid written in it; a held one raises :class:`JobStateError`
    with ``refusal`` (each ``{pid}`` in it replaced by the holder's). None without ``flock``
    (Windows: keeping one driver at a time is then the user's to do)."""
    try:
        import fcntl
    except ImportError:
        return None
    handle = open(lock_path, "a+")
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
        raise JobStateError(refusal.replace("{pid}", holder))
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
