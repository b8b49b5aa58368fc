"""Energy counters: the RAPL reader on a fake powercap tree, wrap-around, unreadable zones, no meter.

The powercap tree here is a FAKE built in tmp_path: the machine these tests were
written on (a container) exposes no /sys/class/powercap, so the real counters
cannot be read. The fake has the same layout and file names as the kernel's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._energy import (
    EnergyDomain,
    EnergyMeter,
    counter_delta_uj,
    energy_meter,
    rapl_counters,
)

MAX_UJ = 262_143_328_850  # a real package's max_energy_range_uj


def _zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    path = root / zone
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def _set(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path) -> Path:
    """A fake two-socket powercap tree: two packages with core subzones, one DRAM zone, psys."""
    root = tmp_path / "powercap"
    _zone(root, "intel-rapl:0", "package-0", 1_000_000)
    _zone(root, "intel-rapl:0:0", "core", 500_000)
    _zone(root, "intel-rapl:0:1", "dram", 200_000)
    _zone(root, "intel-rapl:1", "package-1", 3_000_000)
    _zone(root, "intel-rapl:2", "psys", 9_000_000)
    return root


def test_packages_and_dram_are_counted_core_and_psys_are_not(powercap):
    names = [c.name for c in rapl_counters(powercap)]
    assert names == ["package-0", "dram(intel-rapl:0:1)", "package-1"]
    meter = energy_meter("cpu", powercap_root=powercap)
    assert meter.source == "rapl:package-0+dram(intel-rapl:0:1)+package-1"
    assert [c.max_uj for c in meter.counters] == [MAX_UJ] * 3


def test_energy_over_the_calls_is_the_counters_advance(powercap):
    zones = {n: powercap / n for n in ("intel-rapl:0", "intel-rapl:0:1", "intel-rapl:1")}
    meter = energy_meter(powercap_root=powercap)
    calls = []

    def run():  # each call "uses" 2 mJ on package-0, 1 mJ on DRAM and 3 mJ on package-1
        calls.append(1)
        n = len(calls)
        _set(zones["intel-rapl:0"], 1_000_000 + 2_000 * n)
        _set(zones["intel-rapl:0:1"], 200_000 + 1_000 * n)
        _set(zones["intel-rapl:1"], 3_000_000 + 3_000 * n)

    reading = meter.measure(run, warmup=0, repeats=5, min_time_s=0)
    assert reading.calls == 5 == len(calls)
    assert reading.joules == pytest.approx(5 * 6e-3)
    assert reading.mj_per_call == pytest.approx(6.0)
    assert reading.source == meter.source


def test_a_counter_that_wraps_during_the_measurement_counts_across_the_wrap(tmp_path):
    root = tmp_path / "powercap"
    zone = _zone(root, "intel-rapl:0", "package-0", 999_000, max_uj=1_000_000)
    meter = energy_meter(powercap_root=root)
    # 1,000 uJ to the top of the range, then 4,000 uJ past zero
    reading = meter.measure(lambda: _set(zone, 4_000), warmup=0, repeats=1, min_time_s=0)
    assert reading.joules == pytest.approx(5_000e-6)


def test_counter_delta_handles_one_wrap_and_refuses_an_unknown_range():
    assert counter_delta_uj(10, 25, 100) == 15
    assert counter_delta_uj(90, 5, 100) == 15
    with pytest.raises(ConfigError, match="went back from 90 to 5"):
        counter_delta_uj(90, 5, None)


def test_unreadable_zones_are_skipped_and_no_readable_zone_means_no_meter(powercap, monkeypatch):
    # Since Linux 5.10 energy_uj is mode 0400 root. chmod would not stop root (these
    # tests may run as root), so reading a locked file raises PermissionError here.
    locked: set[Path] = set()
    read_text = Path.read_text

    def guarded(self, *args, **kwargs):
        if self in locked:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", guarded)
    locked |= {powercap / zone / "energy_uj" for zone in ("intel-rapl:0", "intel-rapl:1")}
    assert [c.name for c in rapl_counters(powercap)] == ["dram(intel-rapl:0:1)"]
    locked.add(powercap / "intel-rapl:0:1" / "energy_uj")
    assert rapl_counters(powercap) == []
    assert energy_meter(powercap_root=powercap) is None


def test_garbage_and_missing_files_are_skipped(powercap):
    (powercap / "intel-rapl:0" / "energy_uj").write_text("not a number\n")
    (powercap / "intel-rapl:1" / "max_energy_range_uj").unlink()
    counters = rapl_counters(powercap)
    assert [c.name for c in counters] == ["dram(intel-rapl:0:1)", "package-1"]
    assert counters[1].max_uj is None  # read, but a wrap could not be counted


def test_no_powercap_folder_means_no_meter(tmp_path):
    assert energy_meter(powercap_root=tmp_path / "absent") is None


def test_gpu_meter_needs_pynvml_and_unknown_domains_are_refused(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if pynvml were not installed
    assert energy_meter(EnergyDomain.GPU) is None
    with pytest.raises(ConfigError, match=r"energy domain must be one of \['cpu', 'gpu'\], got 'tpu'"):
        energy_meter("tpu")


def test_measure_validates_its_arguments(powercap):
    meter = EnergyMeter(rapl_counters(powercap), source="rapl:test")
    with pytest.raises(ConfigError, match="repeats must be an int >= 1, got 0"):
        meter.measure(lambda: None, repeats=0)
