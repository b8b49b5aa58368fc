"""What is compressed: built-in tasks and the loader for a user's own.

A job names a task by a built-in name (``mnist``, ``digits``, ``smollm2``), as
``causal-lm:<folder or .gguf file>`` (a user's decoder LLM) or as
``package.module:function`` returning a :class:`Task`.
"""

from __future__ import annotations

from slimsearch.tasks._base import Preprocessing, Split, Structure, Task, accuracy, layer_names, task_on
from slimsearch.tasks._registry import BUILTIN_TASKS, load_task

__all__ = ["BUILTIN_TASKS", "Preprocessing", "Split", "Structure", "Task", "accuracy", "layer_names", "load_task",
           "task_on"]
