"""Running on a Ray cluster: connecting to one, measuring on its device nodes, submitting jobs to it.

- :func:`connect` joins an existing cluster (``slimsearch run --ray-address``) instead of
  starting Ray in this process; leaving it (``ray.shutdown()``) disconnects and never
  stops the cluster.
- A node started with ``--resources '{"device:<profile>": 1}'`` is that device.
  :func:`device_meters` finds such nodes for a job's profiles, and a
  :class:`DeviceMeter` times a candidate's deployable ONNX graph *on* one of them, so
  ``latency_ms@<profile>`` is measured there instead of modelled from the profile.
- :func:`submit` hands a job to a cluster through Ray's Job Submission API and records
  it in the job registry as queued; :func:`refresh_submitted` brings the registry up to
  date with what Ray says about submitted jobs (``slimsearch jobs``).

Nothing here runs at import: Ray is imported inside the functions that use it.
"""

from __future__ import annotations

import os
import shlex
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from slimsearch.exceptions import ConfigError
from slimsearch.ray_runtime import HTTP_URL, SUBMIT_ADDRESS_ALLOWED, probe

DEVICE_PREFIX = "device:"
MEASURE_TASK = "slimsearch-measure"  # name of the measuring task, ``slimsearch-measure:<profile>``
DEVICE_TIMEOUT_S = 300.0  # a device node that does not answer within this costs the candidate, not the job
DEVICE_WARMUP = 3
DEVICE_REPEATS = 15


def device_resource(profile: str) -> str:
    """The Ray resource a node carries when it is device ``profile``: ``device:<profile>``."""
    return f"{DEVICE_PREFIX}{profile}"


@contextmanager
def joined(address: Optional[str], profile_refs: Sequence[Any] = (), log: Callable[[str], None] = print
           ) -> Iterator[dict[str, "DeviceMeter"]]:
    """For the ``with`` block, this process joined to the cluster at ``address``; yields the
    :func:`device_meters` of ``profile_refs``. On leaving it disconnects (the cluster runs on).

    ``address`` None: nothing is joined and no device measures (``{}``).
    """
    if address is None:
        yield {}
        return
    import ray

    from slimsearch.ray_runtime import start_ray

    mine = start_ray(0, address=address)
    try:
        yield device_meters(profile_refs, log)
    finally:
        if mine:
            ray.shutdown()


# ---------------------------------------------------------------- device nodes


def device_nodes() -> dict[str, list[str]]:
    """``profile -> ids of the live nodes carrying device:<profile>``, in the connected cluster."""
    import ray

    found: dict[str, list[str]] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        for key, amount in (node.get("Resources") or {}).items():
            if key.startswith(DEVICE_PREFIX) and amount >= 1:
                found.setdefault(key[len(DEVICE_PREFIX):], []).append(node["NodeID"])
    return found


