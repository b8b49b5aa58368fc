"""The Task value: what is compressed and how it is scored."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Optional, Protocol, Sequence, Union

from slimsearch.metric_names import TaskFamily

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Split:
    """Inputs and labels of one data split, as tensors.

    ``extra`` holds whatever else a task's metrics need (e.g. the paragraphs that
    retrieval looks sentences up in).
    """

    x: "torch.Tensor"
    y: "torch.Tensor"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Preprocessing:
    """How raw inputs become model inputs: ``(raw * scale - mean) / std``."""

    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    scale: float
    mean: float
    std: float
    layout: str

    def to_dict(self) -> dict:
        return {
            "input_name": self.input_name,
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
            "scale": self.scale,
            "mean": self.mean,
            "std": self.std,
            "layout": self.layout,
        }


class Structure(Protocol):
    """How a family of models is pruned structurally (channels, heads, neurons, layers).

    The default, for traceable CNN-like models, is the channel dependency graph of
    :mod:`slimsearch.structures.channels`; transformer tasks bring their own.
    """

    def groups(self, model: "torch.nn.Module", example_input: "torch.Tensor") -> list[str]:
        """Names of the prunable groups (what ``prune_ratio.<name>`` refers to)."""

    def droppable(self, model: "torch.nn.Module") -> list[str]:
        """Names of the blocks or layers that can be removed whole (depth)."""

    def prune(self, model: "torch.nn.Module", example_input: "torch.Tensor", ratios: Mapping[str, float],
              *, drop: Sequence[str] = (), importance: str = "l1", batch=None) -> "torch.nn.Module":
        """A smaller copy of ``model``: ``ratios`` of each group removed, blocks in ``drop`` gone.

        ``batch`` (inputs, targets) is given when ``importance`` needs gradients ("taylor").
        """


@dataclass(frozen=True)
class Task:
    """A teacher, its data splits, a metric and an example input.

    Attributes:
        name: the task's name as a job file gives it.
        teacher: the trained model, in eval mode.
        train, val, test: data splits; validation chooses the front, test reports it.
        metric: ``metric(logits, labels) -> float``, better in ``family.direction`` (higher
            for classification, lower for a causal LM's perplexity).
        metric_name: the metric's name in Metrics, MLflow and plots.
        example_input: one batch-1 input.
        preprocessing: what an exported model expects of its input.
        teacher_sha256: hash of the teacher's weights file, so a changed teacher is noticed.
        extra_metrics: more metrics, ``name -> f(model, split) -> float``.
        distill_loss: ``f(student_out, teacher_out, labels, distill_plan) -> loss``;
            ``None`` means logit distillation with temperature (classification).
        structure: how the teacher is pruned; ``None`` means the channel graph.
        hidden_states: for hidden-state matching in distillation, ``f(model)`` -> a
            context manager yielding a dict that fills with the model's intermediate
            states (keys that mean the same layer in teacher and student) while the
            model runs inside it; ``distill_loss`` then gets ``hidden=``. ``None``: the
            task has none (``distill_hidden_weight`` must stay 0).
        latency_batch: the larger batch latency is measured at, besides batch 1
            (metric ``latency_ms_b<N>@local``); 1: none (a causal LM is timed per token).
        family: what kind of model it is (:class:`~slimsearch.metric_names.TaskFamily`):
            which way its metric points, how the gap to the teacher is named, which
            compression methods and choices apply and how its costs are counted.
        scorer: ``scorer(model, split, extras) -> {name: value}``: the task metric (and, with
            ``extras``, every extra metric) in one pass over ``split``, for tasks whose
            outputs are too large to gather (a causal LM's logits over its vocabulary);
            ``None``: ``metric`` on the gathered outputs and ``extra_metrics`` one by one.
        layers: the names a plan's per-layer choices are keyed by; ``None``: every Conv2d
            and Linear layer (a causal LM's are its linear groups, ``qkv``, ``o``, ...).
    """

    name: str
    teacher: "torch.nn.Module"
    train: Split
    val: Split
    test: Split
    metric: Callable[["torch.Tensor", "torch.Tensor"], float]
    metric_name: str
    example_input: "torch.Tensor"
    preprocessing: Preprocessing
    teacher_sha256: str = field(default="")
    extra_metrics: Mapping[str, Callable[["torch.nn.Module", Split], float]] = field(default_factory=dict)
    distill_loss: Optional[Callable[..., "torch.Tensor"]] = None
    structure: Optional[Structure] = None
    hidden_states: Optional[Callable[["torch.nn.Module"], ContextManager[Mapping]]] = None
    latency_batch: int = 64
    family: TaskFamily = TaskFamily.CLASSIFICATION
    scorer: Optional[Callable[["torch.nn.Module", Split, bool], Mapping[str, float]]] = None
    layers: Optional[tuple[str, ...]] = None

    def plan_layers(self) -> list[str]:
        """The names a plan's per-layer choices are keyed by: ``layers``, else :func:`layer_names` of the teacher."""
        return list(self.layers) if self.layers is not None else layer_names(self.teacher)


def layer_names(model) -> list[str]:
    """Names of the Conv2d/Linear layers of ``model``: the layers a plan sets bits for."""
    from torch import nn

    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# CPU task's teacher -> (that task, {device: the task on it}): one copy of the teacher and data per device and
# process, so that what is cached per teacher (its logits: compress.distill.teacher_logits) outlives a candidate
_ON_DEVICE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def task_on(task: Task, device: Union[str, "torch.device", None]) -> Task:
    """``task`` with its teacher, its data splits (tensors of ``extra`` too) and its example input on
    ``device``: ``task`` itself when they are there already, else a copy there (the task is not changed).

    The copy is made once per device and kept while ``task``'s teacher lives. A ``scorer`` or extra
    metric that compares with the teacher follows it there when it has ``on_teacher(teacher)``
    (returning its copy for that teacher). ``None`` is the CPU.
    """
    import torch

    from slimsearch._device import device_of, moved

    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device_of(task.teacher) == device and task.example_input.device == device:
        return task
    entry = _ON_DEVICE.get(task.teacher)
    if entry is None or entry[0] is not task:
        entry = (task, {})
        _ON_DEVICE[task.teacher] = entry
    cached = entry[1].get(str(device))
    if cached is not None:
        return cached
    teacher = moved(task.teacher, device).eval()

    def follow(fn):
        return fn.on_teacher(teacher) if hasattr(fn, "on_teacher") else fn

    placed = dataclasses.replace(
        task, teacher=teacher, train=_split_on(task.train, device), val=_split_on(task.val, device),
        test=_split_on(task.test, device), example_input=task.example_input.to(device),
        scorer=follow(task.scorer) if task.scorer is not None else None,
        extra_metrics={name: follow(fn) for name, fn in task.extra_metrics.items()})
    entry[1][str(device)] = placed
    _ON_DEVICE[teacher] = (placed, {str(device_of(task.teacher)): task})  # and back: the task itself
    return placed


def _split_on(split: Split, device: "torch.device") -> Split:
    import torch

    extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in split.extra.items()}
    return Split(x=split.x.to(device), y=split.y.to(device), extra=extra)


def accuracy(logits: "torch.Tensor", labels: "torch.Tensor") -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return float((logits.argmax(dim=1) == labels).float().mean().item())
