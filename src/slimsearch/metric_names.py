"""The names of the metrics every candidate has, of those each target profile adds, and which way
each task family's metric points."""

from __future__ import annotations

from enum import Enum

LOCAL_PROFILE = "local"
LATENCY = "latency_ms"
# Metrics every candidate has, whatever the profiles.
BASE_METRICS = ("size_bytes", "params", "macs", "bitops", "latency_ms@local")


def local_latency_metrics(batch: int) -> tuple[str, ...]:
    """The measured latencies of a task whose larger timed batch is ``batch`` (Task.latency_batch);
    a batch of 1 adds none (a causal LM is timed per generated token, at batch 1)."""
    return ("latency_ms@local",) if batch <= 1 else ("latency_ms@local", f"latency_ms_b{batch}@local")


def paired_latency_extras(name: str) -> tuple[str, str, str]:
    """The names recorded beside a paired local latency ``name`` (``latency_ms@local``,
    ``latency_ms_b<N>@local``): its raw latency, the coefficient of variation of its per-round
    ratios and its noisy flag (1.0: its rounds disagreed beyond the tolerance every time).

    In a job, ``name`` itself is the paired figure: the median of per-round ratios to the teacher,
    timed in alternating rounds, times the teacher's latency taken once at the job's start
    (:func:`~slimsearch.hardware_profiles._measure.measure_paired`); it is what the front uses.
    These three are diagnostics, never objectives or constraints:
    ``latency_ms_b64@local`` -> ``latency_ms_raw_b64@local``, ``latency_cv_b64@local``,
    ``latency_noisy_b64@local``.
    """
    from slimsearch.exceptions import ConfigError

    base, at, profile = name.partition("@")
    if not base.startswith(LATENCY) or not at:
        raise ConfigError(f"{name!r} is not a local latency metric; allowed: {list(local_latency_metrics(64))}")
    batch = base[len(LATENCY):]  # "" or "_b64"
    return f"{LATENCY}_raw{batch}@{profile}", f"latency_cv{batch}@{profile}", f"latency_noisy{batch}@{profile}"


# Measured only where this machine exposes energy counters (RAPL); see hardware_profiles/_energy.py.
LOCAL_ENERGY_METRIC = "energy_mj@local"
# Metrics each named (modelled) profile adds, as ``name@profile``.
PROFILE_METRICS = ("latency_ms", "energy_mj", "cost_usd_per_1m")
# What a causal LM adds (evaluators/decoder.py): memory at a 2,048-token context (counted), the
# deployed graph's decode speed and prefill here (measured), and decode speed per profile (modelled).
DECODE_TOK_S = "decode_tok_s"
DECODER_METRICS = ("memory_bytes", f"{DECODE_TOK_S}@{LOCAL_PROFILE}", f"prefill_ms@{LOCAL_PROFILE}")
DECODER_PROFILE_METRICS = (DECODE_TOK_S,)


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
