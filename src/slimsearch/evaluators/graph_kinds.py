"""The kind of graph a classification candidate deploys as, and the teacher built as each kind.

A candidate's local latency is timed in rounds alternating with a reference in the same process,
so that load slowing both cancels out (:func:`~slimsearch.hardware_profiles.measure_paired`). It
cancels only as far as the load slows both alike, and on a shared machine it does not slow every
kernel alike: a graph whose inputs are quantized (QuantizeLinear/DequantizeLinear around its
convolutions, or onnxruntime's integer kernels) was seen running 30-50% slower through a burst
of load while the float teacher beside it ran 10-20% slower (``benchmarks/paired_probe.py``). So
each candidate is paired with the teacher deployed as the same kind of graph:

- ``float``: no input is quantized (weights of any width are stored de-quantized): the teacher itself;
- ``act-qdq``: some layer's inputs are quantized, but the model is not W8A8: a float graph with
  quantize/de-quantize pairs; the reference is the teacher with 8-bit inputs to every layer;
- ``w8a8``: every quantized layer has 8-bit symmetric per-channel weights and 8-bit inputs
  (:func:`~slimsearch.deploy.onnx_int8.qdq_blockers` is empty): the integer QDQ graph; the
  reference is the teacher at W8A8.

Each kind's reference has its own quiet figures, taken at the job's start as the teacher's are;
a reference figure of kind ``k`` is keyed ``"k:<metric>"`` (:func:`kind_key`) beside the
teacher's own (the float kind's), which keep their metric names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from slimsearch.tasks import Task

__all__ = ["ACT_QDQ", "FLOAT", "GRAPH_KINDS", "W8A8", "graph_kind", "kind_figures", "kind_key",
           "kind_reference", "kinds_in"]

FLOAT, ACT_QDQ, W8A8 = "float", "act-qdq", "w8a8"
GRAPH_KINDS = (FLOAT, ACT_QDQ, W8A8)


def graph_kind(model: "nn.Module") -> str:
    """The kind of graph ``model`` deploys as (:func:`~slimsearch.deploy.onnx_int8.deployable_onnx_bytes`)."""
    from slimsearch.compress.quant.layers import quant_layers
    from slimsearch.deploy.onnx_int8 import qdq_blockers

    if not qdq_blockers(model):
        return W8A8
    return ACT_QDQ if any(m.act_bits < 32 for m in quant_layers(model)) else FLOAT


def kinds_in(choices: Iterable[tuple[str, Sequence]]) -> tuple[str, ...]:
    """The kinds a space's candidates can deploy as, from its ``(name, values)`` choices: the float
    kind; ``act-qdq`` where some layer's ``act_bits`` may be below 32; ``w8a8`` where, besides, some
    layer's inputs may be 8-bit and its weights 8-bit (no job start times a reference it cannot use)."""
    values: dict[str, set] = {"act_bits": set(), "weight_bits": set()}
    for name, options in choices:
        values.get(name.partition(".")[0], set()).update(options)
    acts, weights = values["act_bits"], values["weight_bits"]
    if not any(a < 32 for a in acts):
        return (FLOAT,)
    return (FLOAT, ACT_QDQ, W8A8) if 8 in acts and 8 in weights else (FLOAT, ACT_QDQ)


def kind_reference(task: "Task", kind: str) -> "nn.Module":
    """``task``'s teacher deployed as ``kind``: itself, with 8-bit inputs to every layer, or at W8A8
    (calibrated as a candidate is: deterministic, so every process builds the same graph)."""
    from slimsearch.compress import apply_plan
    from slimsearch.spaces.plan import CompressionPlan, LayerPlan

    if kind == FLOAT:
        return task.teacher
    if kind not in GRAPH_KINDS:
        raise ConfigError(f"graph kind must be one of {list(GRAPH_KINDS)}, got {kind!r}")
    layer = LayerPlan(act_bits=8) if kind == ACT_QDQ else LayerPlan(weight_bits=8, act_bits=8)
    return apply_plan(task, CompressionPlan(layers={name: layer for name in task.plan_layers()}))


def kind_key(kind: str, metric: str) -> str:
    """The key of kind ``kind``'s reference figure of ``metric``: the metric itself for the float kind."""
    return metric if kind == FLOAT else f"{kind}:{metric}"


def kind_figures(figures: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``figures`` keyed by :func:`kind_key`, split by kind: ``{kind: {metric: value}}``.

    Raises:
        ConfigError: a key names a kind that is not one of :data:`GRAPH_KINDS`.
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in figures.items():
        kind, _, metric = key.rpartition(":")
        kind = kind or FLOAT
        if kind not in GRAPH_KINDS:
            raise ConfigError(f"reference: {key!r} names graph kind {kind!r}; allowed: {list(GRAPH_KINDS)}")
        out.setdefault(kind, {})[metric] = value
    return out
