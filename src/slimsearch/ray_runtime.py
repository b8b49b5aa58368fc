"""This process and Ray: starting it for a job, joining a running cluster, and keeping the
``slimsearch`` command's SIGTERM handler through Ray's start.

Nothing here runs at import: Ray is imported inside the functions that use it.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Optional

from slimsearch.exceptions import ConfigError

PROBE_TIMEOUT_S = 5.0
HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")
HTTP_URL = re.compile(r"^https?://(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})/?$")
RAY_ADDRESS_ALLOWED = "'auto' or the head's GCS address HOST:PORT (e.g. 10.0.0.5:6379)"
SUBMIT_ADDRESS_ALLOWED = "the head's dashboard URL http://HOST:PORT (e.g. http://10.0.0.5:8265)"


def probe(host: str, port: int, what: str, allowed: str) -> None:
    """Refuse an address nothing listens on, at once: ``ray.init`` would retry for two minutes
    and then exit the process."""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what}: nothing answers at {host}:{port} ({reason}); allowed: {allowed} "
                          "of a running Ray cluster") from None


def connect(address: str) -> None:
    """Join the running Ray cluster at ``address`` (``--ray-address``) from this process.

    ``"auto"`` is the cluster this machine belongs to (``RAY_ADDRESS``, else the last
    ``ray start`` here), which is what a job submitted with :func:`submit` runs under.
    """
    import ray

    what = f"--ray-address {address!r}"
    if address != "auto":
        match = HOST_PORT.match(address or "")
        if match is None:
            hint = " (that is a dashboard URL: `slimsearch submit --address` takes it)" \
                if HTTP_URL.match(address or "") else ""
            raise ConfigError(f"{what}: not an address{hint}; allowed: {RAY_ADDRESS_ALLOWED}")
        probe(match["host"], int(match["port"]), what, RAY_ADDRESS_ALLOWED)
    # torch before ray.init: in a Ray Job's entrypoint (slimsearch submit), `ray.init(address="auto")`
    # and then `import torch` aborts the process with "Intel oneMKL FATAL ERROR: Cannot load
    # .../libtorch_cpu.so" (Ray 2.60, torch 2.13.0+cpu; the same order outside a Ray Job works).
    import torch  # noqa: F401

    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError, SystemExit) as exc:  # Ray exits when the GCS never answers
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{what}: cannot join a Ray cluster there ({type(exc).__name__}: {first}); "
                          f"allowed: {RAY_ADDRESS_ALLOWED}") from None


def start_ray(num_cpus: int, address: Optional[str] = None) -> bool:
    """Start Ray in this process unless it runs already; True when this call started it.

    With ``address``, join that running cluster instead (:func:`connect`);
    ``ray.shutdown()`` then leaves it running.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    kept = _SigtermHandler()
    try:
        if address is not None:
            connect(address)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     configure_logging=True)
    finally:
        kept.restore()
    return True


class _SigtermHandler:
    """The process's Python SIGTERM handler, put back after ``ray.init`` replaced it.

    ``ray.init`` takes SIGTERM over: from the main thread with a handler that exits with
    code 15 at once, from any other thread with a C-level one that prints a stack dump and
    kills the process. Either way a handler the process had set (the ``slimsearch``
    command's, which stops a job as Ctrl-C does: the registry says "stopped", the MLflow
    run "KILLED", exit 143) would never run. A process without one keeps Ray's. Signal
    handlers can be set only from the main thread, so :meth:`restore` does nothing
    elsewhere (:class:`RayStart` calls it from :meth:`RayStart.ready`).
    """

    def __init__(self):
        import signal
        import threading

        main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGTERM) if main else None
        self.handler = handler if callable(handler) else None

    def restore(self) -> None:
        import signal
        import threading

        if self.handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.handler)


class RayStart:
    """A job's Ray: started (:func:`start_ray`), waited for (:meth:`ready`), shut down if this
    object started it (:meth:`stop`).

    ``background=True`` starts it in a thread (about 5 s: its GCS, raylet and worker
    processes, then Ray Tune's import), so a job's own set-up (Optuna study, MLflow store,
    registry) runs meanwhile instead of before it. The thread lives until :meth:`stop` and
    shuts Ray down itself: Linux ties the processes Ray starts to the *thread* that started
    them (``PR_SET_PDEATHSIG``), so they are killed the moment that thread ends. Only for a
    process that starts Ray once: Ray restarted from threads in one process can crash
    (ray-project/ray#31145). ``background=False`` starts it in the calling thread, now.
    """

    def __init__(self, num_cpus: int, background: bool = False):
        import threading

        self._started = False
        self._error: Optional[BaseException] = None
        self._sigterm = _SigtermHandler()  # Ray's start in the thread replaces it; ready() puts it back
        self._up, self._stop = threading.Event(), threading.Event()
        self._thread: Optional[threading.Thread] = None
        if not background:
            self._started = start_ray(num_cpus)
            self._up.set()
            return
        self._thread = threading.Thread(target=self._own, args=(num_cpus,), name="slimsearch-ray", daemon=True)
        self._thread.start()

    def _own(self, num_cpus: int) -> None:
        try:
            self._started = start_ray(num_cpus)
            import ray.tune  # noqa: F401 - its first import takes ~1 s; the search needs it next
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by ready()
            self._error = exc
        finally:
            self._up.set()
        self._stop.wait()
        if self._started:
            import ray

            ray.shutdown()

    def ready(self) -> bool:
        """Wait until Ray is up; True when this object started it (it was not running already)."""
        self._up.wait()
        self._sigterm.restore()
        if self._error is not None:
            raise self._error
        return self._started

    def stop(self, wait: bool = True) -> None:
        """Shut Ray down if this object started it; ``wait=False`` returns at once (a later
        ``stop()`` waits for the shutdown to end)."""
        if self._thread is None:  # started in the calling thread: stopped there, now
            if self._started and not self._stop.is_set():
                import ray

                ray.shutdown()
            self._stop.set()
            return
        self._stop.set()
        if wait:
            self._thread.join()
