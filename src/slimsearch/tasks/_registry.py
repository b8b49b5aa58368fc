"""Task names to task factories."""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence, Union

from slimsearch.exceptions import ConfigError
from slimsearch.metric_names import TaskFamily
from slimsearch.tasks._base import Task

# Built-in task name -> the private module whose function of that name builds it
# (imported only when the task is loaded: the minilm one brings in transformers).
_BUILTIN_MODULES = {"mnist": "_image", "mnist-resnet": "_image", "digits": "_image", "minilm": "_minilm",
                    "smollm2": "_causal_lm_task"}
BUILTIN_TASKS = tuple(_BUILTIN_MODULES)
# ``causal-lm:<path>``: a user's decoder LLM, a Hugging Face folder or a GGUF file.
CAUSAL_LM_PREFIX = "causal-lm:"
# What a causal-lm task reports: perplexity, KL to the teacher, top-1 agreement with it.
CAUSAL_LM_METRICS = ("ppl", "kl", "top1")
# What each built-in task reports: its metric (Task.metric_name) first, then its extra
# metrics, so a job file's objectives can be checked without loading the task.
BUILTIN_METRICS = {
    "mnist": ("accuracy",),
    "mnist-resnet": ("accuracy",),
    "digits": ("accuracy",),
    "minilm": ("fidelity", "retrieval_at_1"),
    "smollm2": CAUSAL_LM_METRICS,
}
BUILTIN_FAMILIES = {"smollm2": TaskFamily.CAUSAL_LM}  # the others are classification

# The larger batch each built-in task's latency is measured at, besides batch 1
# (Task.latency_batch), so that ``latency_ms_b<N>@local`` can be checked unloaded.
DEFAULT_LATENCY_BATCH = 64
BUILTIN_LATENCY_BATCH = {"minilm": 8, "smollm2": 1}


def is_causal_lm(name: str) -> bool:
    """Whether a job's task string names a user's causal LM (``causal-lm:<path>``)."""
    return name.startswith(CAUSAL_LM_PREFIX)


def task_family(name: str) -> Optional[TaskFamily]:
    """The family of the task a job names, known before it loads; None for ``package.module:function``
    (the task it returns says)."""
    if is_causal_lm(name):
        return TaskFamily.CAUSAL_LM
    if name in _BUILTIN_MODULES:
        return BUILTIN_FAMILIES.get(name, TaskFamily.CLASSIFICATION)
    return None


def task_metrics(name: str) -> Optional[tuple[str, ...]]:
    """The metrics the task a job names reports (its own metric first), known before it loads;
    None for ``package.module:function``."""
    return CAUSAL_LM_METRICS if is_causal_lm(name) else BUILTIN_METRICS.get(name)


def task_latency_batch(name: str) -> int:
    """The larger batch the task's latency is measured at (1: only batch 1), known before it loads."""
    return 1 if is_causal_lm(name) else BUILTIN_LATENCY_BATCH.get(name, DEFAULT_LATENCY_BATCH)


def causal_lm_source(name: str) -> str:
    """Where the model of causal-lm task ``name`` comes from: its folder or GGUF file.

    Raises:
        ConfigError: ``name`` is not a causal-lm task.
    """
    if is_causal_lm(name):
        return name[len(CAUSAL_LM_PREFIX):]
    if name == "smollm2":
        from slimsearch.tasks.causal_lm import smollm2_folder

        return str(smollm2_folder())
    raise ConfigError(f"task {name!r} is not a causal LM; allowed: smollm2 or '{CAUSAL_LM_PREFIX}<path>'")


def load_task(name: str, *, seed: int = 0, path: Optional[str] = None,
              text: Union[str, Sequence[str], None] = None) -> Task:
    """Build the task a job names: a built-in name, ``causal-lm:<path>`` or ``package.module:function``.

    User code runs only through an explicit ``module:function``, imported from the
    folder ``path`` first (a job's ``task_path``: by default the job file's folder),
    then from the Python path. The function is called as ``function(seed=seed)``.
    ``text`` is the text a causal-lm task reads (a built-in corpus name or text files;
    None: Wikipedia); other tasks take none.
    """
    family = task_family(name)
    if text is not None and family is not TaskFamily.CAUSAL_LM:
        raise ConfigError(f"text: task {name!r} reads no text files; allowed: text only with a causal-lm task "
                          f"(smollm2 or '{CAUSAL_LM_PREFIX}<path>')")
    if is_causal_lm(name):
        from slimsearch.tasks._causal_lm_task import causal_lm

        return causal_lm(name[len(CAUSAL_LM_PREFIX):], text=text, seed=seed)
    if name in _BUILTIN_MODULES:
        module = importlib.import_module(f"slimsearch.tasks.{_BUILTIN_MODULES[name]}")
        builder = getattr(module, name.replace("-", "_"))
        return builder(seed=seed, text=text) if family is TaskFamily.CAUSAL_LM else builder(seed=seed)
    if ":" in name:
        module_name, _, func_name = name.partition(":")
        where = f"from {path} or the Python path" if path else "from the Python path"
        if path is not None and path not in sys.path:
            sys.path.insert(0, path)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            detail = " ".join(str(exc).split())
            raise ConfigError(f"task: {name}: cannot import module {module_name!r} ({type(exc).__name__}: {detail}); "
                              f"allowed: 'package.module:function' with the module importable {where}") from exc
        factory = getattr(module, func_name, None)
        if not callable(factory):
            found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            raise ConfigError(f"task: {name}: module {module_name!r} has no function {func_name!r}; "
                              f"allowed: one of its functions {found}")
        try:
            task = factory(seed=seed)
        except Exception as exc:  # user code: one line here; calling it directly shows the traceback
            detail = " ".join(str(exc).split())
            raise ConfigError(f"task: {name}(seed={seed}) raised {type(exc).__name__}: {detail}; it must return a "
                              f"slimsearch.tasks.Task (python -c 'import {module_name}; "
                              f"{module_name}.{func_name}(seed={seed})' shows the traceback)") from exc
        if not isinstance(task, Task):
            raise ConfigError(f"task: {name} returned {type(task).__name__}, expected slimsearch.tasks.Task")
        if not task.teacher_sha256:  # so a resumed job notices a changed teacher, as for built-in tasks
            import dataclasses

            task = dataclasses.replace(task, teacher_sha256=_weights_sha256(task.teacher))
        return task
    raise ConfigError(
        f"task: unknown task {name!r}; allowed: one of {list(BUILTIN_TASKS)}, '{CAUSAL_LM_PREFIX}<folder or "
        f".gguf file>' or 'package.module:function'"
    )


def _weights_sha256(model) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes, values), in order."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(-1).view(torch.uint8).detach().cpu().numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
