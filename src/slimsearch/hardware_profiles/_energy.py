"""Measured energy on this machine, where it exposes energy counters.

Two sources, both cumulative counters read before and after repeated calls:

- Linux powercap/RAPL (``/sys/class/powercap/intel-rapl*``; AMD CPUs appear there
  too): the ``package-N`` zones and any ``dram`` zones. ``psys`` (the whole SoC on
  laptops) is left out because it already contains the packages. The counters wrap
  at ``max_energy_range_uj``; since Linux 5.10 they are readable by root only, and a
  zone that cannot be read is skipped.
- NVML on NVIDIA GPUs (``nvmlDeviceGetTotalEnergyConsumption``, Volta and newer),
  used only when ``pynvml`` is installed; it is not a dependency of slimsearch.

Both count the whole package or board, so a figure includes whatever else ran on it
during the measurement (other trials, other programs). When neither source is
readable, :func:`energy_meter` returns None and no energy is reported as measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Protocol

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._measure import check_schedule

__all__ = ["EnergyDomain", "EnergyMeter", "EnergyReading", "energy_meter", "rapl_counters"]

POWERCAP_ROOT = Path("/sys/class/powercap")
# Read the counters at least this often while measuring, so a 32-bit RAPL counter
# cannot wrap more than once between two reads (a package at 200 W wraps its
# 262 kJ range in about 20 minutes).
_READ_EVERY_S = 1.0


class EnergyDomain(str, Enum):
    """What an energy meter counts: the CPU packages (RAPL) or the GPUs (NVML)."""

    CPU = "cpu"
    GPU = "gpu"


class Counter(Protocol):
    """One cumulative energy counter in microjoules; ``max_uj`` is where it wraps (None: never)."""

    name: str
    max_uj: Optional[int]

    def read_uj(self) -> int: ...


@dataclass(frozen=True)
class RaplCounter:
    """A powercap zone's ``energy_uj`` file, wrapping at ``max_energy_range_uj``."""

    name: str
    path: Path
    max_uj: Optional[int]

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text().strip())


@dataclass(frozen=True)
class NvmlCounter:
    """An NVIDIA GPU's total energy since the driver loaded (NVML reports mJ)."""

    name: str
    handle: Any
    max_uj: Optional[int] = None

    def read_uj(self) -> int:
        import pynvml

        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) * 1000


@dataclass(frozen=True)
class EnergyReading:
    """Energy counted over repeated calls.

    Attributes:
        joules: Energy the counters advanced by over the timed calls.
        seconds: Wall-clock time of the timed calls.
        calls: Number of timed calls.
        source: The counters read, e.g. ``"rapl:package-0+dram"``.
    """

    joules: float
    seconds: float
    calls: int
    source: str

    @property
    def mj_per_call(self) -> float:
        return self.joules * 1e3 / self.calls

    @property
    def average_power_w(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else 0.0


def counter_delta_uj(start: int, end: int, max_uj: Optional[int]) -> int:
    """How far a counter advanced from ``start`` to ``end``, across at most one wrap.

    Raises:
        ConfigError: The counter went back and its wrap point is unknown.
    """
    if end >= start:
        return end - start
    if max_uj is None:
        raise ConfigError(f"energy counter went back from {start} to {end} uJ and has no known range")
    return end + max_uj - start


class EnergyMeter:
    """Reads a set of counters around repeated calls. The constructor only stores them."""

    def __init__(self, counters: Sequence[Counter], source: str):
        self.counters = tuple(counters)
        self.source = source

    def measure(self, fn: Callable[[], object], *, warmup: int = 1, repeats: int = 10,
                min_time_s: float = 0.5) -> EnergyReading:
        """Energy of ``repeats`` calls of ``fn`` (more until ``min_time_s`` has passed).

        RAPL counters advance about once a millisecond, so a measurement shorter than
        a few hundred milliseconds is mostly rounding: keep ``min_time_s`` well above that.

        Raises:
            ConfigError: ``warmup < 0``, ``repeats < 1`` or ``min_time_s < 0``.
        """
        check_schedule(warmup, repeats, min_time_s)
        for _ in range(warmup):
            fn()
        total_uj = 0
        last = [c.read_uj() for c in self.counters]
        start = last_read = time.perf_counter()
        calls = 0
        while calls < repeats or time.perf_counter() - start < min_time_s:
            fn()
            calls += 1
            if time.perf_counter() - last_read >= _READ_EVERY_S:
                total_uj, last = self._advance(total_uj, last)
                last_read = time.perf_counter()
        total_uj, _ = self._advance(total_uj, last)
        seconds = time.perf_counter() - start
        return EnergyReading(joules=total_uj * 1e-6, seconds=seconds, calls=calls, source=self.source)

    def _advance(self, total_uj: int, last: list[int]) -> tuple[int, list[int]]:
        now = [c.read_uj() for c in self.counters]
        total_uj += sum(counter_delta_uj(a, b, c.max_uj) for a, b, c in zip(last, now, self.counters))
        return total_uj, now


def _read_int(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def rapl_counters(root: str | os.PathLike[str] = POWERCAP_ROOT) -> list[RaplCounter]:
    """The readable RAPL package and DRAM counters under the powercap folder ``root``.

    Zones that cannot be read (permission denied, no such file, not a number) are
    skipped; ``psys`` and the ``core``/``uncore`` subzones are left out because a
    package already contains them.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    counters = []
    for zone in sorted(root.glob("intel-rapl:*")):
        try:
            name = (zone / "name").read_text().strip()
        except OSError:
            continue
        if not (name.startswith("package-") or name == "dram"):
            continue
        if _read_int(zone / "energy_uj") is None:  # root-only since Linux 5.10
            continue
        label = name if name != "dram" else f"dram({zone.name})"
        counters.append(RaplCounter(name=label, path=zone, max_uj=_read_int(zone / "max_energy_range_uj")))
    return counters


def nvml_counters() -> list[NvmlCounter]:
    """One counter per NVIDIA GPU that reports total energy; empty without pynvml or a GPU."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        counters = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises on GPUs older than Volta
            counters.append(NvmlCounter(name=f"gpu{index}", handle=handle))
        return counters
    except pynvml.NVMLError:
        return []


def energy_meter(domain: EnergyDomain | str = EnergyDomain.CPU, *,
                 powercap_root: str | os.PathLike[str] = POWERCAP_ROOT) -> Optional[EnergyMeter]:
    """A meter for the CPU packages (RAPL) or the GPUs (NVML), or None when this machine exposes none.

    Raises:
        ConfigError: ``domain`` is not one of :class:`EnergyDomain`.
    """
    try:
        domain = EnergyDomain(domain)
    except ValueError:
        raise ConfigError(f"energy domain must be one of {[d.value for d in EnergyDomain]}, got {domain!r}") from None
    if domain is EnergyDomain.CPU:
        counters, kind = rapl_counters(powercap_root), "rapl"
    else:
        counters, kind = nvml_counters(), "nvml"
    if not counters:
        return None
    return EnergyMeter(counters, source=f"{kind}:" + "+".join(c.name for c in counters))
