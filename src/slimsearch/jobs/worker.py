"""What runs in a worker for a job: its task (loaded once per process), its space, and one
candidate's evaluation or estimate."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Optional

from slimsearch.exceptions import ConfigError
from slimsearch.jobs.spec import JobSpec
from slimsearch.search._limits import memory_limit

from slimsearch.jobs.folder import MODELS_DIR, model_file
from slimsearch.jobs.rung import read_rung


def build_space(spec: JobSpec, task):
    """The job's space laid over the task's layers, as the task's family reads it
    (:func:`~slimsearch.spaces.space.fit_space`)."""
    from slimsearch.structures.channels import ChannelStructure
    from slimsearch.spaces import SearchSpace
    from slimsearch.spaces.space import fit_space

    if task.hidden_states is None and any(w > 0 for w in spec.space.distill_hidden_weight):
        raise ConfigError(f"space.distill_hidden_weight: task {spec.task!r} exposes no hidden states to match; "
                          "allowed: [0]")
    space = fit_space(spec.space, task.family)
    structure = task.structure or ChannelStructure()
    layers = task.plan_layers()
    if space.per_block:
        space, layers = _per_block(space, task)
    return SearchSpace.build(space, layers, structure.groups(task.teacher, task.example_input),
                             droppable=structure.droppable(task.teacher), seed=spec.search.seed,
                             power_modes=spec.power_mode_choices())


def _per_block(space, task):
    """``space`` with its per-layer overrides keyed per block (a group's override applies to that group in
    every block; a block's own key, ``"3.down"``, wins), and the per-block layer names."""
    from slimsearch.structures import llm

    names = llm.block_group_names(task.teacher)
    groups = tuple(task.layers or ())
    unknown = sorted(set(space.layers) - set(groups) - set(names))
    if unknown:
        raise ConfigError(f"space.layers: unknown layer {unknown[0]!r}; allowed: a linear group {list(groups)} "
                          f"(every block) or one block's, '<block>.<group>' ({names[0]!r} to {names[-1]!r})")
    layers = {n: space.layers[n.partition(".")[2]] for n in names if n.partition(".")[2] in space.layers}
    layers.update({n: own for n, own in space.layers.items() if n in names})
    return space.model_copy(update={"layers": layers}), list(names)


@functools.lru_cache(maxsize=2)
def cached_task(name: str, seed: int, path: Optional[str] = None, text=None):
    # Per-process cache: a reused Ray worker loads the task (and its data) once, not per trial.
    from slimsearch.tasks import load_task

    return load_task(name, seed=seed, path=path, text=text)


@functools.lru_cache(maxsize=2)
def cached_reference(name: str, seed: int, path: Optional[str], text, quiet: tuple[tuple[str, float], ...]):
    # Per-process cache, as cached_task: a reused Ray worker builds the teacher's ONNX session once.
    from slimsearch.evaluators.candidate import local_reference

    return local_reference(cached_task(name, seed, path, text), dict(quiet))


def job_screen(spec: JobSpec, task, rung=None):
    """The multi-fidelity screen of a causal-LM job (:class:`~slimsearch.evaluators.fidelity.Screen`)
    at its tightest ``ppl_increase <=`` bound, ranking cheap points on the job's objectives but the
    task's metric, after ``rung`` (what the job judged before: :func:`~slimsearch.jobs.rung.read_rung`),
    when ``search.multi_fidelity`` is on; None otherwise (another family, or no such bound to judge a
    cheap score against)."""
    from slimsearch.evaluators.fidelity import Rung, Screen
    from slimsearch.jobs.plan import ppl_increase_bound
    from slimsearch.metric_names import TaskFamily

    if not spec.search.multi_fidelity or task.family is not TaskFamily.CAUSAL_LM:
        return None
    bound = ppl_increase_bound(spec)
    objectives = tuple((name, direction.value) for name, direction in spec.objectives.items()
                       if name != task.metric_name)
    return None if bound is None else Screen(bound, objectives=objectives, rung=rung or Rung())


def evaluate_params(params: dict, *, job_json: str, space, teacher_score: float,
                    out: Optional[str] = None, devices=None, reference: Optional[dict] = None,
                    device: str = "cpu"):
    """Worker side: params -> plan -> compressed model -> Metrics (values and their provenance).

    The candidate is compressed, fine-tuned and scored on ``device`` (a torch device string the
    driver resolved: :class:`~slimsearch.jobs.resources.Resources`), then costed and timed on the CPU.

    With the job folder ``out``, the model's ONNX graph is left at :func:`model_file`;
    ``devices`` (profile -> meter on a device node) is passed to ``evaluate``. ``reference`` holds the
    teacher's quiet local latencies taken at the job's start (metric -> ms): the candidate's local
    latencies are then timed paired with the teacher, in this worker (see ``measure_local``).
    """
    from slimsearch.evaluators import evaluate

    spec = JobSpec.from_json(job_json)
    task = cached_task(spec.task, spec.search.seed, spec.task_path, spec.task_text)
    paired = None
    if reference:
        paired = cached_reference(spec.task, spec.search.seed, spec.task_path, spec.task_text,
                                  tuple(sorted(reference.items())))
    plan = space.plan_from_params(params)
    onnx_out = None
    if out is not None and os.path.isdir(Path(out) / MODELS_DIR):
        onnx_out = str(model_file(Path(out), plan))
    stopper = None
    if spec.search.early_stopping and out is not None:
        from slimsearch.jobs.early_stop import EarlyStop

        stopper = EarlyStop(Path(out), task, plan, spec.profile_refs, reference=paired, device=device)
    with memory_limit(spec.search.memory_limit_mb):  # after the task loads: its data and teacher are not counted
        metrics = evaluate(task, plan, spec.profile_refs, teacher_score=teacher_score, onnx_out=onnx_out,
                           devices=devices, on_chunk=stopper, chunk_every=None if stopper is None else stopper.every,
                           reference=paired, device=device, screen=job_screen(spec, task, read_rung(out, params)))
    if stopper is None:
        return metrics
    from slimsearch.evaluators.metrics import Metrics

    return Metrics(values={**metrics.values, **stopper.finish()}, provenance=metrics.provenance,
                   screened=metrics.screened)


def estimate_params(params: dict, *, task, space, profiles,
                    predicted: Optional[Callable[[dict], dict]] = None) -> dict[str, Optional[float]]:
    """Driver side, before training: the plan's exact size and modelled device costs (see
    :func:`slimsearch.evaluators.estimate.estimate`), for screening and the ``auto`` sampler, and
    what ``predicted`` (params -> metric -> value, e.g. the planner's perplexity) adds."""
    from slimsearch.evaluators.estimate import estimate

    values = dict(estimate(task, space.plan_from_params(params), profiles).values)
    return {**values, **predicted(params)} if predicted is not None else values
