"""The names of the metrics every candidate has, and of those each target profile adds."""

from __future__ import annotations


LOCAL_PROFILE = "local"
# Metrics every candidate has, whatever the profiles.
BASE_METRICS = ("size_bytes", "params", "macs", "bitops", "latency_ms@local")


def local_latency_metrics(batch: int) -> tuple[str, ...]:
    """The measured latencies of a task whose larger timed batch is ``batch`` (Task.latency_batch)."""
    return ("latency_ms@local", f"latency_ms_b{batch}@local")


# Measured only where this machine exposes energy counters (RAPL); see hardware_profiles/_energy.py.
LOCAL_ENERGY_METRIC = "energy_mj@local"
# Metrics each named (modelled) profile adds, as ``name@profile``.
PROFILE_METRICS = ("latency_ms", "energy_mj", "cost_usd_per_1m")
