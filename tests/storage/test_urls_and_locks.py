"""Redacting database passwords; the one-driver locks of a SQLite study and of a job folder (and what
the folder's tells of a driver that is gone)."""

from __future__ import annotations

import json
import os

import pytest

from slimsearch.exceptions import JobStateError
from slimsearch.storage.locks import claim_folder, claim_sqlite, driver_gone
from slimsearch.storage.urls import redact, sqlite_path


@pytest.mark.parametrize("url, shown", [
    ("postgresql://slim:s3cret@db.example:5432/study", "postgresql://slim:***@db.example:5432/study"),
    ("postgresql+psycopg://slim:p%40ss/w:rd@10.0.0.2/study", "postgresql+psycopg://slim:***@10.0.0.2/study"),
    ("mysql://root:@db/study", "mysql://root:***@db/study"),
    ("https://alice:tok3n@mlflow.example/", "https://alice:***@mlflow.example/"),
    ("postgresql://slim@db/study", "postgresql://slim@db/study"),  # no password: unchanged
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),  # a port is not a password
    ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
])
def test_redact_hides_the_password_and_keeps_the_rest(url, shown):
    assert redact(url) == shown


def test_redact_finds_urls_inside_longer_text_and_stops_at_each():
    job = json.dumps({"storage": "postgresql://slim:s3cret@db/study", "tracking_uri": "http://127.0.0.1:5000",
                      "objectives": {"latency_ms@raspberry-pi-4": "min"}})
    out = redact(job)
    assert "s3cret" not in out
    # everything after the URL survives, including the '@' of a metric name
    assert json.loads(out) == {"storage": "postgresql://slim:***@db/study", "tracking_uri": "http://127.0.0.1:5000",
                               "objectives": {"latency_ms@raspberry-pi-4": "min"}}
    assert redact("cannot open postgresql://a:b@h/d: refused") == "cannot open postgresql://a:***@h/d: refused"


def test_sqlite_path_only_for_sqlite_files(tmp_path):
    assert sqlite_path(f"sqlite:///{tmp_path}/s.db") == tmp_path / "s.db"
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql://u:p@h/d") is None


def test_a_sqlite_study_is_held_by_one_driver_at_a_time(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = claim_sqlite(url, "job.yaml: storage")
    assert first is not None
    with pytest.raises(JobStateError) as err:
        claim_sqlite(url, "job.yaml: storage")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"job.yaml: storage: {url} is in use by another slimsearch driver (pid {os.getpid()})")
    assert "PostgreSQL" in message
    first.close()  # the driver ends: the next one may start
    again = claim_sqlite(url, "job.yaml: storage")
    assert again is not None
    again.close()
    assert claim_sqlite("postgresql://u:p@h/d", "storage") is None  # PostgreSQL serves many drivers


def test_a_job_folder_is_held_by_one_driver_and_one_killed_is_seen_gone(tmp_path):
    """The registry's "lost": a real driver process holds the folder, a second is refused, then the
    first dies by SIGKILL."""
    import signal
    import subprocess
    import sys

    assert not driver_gone(tmp_path)  # never held: nothing to tell
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from slimsearch.storage.locks import claim_folder\n"
        f"lock = claim_folder({str(tmp_path)!r}); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not driver_gone(tmp_path)
        assert not driver_gone(tmp_path)  # the probe let go: the driver still holds it
        with pytest.raises(JobStateError) as err:
            claim_folder(tmp_path)
        assert str(err.value) == (f"--out {tmp_path}: this job is being run by another slimsearch driver "
                                  f"(pid {holder.pid}): wait for it to end or stop it (Ctrl-C, or `kill {holder.pid}`)")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert driver_gone(tmp_path)
    again = claim_folder(tmp_path)  # a resumed driver takes it back
    assert again is not None and not driver_gone(tmp_path)
    again.close()
