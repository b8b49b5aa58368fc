"""A measurements CSV whose rows name a task and a plan, read into calibration samples."""

from __future__ import annotations

import os
from typing import Any

from slimsearch.hardware_profiles._measurements import Sample
from slimsearch.hardware_profiles._measurements import load_measurements as _load


def load_measurements(path: str | os.PathLike[str]) -> list[Sample]:
    """:func:`slimsearch.hardware_profiles.load_measurements`, with rows that name a task and a
    plan rebuilt by applying the plan to the task's teacher (each task loaded once)."""
    from slimsearch.compress import apply_plan
    from slimsearch.spaces import CompressionPlan
    from slimsearch.tasks import load_task

    tasks: dict[str, Any] = {}

    def rebuild(task_name: str, plan_json: str) -> tuple[Any, Any]:
        if task_name not in tasks:
            tasks[task_name] = load_task(task_name)
        return apply_plan(tasks[task_name], CompressionPlan.from_json(plan_json)), tasks[task_name].example_input

    return _load(path, rebuild=rebuild)
