"""A real PostgreSQL server and a real MLflow tracking server, started by the tests.

PostgreSQL comes from Debian's ``postgresql`` package (``.ci/run`` installs it): the
fixture runs its ``initdb`` and ``pg_ctl`` on a throwaway data folder, listening on
127.0.0.1 on a free port, with one password-protected user, and stops it at the end.
Where the package or a Python driver is missing the tests skip and say so (under CI=true they fail).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._real import missing

USER = "slim"


def _free_port() -> int:
    from slimsearch.storage.ui import free_port

    return free_port()


@dataclass
class Postgres:
    """A running server; :meth:`database` makes a fresh database and returns its URL."""

    port: int
    password: str
    host: str = "127.0.0.1"

    def url(self, db: str, *, password: bool = True) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql://{USER}{secret}@{self.host}:{self.port}/{db}"

    def database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        missing("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl); .ci/run installs "
                "Debian's postgresql package, or: apt-get install -y --no-install-recommends postgresql")
    return Path(found[-1]).parent


@pytest.fixture(scope="session")
def postgres():
    """PostgreSQL on 127.0.0.1:<free port>, user ``slim`` with a random password (scram-sha-256)."""
    bindir = _postgres_bin()
    try:
        import sqlalchemy

        sqlalchemy.create_engine("postgresql://u:p@127.0.0.1:1/db")  # imports the driver, connects nowhere
    except ImportError as exc:
        missing(f"no PostgreSQL driver for SQLAlchemy ({exc}); pip install -e '.[postgres]'")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing("running as root and there is no 'postgres' user to run PostgreSQL as "
                    "(PostgreSQL refuses to run as root)")
    # short path (it holds the server's socket), in /tmp when root: the postgres user must reach it
    home = Path(tempfile.mkdtemp(prefix="slimsearch-pg-", dir="/tmp" if as_root else None))
    data, pwfile, log = home / "data", home / "pw", home / "server.log"
    password = secrets.token_hex(12)
    pwfile.write_text(password + "\n")
    if as_root:
        os.chown(home, owner.pw_uid, owner.pw_gid)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    port = _free_port()

    def run(*cmd: str) -> None:
        subprocess.run(prefix + list(cmd), check=True, capture_output=True, text=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
            "-E", "UTF8", "--no-sync")
        # -F: no fsync (a throwaway server); -k: its Unix socket in our folder, not /var/run
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
            "-o", f"-h 127.0.0.1 -p {port} -k {home} -F")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(home, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc.cmd[-3:]}: {exc.stderr.strip()[-500:]}")
    try:
        yield Postgres(port=port, password=password)
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class MlflowServer:
    url: str
    artifact_root: Path
    log: Path


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """``mlflow server`` with a PostgreSQL backend store and a local artifact root, on 127.0.0.1."""
    backend = postgres.database("mlflow")
    artifacts, log = tmp_path / "server-artifacts", tmp_path / "mlflow-server.log"
    artifacts.mkdir()
    port = _free_port()
    # no telemetry from a test server, and none of MLflow 3's background job workers (unused here)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
             "--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}): {log.read_text(errors='replace')[-800:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer on {url} in 120 s")
            time.sleep(0.5)
        yield MlflowServer(url, artifacts, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and the workers it started, nothing else
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(30)
