"""The names of the metrics every candidate has, of those each target profile adds, and which way
each task family's metric points."""

from __future__ import annotations

from enum import Enum

LOCAL_PROFILE = "local"
# Metrics every candidate has, whatever the profiles.
BASE_METRICS = ("size_bytes", "params", "macs", "bitops", "latency_ms@local")


def local_latency_metrics(batch: int) -> tuple[str, ...]:
    """The measured latencies of a task whose larger timed batch is ``batch`` (Task.latency_batch);
    a batch of 1 adds none (a causal LM is timed per generated token, at batch 1)."""
    return ("latency_ms@local",) if batch <= 1 else ("latency_ms@local", f"latency_ms_b{batch}@local")


# Measured only where this machine exposes energy counters (RAPL); see hardware_profiles/_energy.py.
LOCAL_ENERGY_METRIC = "energy_mj@local"
# Metrics each named (modelled) profile adds, as ``name@profile``.
PROFILE_METRICS = ("latency_ms", "energy_mj", "cost_usd_per_1m")


class TaskFamily(str, Enum):
    """What kind of model a task compresses; it says which way the task metric points and how a
    candidate's distance from the teacher is named and measured. The one place that knows it.

    - ``classification`` (images, sentence encoders): the metric is higher-is-better (accuracy,
      fidelity); the gap is ``<metric>_drop``, the teacher's value minus the candidate's.
    - ``causal-lm`` (decoder-only language models): the metric is perplexity, lower-is-better;
      the gap is ``<metric>_increase``, the candidate's relative increase over the teacher's
      (``ppl_increase``: ``ppl / teacher_ppl - 1``, 0.05 is 5% worse).
    """

    CLASSIFICATION = "classification"
    CAUSAL_LM = "causal-lm"

    @property
    def direction(self) -> str:
        """``"max"`` or ``"min"``: which way the task metric is better."""
        return "min" if self is TaskFamily.CAUSAL_LM else "max"

    def gap_name(self, metric: str) -> str:
        """The name of the candidate's distance from the teacher on ``metric`` (lower is better)."""
        return f"{metric}_increase" if self is TaskFamily.CAUSAL_LM else f"{metric}_drop"

    def gap(self, value: float, teacher: float) -> float:
        """How much worse ``value`` is than the teacher's ``teacher`` (0: as good; lower is better)."""
        if self is TaskFamily.CAUSAL_LM:
            return value / teacher - 1.0
        return teacher - value

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is strictly better than ``b``."""
        return a < b if self is TaskFamily.CAUSAL_LM else a > b
