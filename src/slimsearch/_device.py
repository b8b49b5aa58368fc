"""Where candidates run: the ``search.device`` text (``auto``, ``cpu``, ``cuda``, ``cuda:N``), the
torch device it stands for on this machine, and the GPU share a Ray trial asks for.

One place for it: every step that puts a model or a tensor somewhere asks here. Nothing
imports torch at import time (job files are validated before torch loads).
"""

from __future__ import annotations

import copy
import re
from enum import Enum
from typing import TYPE_CHECKING, Optional, Union

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

DEVICE_ALLOWED = "'auto' (CUDA when present, else the CPU), 'cpu', 'cuda' or 'cuda:N' (N a GPU index)"
_DEVICE = re.compile(r"^(auto|cpu|cuda)(:(0|[1-9][0-9]{0,3}))?$")
CPU = "cpu"


class DeviceKind(str, Enum):
    """What a job's ``search.device`` names: a choice, or CUDA (``cuda:N`` is CUDA too)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def parse_device(text: object) -> tuple[DeviceKind, Optional[int]]:
    """``(kind, GPU index or None)`` of a ``search.device`` text; syntax only, no torch.

    Raises:
        ConfigError: ``text`` is not one of :data:`DEVICE_ALLOWED`.
    """
    match = _DEVICE.match(text) if isinstance(text, str) else None
    if match is None or (match[2] and match[1] != DeviceKind.CUDA.value):
        raise ConfigError(f"{text!r} is not a device; allowed: {DEVICE_ALLOWED}")
    return DeviceKind(match[1]), (int(match[3]) if match[3] is not None else None)


def cuda_count() -> int:
    """The CUDA GPUs torch sees in this process (0 with a CPU build of torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_name(text: str, gpus: int) -> str:
    """The torch device string ``text`` stands for on a machine with ``gpus`` CUDA GPUs (pure).

    ``auto`` is ``cuda`` when there is one, else ``cpu``.

    Raises:
        ConfigError: ``text`` names CUDA, or a GPU index, that the machine lacks (one line).
    """
    kind, index = parse_device(text)
    if kind is DeviceKind.AUTO:
        return DeviceKind.CUDA.value if gpus > 0 else CPU
    if kind is DeviceKind.CPU:
        return CPU
    if gpus <= 0:
        raise ConfigError(f"device {text!r}: this machine has no CUDA GPU that torch can use "
                          f"(torch.cuda.is_available() is False); allowed: 'cpu' or 'auto'")
    if index is not None and index >= gpus:
        raise ConfigError(f"device {text!r}: this machine has {gpus} CUDA GPU(s); allowed: 'cuda' or 'cuda:N' "
                          f"with N in [0, {gpus - 1}], 'cpu' or 'auto'")
    return text


def resolve_device(text: Union[str, "torch.device", None] = "auto") -> "torch.device":
    """The ``torch.device`` that ``text`` (a ``search.device`` value, or a device) stands for here.

    None means the CPU. Raises ConfigError as :func:`device_name` does.
    """
    import torch

    if text is None:
        return torch.device(CPU)
    if isinstance(text, torch.device):
        text = str(text)
    return torch.device(device_name(text, cuda_count()))


def is_gpu(text: str, gpus: int) -> bool:
    """Whether ``text`` runs candidates on a GPU on a machine (or cluster) with ``gpus`` GPUs."""
    return device_name(text, gpus) != CPU


def default_gpus_per_worker(text: str, gpus: int) -> float:
    """A trial's GPU share when the job gives none: a whole GPU where candidates run on one, else 0."""
    return 1.0 if is_gpu(text, gpus) else 0.0


def default_workers(text: str, gpus: int, gpus_per_worker: float, cpus: int) -> int:
    """Workers when the job gives none: one per GPU share where candidates run on GPUs
    (``gpus / gpus_per_worker``, so 0.5 puts two on each), else one per core."""
    if is_gpu(text, gpus) and gpus_per_worker > 0:
        return max(1, int(gpus / gpus_per_worker + 1e-9))
    return max(1, cpus)


def trial_resources(threads: int, gpus_per_worker: float) -> dict[str, float]:
    """What one Ray trial asks for: ``threads`` CPUs, and its GPU share when it has one (pure)."""
    resources: dict[str, float] = {"cpu": threads}
    if gpus_per_worker > 0:
        resources["gpu"] = gpus_per_worker
    return resources


def device_of(model: "nn.Module") -> "torch.device":
    """Where ``model``'s first parameter (else buffer) is; the CPU for a model with neither."""
    import torch

    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device(CPU)


def moved(model: "nn.Module", device: Union[str, "torch.device"]) -> "nn.Module":
    """``model`` on ``device``: itself when it is there already, else a copy there (never in place)."""
    import torch

    device = torch.device(device)
    if _same(device_of(model), device):
        return model
    return copy.deepcopy(model).to(device)


def _same(a: "torch.device", b: "torch.device") -> bool:
    """``cuda`` and ``cuda:0`` (the current GPU) are the same place; so are ``cpu`` and ``cpu:0``."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    import torch

    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def synchronize(device: Union[str, "torch.device"]) -> None:
    """Wait for the work queued on ``device`` (a CUDA GPU); nothing on the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