def _time_onnx(onnx: bytes, inputs, warmup: int, repeats: int) -> dict[str, Any]:
    """Runs on the device node: time the graph with the local measurement harness, on all the CPUs
    this process may use (a device profile models the whole device)."""
    import ray

    from slimsearch.deploy.onnx_graph import INPUT_NAME, ort_session
    from slimsearch.hardware_profiles import measure_latency

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    session = ort_session(onnx, threads=threads)
    timing = measure_latency(lambda: session.run(None, {INPUT_NAME: inputs}), warmup=warmup, repeats=repeats)
    return {**timing.to_dict(), "threads": threads, "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname()}


@dataclass(frozen=True)
class DeviceMeter:
    """Times ONNX graphs on a node carrying ``device:<profile>``; picklable, so Ray workers call it.

    Calling it returns the median latency in ms. The Ray task asks for the device resource
    and no CPU: the device is what is reserved, one measurement at a time per device, and
    a device node that runs no trials (``--num-cpus=0``) still measures.
    """

    profile: str
    warmup: int = DEVICE_WARMUP
    repeats: int = DEVICE_REPEATS
    timeout_s: float = DEVICE_TIMEOUT_S

    def measure(self, onnx: bytes, inputs) -> dict[str, Any]:
        """The timing (median_ms, iqr_ms, cv, repeats, threads) and the node_id and hostname it ran on."""
        import ray

        # scheduling_strategy "DEFAULT": a Ray Tune trial would otherwise keep the task inside its
        # placement group (CPU only), where no device resource is.
        task = ray.remote(_time_onnx).options(
            num_cpus=0, resources={device_resource(self.profile): 1}, scheduling_strategy="DEFAULT",
            name=f"{MEASURE_TASK}:{self.profile}")
        ref = task.remote(onnx, inputs, self.warmup, self.repeats)
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise TimeoutError(f"no node carrying {device_resource(self.profile)} measured the candidate "
                               f"within {self.timeout_s:g} s (did the device leave the cluster?)") from None

    def __call__(self, onnx: bytes, inputs) -> float:
        return float(self.measure(onnx, inputs)["median_ms"])


def device_meters(profile_refs: Sequence[Any], log: Callable[[str], None] = print) -> dict[str, DeviceMeter]:
    """A :class:`DeviceMeter` for every profile of ``profile_refs`` that a live node of the connected
    cluster carries as ``device:<profile>``.

    Only CPU profiles: the node times graphs with onnxruntime's CPU provider, which on a
    GPU, NPU, FPGA or ASIC device would time its host CPU, not the device. Their
    figures stay modelled, and ``log`` says why.
    """
    from slimsearch.hardware_profiles import DeviceKind, load_profile

    nodes = device_nodes()
    meters = {}
    for ref in profile_refs:
        profile = load_profile(ref)
        if profile.name not in nodes:
            continue
        if profile.kind is not DeviceKind.CPU:
            log(f"[slimsearch] {len(nodes[profile.name])} node(s) carry {device_resource(profile.name)}, but a "
                f"{profile.kind.value} is not measured (onnxruntime's CPU provider would time the host CPU): "
                f"latency_ms@{profile.name} stays modelled")
            continue
        meters[profile.name] = DeviceMeter(profile.name)
        log(f"[slimsearch] latency_ms@{profile.name} is measured on the cluster's node(s) carrying "
            f"{device_resource(profile.name)}: {', '.join(n[:12] for n in nodes[profile.name])}")
    return meters


# ---------------------------------------------------------------- job submission


@dataclass(frozen=True)
class Submission:
    """A job handed to a cluster: Ray's submission id, the registry's job id, where it writes."""

    submission_id: str
    job_id: Optional[int]
    address: str
    out: Path
    entrypoint: str


def _client(address: str):
    """A JobSubmissionClient for ``address``, or a ConfigError naming ``--address``."""
    match = HTTP_URL.match(address or "")
    what = f"--address {address!r}"
    if match is None:
        raise ConfigError(f"{what}: not a dashboard URL; allowed: {SUBMIT_ADDRESS_ALLOWED}")
    probe(match["host"], int(match["port"]), what, SUBMIT_ADDRESS_ALLOWED)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address.rstrip("/"))
    except Exception as exc:  # noqa: BLE001 - whatever the SDK raises, the address is what was wrong
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{what}: not a Ray dashboard that accepts jobs ({type(exc).__name__}: {first}); "
                          f"allowed: {SUBMIT_ADDRESS_ALLOWED}") from None


