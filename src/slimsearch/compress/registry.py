"""Compression methods, registered by config type (torchao's ``quantize_(model, config)``).

A method is a frozen config dataclass plus one apply function, registered once with
the step it runs at and how it reads its config off a :class:`CompressionPlan`.
:func:`~slimsearch.compress.apply.apply_plan` runs the configs a plan yields in step
order. Adding a method means adding its module (which calls :func:`register`), its
name in :data:`BUILT_IN` and its entry in the choice table
(:mod:`slimsearch.spaces.choices`); nothing else changes. A method acts on the tasks of the
families it registers for (the CNN-style ``quantize`` never touches a causal LM's linears;
``weight_only`` never a CNN's).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from slimsearch.exceptions import ConfigError
from slimsearch.metric_names import TaskFamily

if TYPE_CHECKING:
    from torch import nn

    from slimsearch.spaces.plan import CompressionPlan
    from slimsearch.tasks import Task

# The built-in method modules, imported (and so registered) on first use.
BUILT_IN = ("prune", "quantize", "sparsity", "lowrank", "calibrate", "distill", "fold_and_freeze", "llm_methods")


class Context(NamedTuple):
    """What an apply function may use besides the model and its config."""

    task: "Task"
    plan: "CompressionPlan"
    on_chunk: Optional[Callable[[int, "nn.Module"], bool]] = None  # early stopping of fine-tuning
    chunk_every: Optional[int] = None


@dataclass(frozen=True)
class Method:
    """A registered method: its config type, its step in the pipeline and its two functions."""

    name: str
    config_type: type
    order: int  # lower runs first
    from_plan: Callable[["CompressionPlan"], Optional[Any]]  # the plan's config for it, None when unused
    apply: Callable[["nn.Module", Any, Context], "nn.Module"]
    copies: bool = False  # apply returns a new model and leaves its input as it was
    families: tuple[TaskFamily, ...] = (TaskFamily.CLASSIFICATION,)  # the tasks it acts on


_METHODS: dict[type, Method] = {}
_loaded = False


def register(name: str, config_type: type, *, order: int,
             from_plan: Callable[["CompressionPlan"], Optional[Any]], copies: bool = False,
             families: tuple[TaskFamily, ...] = (TaskFamily.CLASSIFICATION,)) -> Callable:
    """Decorator: register ``apply(model, config, context) -> model`` for ``config_type``. An apply
    function may change the model it is given in place, unless ``copies``: it returns a new one.
    ``families``: the task families whose plans it reads (classification: images, encoders)."""
    if not (dataclasses.is_dataclass(config_type) and config_type.__dataclass_params__.frozen):
        raise TypeError(f"a method's config must be a frozen dataclass, got {config_type!r}")

    def decorate(apply: Callable) -> Callable:
        taken = [m.name for m in _METHODS.values() if m.name == name and m.config_type is not config_type]
        if taken:
            raise ValueError(f"compression method name {name!r} is registered already")
        _METHODS[config_type] = Method(name, config_type, order, from_plan, apply, copies,
                                       tuple(TaskFamily(f) for f in families))
        return apply

    return decorate


def methods(family: Optional[TaskFamily] = None) -> tuple[Method, ...]:
    """Every registered method (those of ``family`` when given), in the order the pipeline runs them."""
    global _loaded
    if not _loaded:
        for module in BUILT_IN:
            importlib.import_module(f"slimsearch.compress.{module}")
        _loaded = True
    return tuple(m for m in sorted(_METHODS.values(), key=lambda m: m.order)
                 if family is None or TaskFamily(family) in m.families)


def method_of(config: Any) -> Method:
    """The registered method of ``config`` (dispatch on its type)."""
    methods()
    method = _METHODS.get(type(config))
    if method is None:
        raise ConfigError(f"no compression method is registered for {type(config).__name__}; "
                          f"registered: {sorted(m.config_type.__name__ for m in _METHODS.values())}")
    return method


def apply_config(model: "nn.Module", config: Any, context: Context) -> "nn.Module":
    """Apply one method's config to ``model`` (which it may change in place) and return the result."""
    return method_of(config).apply(model, config, context)


def plan_configs(plan: "CompressionPlan", family: TaskFamily = TaskFamily.CLASSIFICATION) -> list[Any]:
    """The method configs a plan stands for on a task of ``family``, in pipeline order."""
    configs = [m.from_plan(plan) for m in methods(family)]
    return [c for c in configs if c is not None]


def config_to_json(config: Any) -> str:
    """``{"method": name, "config": fields}`` as JSON: how a config is stored and logged."""
    return json.dumps({"method": method_of(config).name, "config": dataclasses.asdict(config)}, sort_keys=True)


def config_from_json(text: str) -> Any:
    """Inverse of :func:`config_to_json`."""
    data = json.loads(text)
    by_name = {m.name: m for m in methods()}
    if data.get("method") not in by_name:
        raise ConfigError(f"unknown compression method {data.get('method')!r}; allowed: {sorted(by_name)}")
    config_type = by_name[data["method"]].config_type
    from_dict = getattr(config_type, "from_dict", None)
    try:
        return from_dict(data["config"]) if from_dict else config_type(**data["config"])
    except TypeError as exc:
        raise ConfigError(f"{data['method']} config: {exc}") from None
