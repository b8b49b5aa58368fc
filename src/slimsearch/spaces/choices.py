"""Every searchable choice, declared once: its type, allowed values, defaults and where it lands.

The job file's ``space`` schema, the search space's parameters and the plan's fields
(and their checks) are all derived from :data:`CHOICES`. A new compression method
adds its choice here and nowhere else in this package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from enum import Enum
from typing import Any, Callable, Mapping, NamedTuple, Optional

from slimsearch.exceptions import ConfigError
from slimsearch.metric_names import TaskFamily

FULL_PRECISION = 32
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)
ACT_BITS = (8, 16, 32)  # 16-bit activations export as opset-21 uint16 QDQ
SPARSITY_PATTERNS = ("unstructured", "2:4")
ACT_CALIBRATIONS = ("minmax", "percentile", "mse")
IMPORTANCES = ("l1", "l2", "taylor")
# Decoder LLMs (causal-lm tasks): how weights are rounded, and the precisions of a KV cache
# (32: float32 as the model computes it; 16: float16; 8, 4: codes with a scale per token and head).
WEIGHT_METHODS = ("rtn", "gptq", "awq")
KV_BITS = (4, 8, 16, 32)
HEAD_BITS = (4, 8, FULL_PRECISION)  # the output projection (and a tied embedding): codes in blocks of 64, or float
LLM_WEIGHT_BITS = (2, 3, 4, 8, FULL_PRECISION)  # the widths weight-only quantization of an LLM writes
LLM_GROUP_SIZES = (0, 32, 64, 128)
CLASSIFICATION, CAUSAL_LM = TaskFamily.CLASSIFICATION, TaskFamily.CAUSAL_LM
BOTH = (CLASSIFICATION, CAUSAL_LM)


class Scope(str, Enum):
    """Where a choice is made and where its value lands."""

    LAYER = "layer"  # per layer: parameter ``<name>.<layer>``, field ``LayerPlan.<name>``
    GROUP = "group"  # per prunable group: parameter ``<name>.<group>``, field ``LayerPlan.<name>``
    EVERY_LAYER = "every_layer"  # one model-wide parameter ``<name>``, copied into every ``LayerPlan``
    PLAN = "plan"  # one model-wide parameter ``<name>``, field ``CompressionPlan.<name>``
    DISTILL = "distill"  # one model-wide parameter ``distill_<field>``, field ``DistillPlan.<field>``
    BLOCK = "block"  # per droppable block: parameter ``drop.<block>`` (true drops it)


def _number(value: Any) -> bool:
    """A finite int or float (not a bool); an int too large for a float is not one."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class FamilyValues(NamedTuple):
    """How a task family narrows a choice: the values it allows (None: all the choice allows) and
    the job file's default list of values for it."""

    allowed: Optional[tuple]
    space_default: tuple


