"""evaluate(task, plan, profiles): one candidate, from its plan to a compressed model and its Metrics."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from slimsearch.compress import apply_plan
from slimsearch.evaluators.costs import task_costs
from slimsearch.evaluators.graph_kinds import FLOAT, graph_kind
from slimsearch.evaluators.metrics import Metrics
from slimsearch.metric_names import LOCAL_PROFILE, TaskFamily, local_latency_metrics, paired_latency_extras
from slimsearch.spaces.plan import CompressionPlan
from slimsearch.tasks import Split, Task, task_on

if TYPE_CHECKING:
    from slimsearch.hardware_profiles._measure import PairedTiming

LOCAL = LOCAL_PROFILE
ENERGY_AUTO = "auto"  # measure_local's default: use the CPU energy meter this machine has, if any
ENERGY_MIN_TIME_S = 0.5  # RAPL counters tick about once a millisecond: count over long enough


def score(model: nn.Module, data: Split, task: Task, batch_size: int = 500) -> float:
    """The task metric of ``model`` on ``data``."""
    if task.scorer is not None:
        return task.scorer(model, data, False)[task.metric_name]
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(data.x[i : i + batch_size]) for i in range(0, len(data), batch_size)])
    return task.metric(logits, data.y)


def task_scores(model: nn.Module, data: Split, task: Task) -> dict[str, float]:
    """The task metric and every extra metric of ``model`` on ``data`` (one pass with a ``Task.scorer``)."""
    if task.scorer is not None:
        return dict(task.scorer(model, data, True))
    return {task.metric_name: score(model, data, task),
            **{name: metric(model, data) for name, metric in task.extra_metrics.items()}}


@dataclass(frozen=True)
class LocalReference:
    """The teacher, ready to be timed in the rounds a candidate's local latency is paired with.

    ``quiet_ms`` holds the teacher's local latencies by metric name (``latency_ms@local``,
    ``latency_ms_b<N>@local``), taken once in a quiet moment (a job's start, before its workers
    train): the plain-value part, recorded with the job. ``runs`` holds, by the same names,
    functions that run the teacher's deployable ONNX graph on the input that metric times.
    ``fastest_ms`` holds, by the same names, the fastest the teacher has run in this process's
    paired rounds so far (filled in by :func:`measure_local`): the quiet figure a later
    measurement in this process is judged against (``measure_paired``'s ``quiet_reference_ms``).
    Not ``quiet_ms``: one process can run the same graph 10% faster or slower than another (the
    driver's figure against a worker's, seen here), which would read as load in every round.

    ``kinds`` holds the quiet figures of the teacher deployed as the other graph kinds
    (:mod:`~slimsearch.evaluators.graph_kinds`), by kind then metric; :meth:`for_kind` gives the
    reference a candidate of that kind is paired with, built on first use with ``build(kind)``
    (a kind without figures is paired with the teacher itself).
    Build one with :func:`local_reference`.
    """

    quiet_ms: Mapping[str, float]
    runs: Mapping[str, Callable[[], object]]
    fastest_ms: dict[str, float] = field(default_factory=dict)
    kind: str = FLOAT
    kinds: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    build: Callable[[str], Mapping[str, Callable[[], object]]] | None = None
    _built: dict[str, "LocalReference"] = field(default_factory=dict, repr=False)

    def for_kind(self, kind: str) -> "LocalReference":
        """The reference of graph kind ``kind``: this one where it is that kind or has no figures of it."""
        if kind == self.kind or kind not in self.kinds or self.build is None:
            return self
        reference = self._built.get(kind)
        if reference is None:
            reference = self._built[kind] = LocalReference(quiet_ms=self.kinds[kind], runs=self.build(kind), kind=kind)
        return reference


def _timed_inputs(task: Task) -> dict[str, Any]:
    """The input each local latency metric times: the first validation example, repeated to its batch."""
    x = task.val.x
    return {name: x[:1].repeat(batch, *[1] * (x.dim() - 1)).cpu().numpy()
            for name, batch in zip(local_latency_metrics(task.latency_batch), (1, task.latency_batch))}


def _onnx_runs(model: nn.Module, task: Task) -> dict[str, Callable[[], object]]:
    """By local latency metric, a function running ``model``'s deployable ONNX graph on the input it times.

    The session's pool threads do not spin between calls: paired rounds alternate two sessions in one
    process, and an idle session's spinning threads took the cores the running one needed (with 2
    threads on a 2-vCPU machine, 35 of 40 paired measurements of an MNIST plan had rounds disagreeing
    by over 10%, against 4 of 40 without spinning: ``benchmarks/paired_probe.py --threads 2 [--spin]``).
    A worker of one thread has no pool, and its figures are as before."""
    from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes
    from slimsearch.deploy.onnx_graph import INPUT_NAME, ort_session

    session = ort_session(deployable_onnx_bytes(model, task.example_input), spin=False)
    return {name: functools.partial(session.run, None, {INPUT_NAME: x}) for name, x in _timed_inputs(task).items()}


def local_reference(task: Task, quiet_ms: Mapping[str, float]):
    """The :class:`LocalReference` of ``task``'s teacher, whose quiet local latencies are ``quiet_ms``
    (the teacher's :func:`measure_local` figures, taken when nothing else ran, and those of its other
    graph kinds keyed by :func:`~slimsearch.evaluators.graph_kinds.kind_key`: :func:`quiet_local_latencies`).
    For a causal LM, a :class:`~slimsearch.evaluators.decoder.DecoderReference` (its graph and quiet
    decode figures), or None where its architecture has no deployed graph.

    Raises:
        ConfigError: ``quiet_ms`` lacks one of the task's local latency metrics (for the float kind, or for
            another kind it has figures of), holds one that is not > 0, or names an unknown kind.
    """
    from slimsearch.evaluators.graph_kinds import kind_figures, kind_reference
    from slimsearch.exceptions import ConfigError

    if task.family is TaskFamily.CAUSAL_LM:
        from slimsearch.evaluators.decoder import decoder_reference

        return decoder_reference(task.teacher, quiet_ms)

    by_kind = kind_figures(quiet_ms)
    quiet: dict[str, dict[str, float]] = {}
    for kind, figures in {FLOAT: {}, **by_kind}.items():
        quiet[kind] = {}
        for name in local_latency_metrics(task.latency_batch):
            value = figures.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                what = "teacher's" if kind == FLOAT else f"{kind} reference's"
                raise ConfigError(f"reference: the {what} quiet {name} must be a number of ms > 0, got {value!r}")
            quiet[kind][name] = float(value)
    return LocalReference(quiet_ms=quiet.pop(FLOAT), runs=_onnx_runs(task.teacher, task), kinds=quiet,
                          build=lambda kind: _onnx_runs(kind_reference(task, kind), task))


def paired_figures(name: str, timing: PairedTiming, quiet_ms: float) -> dict[str, float]:
    """The metrics of local latency ``name`` timed paired with the teacher: ``name`` itself, the
    median per-round ratio times the teacher's quiet ``quiet_ms``; beside it the raw median, the
    coefficient of variation of the ratios and the noisy flag (:func:`paired_latency_extras`)."""
    raw, cv, noisy = paired_latency_extras(name)
    return {name: timing.scaled(quiet_ms), raw: timing.candidate_ms, cv: timing.cv, noisy: float(timing.noisy)}


def quiet_local_latencies(task: Task, kinds: Sequence[str] = (FLOAT,)) -> dict[str, float]:
    """The local latencies of the teacher deployed as each graph kind of ``kinds``, keyed by
    :func:`~slimsearch.evaluators.graph_kinds.kind_key` (the float kind's by metric name), each the
    fastest of timings spread over a few seconds (:func:`~slimsearch.hardware_profiles._measure.measure_quiet`):
    the references a job's paired measurements are scaled to, taken at its start. Empty for a causal LM
    (paired with its own decode figures)."""
    from slimsearch.evaluators.graph_kinds import kind_key, kind_reference
    from slimsearch.hardware_profiles._measure import measure_quiet

    if task.family is TaskFamily.CAUSAL_LM:
        return {}
    return {kind_key(kind, name): timing.median_ms for kind in kinds
            for name, timing in measure_quiet(_onnx_runs(kind_reference(task, kind), task)).items()}


def measure_local(model: nn.Module, task: Task, *, repeats: int = 15, energy=None,
                  reference: LocalReference | None = None) -> dict[str, float]:
    """Latency of the deployable ONNX graph on this CPU at batch 1 and ``task.latency_batch``, in ms
    (measured), and its energy per batch-1 inference in mJ where this machine exposes energy counters.

    Without ``reference``, each latency is the median of ``repeats`` calls. With it (a job's
    candidates, and ``export``), each is timed in alternating short rounds with the teacher
    (:func:`~slimsearch.hardware_profiles._measure.measure_paired`) and recorded as the median of
    the per-round ratios times the teacher's quiet latency, so that load from other workers
    cancels out (the teacher deployed as the same kind of graph where ``reference`` has its figures:
    :meth:`LocalReference.for_kind`); the raw median, the ratios' coefficient of variation and a noisy flag are
    recorded beside it (:func:`paired_figures`).

    ``energy`` is an :class:`~slimsearch.hardware_profiles._energy.EnergyMeter`, None (the
    default) for no energy figure, or ``"auto"`` for whatever :func:`energy_meter` finds
    for the CPU (what :func:`model_metrics` asks for).
    The counters cover the whole CPU package, so ``energy_mj@local`` includes whatever
    else ran on it meanwhile (other trials, other programs).

    A causal LM is timed per generated token instead, its deployed graph with its KV cache in a fresh
    process (:func:`~slimsearch.evaluators.decoder.measure_decoder`; PyTorch where the graph builder
    does not take the architecture); ``reference`` is then a
    :class:`~slimsearch.evaluators.decoder.DecoderReference` (rounds alternate with the teacher's graph).
    """
    from slimsearch.hardware_profiles._energy import EnergyDomain, energy_meter
    from slimsearch.hardware_profiles._measure import measure_latency, measure_paired

    meter = energy_meter(EnergyDomain.CPU) if energy == ENERGY_AUTO else energy
    if task.family is TaskFamily.CAUSAL_LM:
        from slimsearch.evaluators.decoder import measure_decoder

        return measure_decoder(model, task, energy=meter, reference=reference)
    out: dict[str, float] = {}
    if reference is not None:
        reference = reference.for_kind(graph_kind(model))
    for name, run in _onnx_runs(model, task).items():
        if reference is None:
            out[name] = measure_latency(run, warmup=3, repeats=repeats).median_ms
        else:
            timing = measure_paired(run, reference.runs[name], quiet_reference_ms=reference.fastest_ms.get(name))
            reference.fastest_ms[name] = min(timing.reference_ms, reference.fastest_ms.get(name, math.inf))
            out.update(paired_figures(name, timing, reference.quiet_ms[name]))
        if name == f"latency_ms@{LOCAL}" and meter is not None:
            reading = meter.measure(run, warmup=1, repeats=repeats, min_time_s=ENERGY_MIN_TIME_S)
            out[f"energy_mj@{LOCAL}"] = reading.mj_per_call
    return out


def model_metrics(model: nn.Module, task: Task, profiles: Sequence[Any], *, repeats: int = 15,
                  power_modes: Mapping[str, str] | None = None, energy=ENERGY_AUTO,
                  devices: Mapping[str, Callable[[bytes, Any], float]] | None = None,
                  reference: LocalReference | None = None, device: Any = None) -> Metrics:
    """Accuracy on validation, size, MACs and BitOps, measured local latency (and energy where this
    machine can count it), modelled device costs.

    The task metric is computed on ``device`` (default: where ``model`` is; ``task``'s teacher is
    scored as the task's teacher on that device, :func:`~slimsearch.tasks.task_on`), everything
    else on the CPU, on a CPU copy of ``model`` if it is elsewhere (``model`` is not moved).

    ``profiles`` are what :func:`~slimsearch.hardware_profiles.load_profile` takes (names,
    profile files, profiles); each one's metrics carry its profile's name.
    ``power_modes`` maps a profile name to the power mode its figures are modelled at; a
    profile it leaves out is modelled at its default mode. The metric names do not
    carry the mode (``energy_mj@jetson-orin-nano`` at every mode): the plan records it.
    ``energy`` and ``reference`` (the teacher, to pair local latencies with) are passed to :func:`measure_local`.
    ``devices`` maps a profile name to a function that times the deployable ONNX graph at
    batch 1 on that very device and returns the median ms (a Ray node carrying
    ``device:<profile>``, :class:`slimsearch.cluster.DeviceMeter`): that profile's
    ``latency_ms`` is then measured, its energy and cost stay modelled.
    """
    from slimsearch._device import device_of, moved, resolve_device

    work = task_on(task, device_of(model) if device is None else resolve_device(device))
    host = task_on(task, "cpu")
    teacher = model is task.teacher or model is work.teacher or model is host.teacher
    scored = work.teacher if teacher else moved(model, device_of(work.teacher))
    values: dict[str, float | None] = dict(task_scores(scored, work.val, work))
    costs = _costs(host.teacher if teacher else moved(model, "cpu"), host, profiles, repeats=repeats,
                   power_modes=power_modes, energy=energy, devices=devices, reference=reference)
    values.update(costs.values)
    return Metrics(values=values, provenance=costs.provenance)


def _costs(model: nn.Module, task: Task, profiles: Sequence[Any], *, repeats: int = 15,
           power_modes: Mapping[str, str] | None = None, energy=ENERGY_AUTO,
           devices: Mapping[str, Callable[[bytes, Any], float]] | None = None,
           reference: LocalReference | None = None) -> Metrics:
    """:func:`model_metrics` but the task metric, of a model and a task on the CPU."""
    timers = None
    if devices and task.family is TaskFamily.CAUSAL_LM:
        timers = dict(devices)  # refused by task_costs: a causal LM has no single ONNX graph to time there
    elif devices:
        from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes

        graph, x = deployable_onnx_bytes(model, task.example_input), task.val.x[:1].cpu().numpy()
        timers = {name: functools.partial(measure, graph, x) for name, measure in devices.items()}
    return task_costs(model, task, profiles, power_modes, timers=timers,
                      measured=measure_local(model, task, repeats=repeats, energy=energy, reference=reference))


def evaluate(task: Task, plan: CompressionPlan, profiles: Sequence[str], *, teacher_score: float | None = None,
             onnx_out: str | None = None, devices: Mapping[str, Callable[[bytes, Any], float]] | None = None,
             on_chunk: Callable[[int, nn.Module], bool] | None = None, chunk_every: int | None = None,
             reference: LocalReference | None = None, device: Any = None, screen: Any = None) -> Metrics:
    """Compress the teacher as ``plan`` says and score the result (validation chooses, test reports).

    The candidate is compressed, fine-tuned and scored on ``device`` (``"cpu"``, ``"cuda"``,
    ``"cuda:N"``, ``"auto"``; default: where ``task`` is), with the task's teacher and data there
    (:func:`~slimsearch.tasks.task_on`); then it moves to the CPU, where its deployable graph is
    written, costed and timed.
    With ``onnx_out``, the model's deployable ONNX graph is also written to that path
    (atomically), so a job can keep the models of its front without rebuilding them (not for a
    causal LM, whose deployable form is a folder: :mod:`slimsearch.deploy.hf_folder`).
    The gap to ``teacher_score`` is named and measured as the task's family says
    (``accuracy_drop``, ``ppl_increase``: :class:`~slimsearch.metric_names.TaskFamily`).
    ``devices`` and ``reference`` are passed to :func:`model_metrics`; ``on_chunk`` and ``chunk_every``
    to :func:`apply_plan`. ``screen`` (a causal LM's :class:`~slimsearch.evaluators.fidelity.Screen`)
    first scores the candidate on a share of the validation text and ranks it with its untimed
    costs: one it does not promote comes back with those figures, marked ``screened``.
    """
    from slimsearch._device import resolve_device

    work = task if device is None else task_on(task, resolve_device(device))
    host = task_on(task, "cpu")
    model = apply_plan(work, plan, on_chunk=on_chunk, chunk_every=chunk_every)
    cheap: dict[str, float] = {}
    if screen is not None and task.family is TaskFamily.CAUSAL_LM:
        from slimsearch.evaluators.fidelity import FIDELITY

        costs = task_costs(model, host, profiles, plan.power_modes)  # exact or modelled: nothing timed
        cheap, reason = screen.judge(model, work, costs.values)
        if reason is not None:
            return Metrics(values={**cheap, **costs.values}, provenance=costs.provenance, screened=reason)
        cheap[FIDELITY] = 1.0
    values: dict[str, float | None] = {**cheap, **task_scores(model, work.val, work)}
    # Recorded for every candidate, used by nothing that chooses: validation chooses
    # the front, test reports it (and export checks the exported file against it).
    values[f"{task.metric_name}_test"] = score(model, work.test, work)
    model = model.to("cpu")  # the candidate is this call's own: moved, not copied
    if onnx_out is not None and task.family is not TaskFamily.CAUSAL_LM:
        from slimsearch._io import atomic_write
        from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes

        atomic_write(onnx_out, deployable_onnx_bytes(model, host.example_input))
    costs = _costs(model, host, profiles, power_modes=plan.power_modes, devices=devices, reference=reference)
    values.update(costs.values)
    if teacher_score is not None:
        values[task.family.gap_name(task.metric_name)] = task.family.gap(values[task.metric_name], teacher_score)
    return Metrics(values=values, provenance=costs.provenance)
