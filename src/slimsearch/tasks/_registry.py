"""Task names to task factories."""

from __future__ import annotations

import importlib

from slimsearch.exceptions import ConfigError
from slimsearch.tasks._base import Task

BUILTIN_TASKS = ("mnist", "digits")


def load_task(name: str, *, seed: int = 0) -> Task:
    """Build the task a job names: a built-in name or ``package.module:function``.

    User code runs only through an explicit ``module:function``.
    """
    from slimsearch.tasks import _image

    if name in BUILTIN_TASKS:
        return getattr(_image, name)(seed=seed)
    if ":" in name:
        module_name, _, func_name = name.partition(":")
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
