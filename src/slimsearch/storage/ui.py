"""The MLflow UI on a job's tracking store, served on loopback only (``slimsearch ui JOB``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slimsearch.exceptions import ConfigError, SlimSearchError

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class UiServer:
    """A running ``mlflow server``; :meth:`stop` ends it (and only it)."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the UI answers over loopback; raise if the server exits or does not answer in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-600:] if self.log_path.exists() else ""
                raise SlimSearchError(f"mlflow server exited with code {self.process.returncode}: {tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise SlimSearchError(f"mlflow server did not answer on {self.url} within {timeout:.0f} s")

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_ui(tracking_uri: str, *, port: Optional[int] = None, log_path: Optional[Path] = None) -> UiServer:
    """Start ``mlflow server`` for ``tracking_uri`` on 127.0.0.1 (``port``, default a free one)."""
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in [1, 65535], got {port}")
    port = port or free_port()
    log_path = Path(log_path) if log_path else Path(tracking_uri.replace("sqlite:///", "")).parent / "mlflow-ui.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
           "--host", HOST, "--port", str(port), "--workers", "1"]
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed when it exits
    try:
        # off unless the user set them: telemetry (as tracking._client), and MLflow 3's job execution, which
        # starts a job runner and a Huey consumer per job type (8 more Python processes) that a job's
        # UI never uses; they outlived the server when it was stopped, and its stop took 10-20 s (1 s now)
        env = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=log_path.parent, env=env)
    finally:
        log.close()
    return UiServer(process, f"http://{HOST}:{port}", log_path)