def entrypoint(job_file: str, out: Path, *, executor: str = "ray", budget: Optional[int] = None,
               workers: Optional[int] = None, resume: bool = False) -> str:
    """The shell command a submitted job runs on the head, in the uploaded copy of the job's folder."""
    argv = ["slimsearch", "run", job_file, "--out", str(out), "--ray-address", "auto", "--executor", executor,
            "--no-progress"]
    if budget is not None:
        argv += ["--budget", str(budget)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if resume:
        argv.append("--resume")
    return shlex.join(argv)


def submit(job_file: str | os.PathLike, address: str, *, out: Optional[str | os.PathLike] = None,
           executor: str = "ray", budget: Optional[int] = None, workers: Optional[int] = None,
           resume: bool = False, registry=None) -> Submission:
    """Submit the job in ``job_file`` to the cluster whose dashboard is at ``address``.

    The job file's folder is the job's ``working_dir`` (Ray zips it and stores it in the
    cluster, so nothing is downloaded; relative paths in the job keep their meaning), and the
    head runs ``slimsearch run`` on it under ``--ray-address auto``. ``out`` is a path *on the
    head* (default: ``runs/<job name>`` under the current folder, made absolute): the job
    writes its study, MLflow store and front there. The job is registered as queued, with
    its submission id, before Ray is asked, so the run's own registration (running, then
    finished) follows it; for that the head must use the same registry
    (``$SLIMSEARCH_REGISTRY``, e.g. PostgreSQL; on one machine the default one is shared).
    """
    from slimsearch.jobs.load import load_job
    from slimsearch.storage import default_storage_url, default_tracking_uri, redact
    from slimsearch.storage.registry import JobStatus, Registry

    path = Path(job_file)
    overrides = {k: v for k, v in (("search.budget", budget), ("search.workers", workers)) if v is not None}
    spec = load_job(path, overrides)
    if executor not in ("ray", "local"):
        raise ConfigError(f"--executor {executor!r}: allowed: ['ray', 'local']")
    target = Path(out if out is not None else Path("runs") / spec.name).expanduser().resolve()
    client = _client(address)
    folder = path.resolve().parent
    excludes = [".git"]
    if target.is_relative_to(folder):  # the job's own output must not be uploaded with it
        excludes.append("/" + target.relative_to(folder).as_posix())
    command = entrypoint(path.name, target, executor=executor, budget=budget, workers=workers, resume=resume)
    submission_id = f"slimsearch-{spec.name}-{uuid.uuid4().hex[:8]}"
    registry = registry or Registry()
    job_id = registry.record_start(
        name=spec.name, out=target, config_json=spec.to_json(), study_name=spec.name,
        storage=redact(spec.storage or default_storage_url(target)),
        tracking_uri=redact(spec.tracking_uri or default_tracking_uri(target)),
        experiment_id=None, parent_run_id=None, budget=spec.search.budget, status=JobStatus.QUEUED)
    registry.record_submission(job_id, submission_id=submission_id, address=address.rstrip("/"))
    try:
        client.submit_job(entrypoint=command, submission_id=submission_id,
                          runtime_env={"working_dir": str(folder), "excludes": excludes},
                          metadata={"slimsearch.job": spec.name, "slimsearch.out": str(target)})
    except Exception as exc:  # noqa: BLE001 - recorded, then reported as the bad input it most likely is
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        registry.record_end(job_id, JobStatus.FAILED, f"submission refused: {type(exc).__name__}: {first}")
        raise ConfigError(f"--address {address!r}: the cluster refused the job ({type(exc).__name__}: "
                          f"{first[:300]})") from None
    return Submission(submission_id=submission_id, job_id=job_id, address=address.rstrip("/"), out=target,
                      entrypoint=command)


_RAY_TO_REGISTRY = {"SUCCEEDED": "finished", "FAILED": "failed", "STOPPED": "stopped"}


def refresh_submitted(records: Iterable[Any], registry=None) -> dict[int, str]:
    """Ask Ray about every submitted job of ``records`` (JobRecords) that the registry does not yet
    show as ended; a job Ray has ended is recorded so (the run records itself, but a job
    that failed before it could, or whose head uses another registry, would stay queued).

    Returns ``job id -> Ray's status`` (``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``,
    ``STOPPED``, or ``unreachable``) for those asked.
    """
    from slimsearch.storage.registry import JobStatus, Registry

    open_states = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
    pending = [r for r in records if getattr(r, "submission_id", None) and r.status in open_states]
    if not pending:
        return {}
    registry = registry or Registry()
    clients: dict[str, Any] = {}
    seen: dict[int, str] = {}
    for r in pending:
        address = r.submission_address
        if address not in clients:
            try:
                clients[address] = _client(address)
            except ConfigError:
                clients[address] = None
        client = clients[address]
        if client is None:
            seen[r.id] = "unreachable"
            continue
        try:
            info = client.get_job_info(r.submission_id)
        except Exception:  # noqa: BLE001 - a job Ray no longer knows (cluster restarted) is left as recorded
            seen[r.id] = "unknown to the cluster"
            continue
        status = getattr(info.status, "value", str(info.status))
        seen[r.id] = status
        ended = _RAY_TO_REGISTRY.get(status)
        if ended is not None:
            message = None if ended == "finished" else f"Ray job {status}: {info.message or ''}".strip()
            registry.record_end(r.id, JobStatus(ended), message)
    return seen
