"""Uniform recipes evaluated once in a causal-LM job, beside its front, as reference runs.

A user comparing a searched front with what a standard tool gives in one command wants the
standard recipes measured on the same text, the same machine and the same metrics. For a
causal LM those are, every decoder linear alike, groups of 128 (symmetric):

- ``rtn-w4g128``, ``gptq-w4g128``, ``awq-w4g128``: 4-bit weight-only, by each rounding method;
- ``rtn-w8g128``: 8-bit weight-only;
- ``w8a8-smoothquant``: SmoothQuant (alpha 0.5), 8-bit per-channel weights and int8 inputs per token.

The output projection (and a tied embedding) stays in float, as llm-compressor's W4A16 and W8A8
schemes leave ``lm_head``; a job may still search it (``head_bits``). A profile whose power mode
the job searches models them at the teacher's mode (``JobSpec.teacher_power_modes``).

They are not trials: the sampler does not see them and they are not on the front. Each is
evaluated as a candidate is (the job's profiles, its teacher) after the search, logged to MLflow
as a child run tagged ``baseline``, and kept in the job folder's ``baselines.json``, so a
resumed job evaluates only those it lacks. ``front.json`` lists them under ``baselines`` and the
front plots draw them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from slimsearch.spaces.plan import CompressionPlan, LayerPlan

if TYPE_CHECKING:
    from slimsearch.tasks import Task

__all__ = ["BASELINES_FILE", "baseline_plans", "load_baselines", "run_baselines"]

BASELINES_FILE = "baselines.json"
GROUP = 128


def baseline_plans(layers: Sequence[str],
                   power_modes: Optional[Mapping[str, str]] = None) -> dict[str, CompressionPlan]:
    """The uniform recipes over the linear groups ``layers`` (a causal-LM task's ``layers``), by name,
    modelled at ``power_modes`` (profile -> mode; a profile not named at its default)."""
    def weights(bits: int, method: str, group: int = GROUP, act_bits: int = 32) -> CompressionPlan:
        layer = LayerPlan(weight_bits=bits, group_size=group, act_bits=act_bits)
        return CompressionPlan(layers={g: layer for g in layers}, weight_method=method,
                               power_modes=dict(power_modes or {}))

    return {
        **{f"{method}-w4g{GROUP}": weights(4, method) for method in ("rtn", "gptq", "awq")},
        f"rtn-w8g{GROUP}": weights(8, "rtn"),
        "w8a8-smoothquant": weights(8, "rtn", group=0, act_bits=8),
    }


def load_baselines(folder: Path) -> list[dict]:
    """The baselines recorded in job folder ``folder`` (none when it has no ``baselines.json``)."""
    path = Path(folder) / BASELINES_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def run_baselines(task: "Task", profiles: Sequence[Any], folder: Path, *, teacher_score: float,
                  log: Callable[[str], None] = print, tracker=None, device: Any = None,
                  evaluate: Optional[Callable[..., Any]] = None,
                  reference: Optional[Mapping[str, float]] = None,
                  power_modes: Optional[Mapping[str, str]] = None) -> list[dict]:
    """Evaluate every recipe of :func:`baseline_plans` that ``folder``'s ``baselines.json`` lacks
    (an entry whose plan changed counts as lacking), log each to ``tracker`` (an MLflow
    :class:`~slimsearch.storage.tracking.Tracker`, when given) and write the file after each;
    return every entry, in recipe order. ``evaluate`` defaults to
    :func:`slimsearch.evaluators.evaluate`, which runs them on ``device`` (as the job's candidates).
    ``reference``: the teacher's quiet local figures the job's candidates were timed against
    (``local_reference_figures``); the baselines are then timed paired with the teacher the same way.
    ``power_modes``: the modes the profiles are modelled at (:func:`baseline_plans`).
    An entry: ``name``, ``plan``, ``metrics``, ``provenance``, ``seconds``, ``run_id``.
    """
    from slimsearch._io import atomic_write
    from slimsearch.evaluators.metrics import provenance_map

    if evaluate is None:
        from slimsearch.evaluators import evaluate
    path = Path(folder) / BASELINES_FILE
    done = {b["name"]: b for b in load_baselines(folder)}
    entries: list[dict] = []
    paired = None
    for name, plan in baseline_plans(task.layers or (), power_modes).items():
        entry = done.get(name)
        if entry is None or entry["plan"] != plan.to_dict():
            log(f"[slimsearch] baseline {name}: evaluating (a uniform recipe, for reference)")
            started = time.perf_counter()
            try:
                if reference and paired is None:
                    from slimsearch.evaluators.candidate import local_reference

                    paired = local_reference(task, reference)
                metrics = evaluate(task, plan, profiles, teacher_score=teacher_score, device=device,
                                   reference=paired)
            except Exception as exc:  # noqa: BLE001 - a reference that cannot be built does not end the job
                log(f"[slimsearch] baseline {name} failed: {type(exc).__name__}: {exc}")
                continue
            entry = {"name": name, "plan": plan.to_dict(), "metrics": dict(metrics.values),
                     "provenance": provenance_map(metrics.values, metrics.provenance),
                     "seconds": time.perf_counter() - started, "run_id": None}
        if tracker is not None and entry["run_id"] is None:
            entry["run_id"] = tracker.log_baseline(name, entry["metrics"], entry["provenance"],
                                                   json.dumps(entry["plan"], sort_keys=True))
        entries.append(entry)
        done[name] = entry
        atomic_write(path, json.dumps(list(done.values()), indent=1))
    return entries
