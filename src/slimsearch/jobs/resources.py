"""What a job runs on: its device, workers, threads and GPU share per trial, resolved from its
search settings and the machine (or Ray cluster) it runs on, before anything is written."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Mapping, Optional

from slimsearch._device import (CPU, default_gpus_per_worker, default_workers, device_name, is_gpu,
                                trial_resources)
from slimsearch.exceptions import ConfigError
from slimsearch.jobs.spec import SearchSpec


@dataclass(frozen=True)
class Resources:
    """A job's resolved resources.

    ``device`` is where the driver scores the teacher and the local executor runs candidates
    (``cpu``, ``cuda``, ``cuda:N``); ``worker_device`` where a Ray trial runs its candidate
    (``cuda`` in a trial is the GPU Ray gave it). ``gpus`` is how many GPUs were seen.
    """

    device: str
    worker_device: str
    workers: int
    threads: int
    gpus_per_worker: float
    gpus: int

    def trial(self) -> dict[str, float]:
        """What one Ray trial asks for (:func:`~slimsearch._device.trial_resources`)."""
        return trial_resources(self.threads, self.gpus_per_worker)

    def describe(self) -> str:
        share = f", {self.gpus_per_worker:g} GPU each" if self.gpus_per_worker else ""
        return f"{self.workers} worker(s) x {self.threads} thread(s){share} on {self.device}"


def resolve_resources(search: SearchSpec, *, cpus: int, gpus: int, executor: str = "ray",
                      driver_gpus: Optional[int] = None, source: Optional[str] = None,
                      flags: Optional[Mapping[str, str]] = None) -> Resources:
    """The resources of a job with settings ``search`` on ``cpus`` cores and ``gpus`` CUDA GPUs (pure).

    ``driver_gpus``: the GPUs of the driver's own machine when the trials run on a Ray cluster
    (default: ``gpus``); a driver without one scores the teacher on its CPU.

    Raises:
        ConfigError: the device names CUDA (or a GPU index) the machine lacks, or a Ray job
            on a GPU gives its trials no GPU share (Ray hides the GPUs from such a trial) or more
            than there are. The one-line message names the job file ``source`` and the field, or
            the flag ``flags`` maps the field to (``{"search.device": "--device"}``).
    """
    def where(field: str) -> str:
        flag = (flags or {}).get(field)
        return flag if flag else f"{source}: {field}" if source else field

    try:
        device = device_name(search.device, gpus)
    except ConfigError as exc:
        raise ConfigError(f"{where('search.device')}: {exc}") from None
    gpu = is_gpu(search.device, gpus)
    share = search.gpus_per_worker if search.gpus_per_worker is not None else default_gpus_per_worker(search.device, gpus)
    if gpu and executor == "ray" and share <= 0:
        raise ConfigError(f"{where('search.gpus_per_worker')}: 0 with device {search.device!r}: Ray hides the GPUs "
                          "from a trial that asks for none; allowed: a share > 0 (e.g. 0.5), or device 'cpu'")
    if share > gpus and executor == "ray":
        raise ConfigError(f"{where('search.gpus_per_worker')}: {share:g} GPUs per trial, but {gpus} GPU(s) are "
                          f"here, so no trial would start; allowed: at most {gpus}")
    workers = search.workers or default_workers(search.device, gpus, share, cpus)
    threads = search.threads_per_worker or max(1, cpus // workers)  # the cores shared out (driver.default_threads)
    worker_device = "cuda" if gpu and executor == "ray" else device
    if driver_gpus is not None and driver_gpus < gpus:
        device = device_name(search.device, driver_gpus) if driver_gpus > 0 else CPU
    return Resources(device=device, worker_device=worker_device, workers=workers, threads=threads,
                     gpus_per_worker=share if executor == "ray" else 0.0, gpus=gpus)


def gpus_here() -> tuple[int, int]:
    """``(GPUs the trials can use, GPUs of this machine)``: the first is the Ray cluster's when this
    process has joined one, else this machine's CUDA GPUs as torch sees them."""
    from slimsearch._device import cuda_count

    local = cuda_count()
    ray = sys.modules.get("ray")  # never imported: not joined to a cluster
    if ray is not None and ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0)), local
    return local, local


__all__ = ["CPU", "Resources", "gpus_here", "resolve_resources"]
