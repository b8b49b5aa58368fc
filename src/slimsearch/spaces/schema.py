"""The job file's ``space``: its schema, derived from the choice table.

Every field of :class:`SpaceSpec` is a list of values to search for one choice of
:data:`slimsearch.spaces.choices.CHOICES` (a single value is fixed, not searched), and
``layers`` overrides the per-layer choices for named layers (:class:`LayerChoices`);
``per_block`` (causal-LM tasks) chooses weight bits per block's linear group, not per group.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, create_model, field_validator

from slimsearch.spaces.choices import CHOICES, choice


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def _validate_choices(v: Any, info) -> Optional[list]:
    if v is None:  # a per-layer override that leaves this choice to the space
        return None
    c = choice(info.field_name)
    values = _as_list(v)
    if not values:
        raise ValueError(f"{c.name} needs at least one choice; allowed: {c.allowed}")
    for value in values:
        if not c.allows(value):
            raise ValueError(f"{c.name} choice {value!r} is not allowed; allowed: {c.allowed}")
    return values


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_PER_LAYER = [c for c in CHOICES if c.per_layer]

LayerChoices = create_model(
    "LayerChoices", __base__=_Frozen, __module__=__name__,
    __doc__="Choices for one layer; ``None`` means 'as the space's defaults'.",
    __validators__={"_choices": field_validator(*[c.name for c in _PER_LAYER], mode="before")(_validate_choices)},
    **{c.name: (Optional[list[c.kind]], None) for c in _PER_LAYER},
)

SpaceSpec = create_model(
    "SpaceSpec", __base__=LayerChoices, __module__=__name__,
    __doc__="The search space: the values to search for every choice, and per-layer overrides.\n\n"
            "A choice with a single value is fixed, not searched.",
    __validators__={"_space_choices": field_validator(*[c.name for c in CHOICES if not c.per_layer],
                                                      mode="before")(_validate_choices)},
    layers=(dict[str, LayerChoices], {}),
    per_block=(bool, False),
    **{c.name: (Optional[list[c.kind]] if c.per_layer else list[c.kind], list(c.space_default)) for c in CHOICES},
)
