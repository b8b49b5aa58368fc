"""Task names to task factories."""

from __future__ import annotations

import importlib
import sys
from typing import Optional

from slimsearch.exceptions import ConfigError
from slimsearch.tasks._base import Task

# Built-in task name -> the private module whose function of that name builds it
# (imported only when the task is loaded: the minilm one brings in transformers).
_BUILTIN_MODULES = {"mnist": "_image", "mnist-resnet": "_image", "digits": "_image", "minilm": "_minilm"}
BUILTIN_TASKS = tuple(_BUILTIN_MODULES)
# What each built-in task reports: its metric (Task.metric_name) first, then its extra
# metrics, so a job file's objectives can be checked without loading the task.
BUILTIN_METRICS = {
    "mnist": ("accuracy",),
    "mnist-resnet": ("accuracy",),
    "digits": ("accuracy",),
    "minilm": ("fidelity", "retrieval_at_1"),
}

# The larger batch each built-in task's latency is measured at, besides batch 1
# (Task.latency_batch), so that ``latency_ms_b<N>@local`` can be checked unloaded.
DEFAULT_LATENCY_BATCH = 64
BUILTIN_LATENCY_BATCH = {"minilm": 8}


def load_task(name: str, *, seed: int = 0, path: Optional[str] = None) -> Task:
    """Build the task a job names: a built-in name or ``package.module:function``.

    User code runs only through an explicit ``module:function``, imported from the
    folder ``path`` first (a job's ``task_path``: by default the job file's folder),
    then from the Python path. The function is called as ``function(seed=seed)``.
    """
    if name in _BUILTIN_MODULES:
        module = importlib.import_module(f"slimsearch.tasks.{_BUILTIN_MODULES[name]}")
        return getattr(module, name.replace("-", "_"))(seed=seed)
    if ":" in name:
        module_name, _, func_name = name.partition(":")
        if path is not None and path not in sys.path:
            sys.path.insert(0, path)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigError(f"task: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from exc
        factory = getattr(module, func_name, None)
        if not callable(factory):
            raise ConfigError(f"task: module {module_name!r} has no function {func_name!r}")
        task = factory(seed=seed)
        if not isinstance(task, Task):
            raise ConfigError(f"task: {name} returned {type(task).__name__}, expected slimsearch.tasks.Task")
        return task
    raise ConfigError(
        f"task: unknown task {name!r}; allowed: one of {list(BUILTIN_TASKS)} or 'package.module:function'"
    )