@dataclass(frozen=True)
class Choice:
    """One searchable choice.

    Attributes:
        name: its key in the job file's ``space`` (and per-layer overrides), and the
            stem of its search parameter's name.
        kind: the Python type of one value.
        default: the plan's value where nothing is chosen: it leaves the model as it is.
        space_default: the job file's default list of values to search.
        scope: where it is chosen and where its value lands.
        allowed: the allowed values, in words (as a job file's list of them).
        ok: whether one value is allowed.
        per_layer: may be overridden per layer in ``space.layers``.
        listed: with one value it is a search parameter all the same (the choices that
            have always been); any other choice with one value is fixed, not searched.
        families: the task families whose methods read it; a job of another family must
            leave it at its default (:func:`slimsearch.spaces.space.fit_space`).
        narrow: per family, the values it allows and its default list, where they differ.
    """

    name: str
    kind: type
    default: Any
    space_default: tuple
    scope: Scope
    allowed: str
    ok: Callable[[Any], bool]
    per_layer: bool = False
    listed: bool = False
    families: tuple[TaskFamily, ...] = BOTH
    narrow: Mapping[TaskFamily, FamilyValues] = dataclass_field(default_factory=dict)

    @property
    def field(self) -> str:
        """The plan field it sets."""
        return self.name[len("distill_"):] if self.scope is Scope.DISTILL else self.name

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is one allowed value of this choice."""
        return isinstance(value, bool) == (self.kind is bool) and bool(self.ok(value))

    def check(self, value: Any) -> Any:
        """``value`` if it is allowed, else a ConfigError naming the choice and what is allowed."""
        if not self.allows(value):
            raise ConfigError(f"{self.name}: {value!r} is not allowed; allowed: {self.allowed}")
        return value


_LLM = (CAUSAL_LM,)
_CLASSIFICATION = (CLASSIFICATION,)


def _share(r: Any) -> bool:
    return _number(r) and 0 < r <= 1


CHOICES: tuple[Choice, ...] = (
    Choice("prune_ratio", float, 0.0, (0.0, 0.25, 0.5, 0.75), Scope.GROUP, "numbers with 0 <= ratio < 1",
           lambda r: _number(r) and 0 <= r < 1, per_layer=True, listed=True, families=_CLASSIFICATION),
    Choice("weight_bits", int, FULL_PRECISION, (2, 3, 4, 6, 8, 32), Scope.LAYER, f"{list(WEIGHT_BITS)}",
           lambda b: b in WEIGHT_BITS, per_layer=True, listed=True,
           narrow={CAUSAL_LM: FamilyValues(LLM_WEIGHT_BITS, (4, 8, 32))}),
    Choice("act_bits", int, FULL_PRECISION, (8, 32), Scope.LAYER, f"{list(ACT_BITS)}",
           lambda b: b in ACT_BITS, per_layer=True, listed=True,
           narrow={CAUSAL_LM: FamilyValues((8, FULL_PRECISION), (FULL_PRECISION,))}),
    Choice("rank_ratio", float, 1.0, (1.0,), Scope.LAYER, "numbers with 0 < ratio <= 1 (the share of a Linear or "
           "1x1 conv's full rank kept by low-rank factorisation; 1 leaves it whole)",
           _share, per_layer=True, families=_CLASSIFICATION),
    Choice("drop", bool, False, (False,), Scope.BLOCK, "[false] or [false, true]", lambda d: True,
           families=_CLASSIFICATION),
    Choice("group_size", int, 0, (0,), Scope.EVERY_LAYER, "0 (per channel) or a positive group size",
           lambda g: isinstance(g, int) and g >= 0, narrow={CAUSAL_LM: FamilyValues(LLM_GROUP_SIZES, (128,))}),
    Choice("symmetric", bool, True, (True,), Scope.EVERY_LAYER, "true (codes around 0) or false (a zero point per group)", lambda s: True),
    Choice("sparsity", float, 0.0, (0.0,), Scope.EVERY_LAYER, "numbers with 0 <= sparsity < 1",
           lambda r: _number(r) and 0 <= r < 1, narrow={CAUSAL_LM: FamilyValues((0.0, 0.5), (0.0,))}),
    Choice("sparsity_pattern", str, "unstructured", ("unstructured",), Scope.EVERY_LAYER,
           f"{list(SPARSITY_PATTERNS)} (quote '2:4': unquoted, YAML reads it as the number 124)",
           lambda p: p in SPARSITY_PATTERNS, narrow={CAUSAL_LM: FamilyValues(("2:4",), ("2:4",))}),
    Choice("importance", str, "l1", ("l1",), Scope.PLAN, f"{list(IMPORTANCES)}",
           lambda i: i in IMPORTANCES, families=_CLASSIFICATION),
    Choice("act_calibration", str, "minmax", ("minmax",), Scope.PLAN, f"{list(ACT_CALIBRATIONS)}",
           lambda c: c in ACT_CALIBRATIONS, families=_CLASSIFICATION),
    Choice("weight_method", str, "rtn", ("rtn",), Scope.PLAN, f"{list(WEIGHT_METHODS)}",
           lambda m: m in WEIGHT_METHODS, families=_LLM),
    Choice("smooth_alpha", float, 0.5, (0.5,), Scope.PLAN, "numbers with 0 <= alpha <= 1",
           lambda a: _number(a) and 0 <= a <= 1, families=_LLM),
    Choice("kv_bits", int, FULL_PRECISION, (FULL_PRECISION,), Scope.PLAN, f"{list(KV_BITS)}",
           lambda b: b in KV_BITS, families=_LLM),
    Choice("head_bits", int, FULL_PRECISION, (FULL_PRECISION,), Scope.PLAN,
           f"{list(HEAD_BITS)} (the output projection, and a tied input embedding with it, rounded to nearest "
           f"in blocks of 64; {FULL_PRECISION}: float)", lambda b: b in HEAD_BITS, families=_LLM),
    Choice("ffn_keep", float, 1.0, (1.0,), Scope.PLAN, "numbers with 0 < share <= 1", _share, families=_LLM),
    Choice("kv_groups_keep", float, 1.0, (1.0,), Scope.PLAN, "numbers with 0 < share <= 1", _share, families=_LLM),
    Choice("hidden_keep", float, 1.0, (1.0,), Scope.PLAN, "numbers with 0 < share <= 1", _share, families=_LLM),
    Choice("drop_layers", int, 0, (0,), Scope.PLAN, "whole numbers >= 0",
           lambda n: isinstance(n, int) and n >= 0, families=_LLM),
    Choice("distill_temperature", float, 4.0, (4.0,), Scope.DISTILL, "numbers > 0",
           lambda t: _number(t) and t > 0, families=_CLASSIFICATION),
    Choice("distill_alpha", float, 0.7, (0.7,), Scope.DISTILL, "numbers with 0 <= alpha <= 1",
           lambda a: _number(a) and 0 <= a <= 1, families=_CLASSIFICATION),
    Choice("distill_lr", float, 1e-3, (1e-3,), Scope.DISTILL, "numbers > 0", lambda r: _number(r) and r > 0,
           narrow={CAUSAL_LM: FamilyValues(None, (3e-4,))}),
    Choice("distill_hidden_weight", float, 0.0, (0.0,), Scope.DISTILL,
           "numbers >= 0 (above 0 only for tasks with hidden states, e.g. minilm)",
           lambda w: _number(w) and w >= 0, families=_CLASSIFICATION),
    Choice("distill_steps", int, 0, (100, 200, 300), Scope.DISTILL, "whole numbers >= 0",
           lambda n: isinstance(n, int) and n >= 0, listed=True, narrow={CAUSAL_LM: FamilyValues(None, (0,))}),
)


def choices(*scopes: Scope) -> tuple[Choice, ...]:
    """The choices of these scopes (all when none is given), in declaration order."""
    return tuple(c for c in CHOICES if not scopes or c.scope in scopes)


def choice(name: str) -> Choice:
    """The choice named ``name``."""
    for c in CHOICES:
        if c.name == name:
            return c
    raise ConfigError(f"unknown choice {name!r}; allowed: {[c.name for c in CHOICES]}")


def layer_fields() -> tuple[Choice, ...]:
    """The choices that are fields of a layer's plan."""
    return choices(Scope.LAYER, Scope.GROUP, Scope.EVERY_LAYER)

