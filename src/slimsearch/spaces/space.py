"""SearchSpace: the job's choices laid over a task's layers, sampled into plans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from slimsearch.exceptions import ConfigError
from slimsearch.metric_names import TaskFamily
from slimsearch.spaces.choices import CHOICES, FULL_PRECISION, Choice, Scope, layer_fields
from slimsearch.spaces.choices import choices as choices_of
from slimsearch.spaces.plan import CompressionPlan, DistillPlan, LayerPlan

if TYPE_CHECKING:
    import optuna


# ``power_mode.<profile>``: the power mode a profile's figures are modelled at.
POWER_MODE_PREFIX = "power_mode."
MODEL_WIDE = (Scope.EVERY_LAYER, Scope.PLAN, Scope.DISTILL)


@dataclass(frozen=True)
class SearchSpace:
    """The job's choices laid over a task's layers, prunable groups and droppable blocks.

    Parameter names are ``weight_bits.<layer>``, ``act_bits.<layer>``,
    ``prune_ratio.<group>``, ``drop.<block>``, ``power_mode.<profile>`` and model-wide
    names (``distill_steps``, ``sparsity``, ...); they are what Optuna records and what
    MLflow shows. A choice with one value is fixed: it is in the plan but not searched.
    """

    layers: tuple[str, ...]
    prunable: tuple[str, ...]
    choices: tuple[tuple[str, tuple], ...]  # (param name, choices), in a fixed order
    seed: int = 0
    droppable: tuple[str, ...] = ()
    fixed: tuple[tuple[str, object], ...] = ()  # model-wide choices with a single value

    @classmethod
    def build(cls, spec: Any, layers: Sequence[str], prunable: Sequence[str], *,
              droppable: Sequence[str] = (), seed: int = 0,
              power_modes: Mapping[str, Sequence[str]] | None = None) -> "SearchSpace":
        """Lay ``spec`` (a job's ``space``: a value per choice name, and per-layer overrides in
        ``spec.layers``) over a model's layers; ``power_modes`` maps profiles to the modes the job lists."""
        named = list(dict.fromkeys([*layers, *prunable]))
        unknown = sorted(set(spec.layers) - set(named))
        if unknown:
            raise ConfigError(f"space.layers: unknown layer {unknown[0]!r}; allowed: {named}")
        choices: list[tuple[str, tuple]] = []
        fixed: list[tuple[str, object]] = []

        def values_for(c: Choice, name: Optional[str] = None) -> tuple:
            own = spec.layers.get(name) if (name is not None and c.per_layer) else None
            values = getattr(own, c.name, None) if own is not None else None
            return tuple(sorted(set(values if values is not None else getattr(spec, c.name))))

        def add(c: Choice, key: str, values: tuple) -> None:
            if c.listed or len(values) > 1:
                choices.append((key, values))
            elif values[0] != c.default:
                fixed.append((key, values[0]))

        for layer in layers:
            for c in choices_of(Scope.LAYER):
                add(c, f"{c.name}.{layer}", values_for(c, layer))
        for name, own in spec.layers.items():
            if name not in prunable and own.prune_ratio not in (None, [0.0], [0]):
                raise ConfigError(
                    f"space.layers.{name}.prune_ratio: {name!r} cannot be pruned (its outputs are the "
                    f"model's outputs, or it is tied to such a layer); prunable layers: {list(prunable)}")
        for group in prunable:
            for c in choices_of(Scope.GROUP):
                add(c, f"{c.name}.{group}", values_for(c, group))
        for c in choices_of(Scope.BLOCK):
            if len(values_for(c)) > 1:
                choices += [(f"{c.name}.{block}", (False, True)) for block in droppable]
        for c in choices_of(*MODEL_WIDE):
            values = values_for(c)
            if c.listed or len(values) > 1:
                choices.append((c.name, values))
            else:
                fixed.append((c.name, values[0]))
        for profile, modes in (power_modes or {}).items():
            modes = tuple(dict.fromkeys(modes))
            if not modes:
                raise ConfigError(f"power_modes of {profile!r} needs at least one mode, got none")
            if len(modes) > 1:
                choices.append((POWER_MODE_PREFIX + profile, modes))
            else:
                fixed.append((POWER_MODE_PREFIX + profile, modes[0]))
        return cls(layers=tuple(layers), prunable=tuple(prunable), choices=tuple(choices), seed=seed,
                   droppable=tuple(droppable), fixed=tuple(fixed))

    def suggest(self, trial: "optuna.Trial") -> CompressionPlan:
        """Ask ``trial`` for one value of every choice and return the plan."""
        params = {name: trial.suggest_categorical(name, list(values)) for name, values in self.choices}
        return self.plan_from_params(params)

    def plan_from_params(self, params: dict) -> CompressionPlan:
        """The plan that a dict of parameter values (as Optuna records them) stands for."""
        values = {**dict(self.fixed), **params}
        layers = {}
        for name in dict.fromkeys([*self.layers, *self.prunable]):
            fields = {c.name: c.kind(values.get(c.name if c.scope is Scope.EVERY_LAYER else f"{c.name}.{name}",
                                                c.default))
                      for c in layer_fields()}
            if fields["sparsity_pattern"] == "2:4" and fields["sparsity"] > 0:
                fields["sparsity"] = 0.5  # 2:4 always zeroes half of the weights
            layers[name] = LayerPlan(**fields)
        drop = tuple(b for b in self.droppable if values.get(f"drop.{b}", False))
        distill = DistillPlan(**{c.field: c.kind(values[c.name]) for c in choices_of(Scope.DISTILL) if c.name in values})
        return CompressionPlan(
            layers=layers, distill=distill, seed=self.seed, drop=drop,
            **{c.field: c.kind(values.get(c.name, c.default)) for c in choices_of(Scope.PLAN)},
            power_modes={k[len(POWER_MODE_PREFIX):]: str(values[k]) for k in self._names()
                         if k.startswith(POWER_MODE_PREFIX)},
        )

    def _names(self) -> list[str]:
        return [name for name, _ in (*self.fixed, *self.choices)]

    @property
    def size(self) -> int:
        """How many distinct plans the space holds."""
        total = 1
        for _, values in self.choices:
            total *= len(values)
        return total


def fit_space(spec: Any, family: TaskFamily) -> Any:
    """The job's ``space`` (a :class:`~slimsearch.spaces.schema.SpaceSpec`) as a task of ``family``
    reads it.

    A choice that no method of the family reads (``Choice.families``) must stay at its default,
    in the space and in its per-layer overrides; a choice the family narrows (``Choice.narrow``)
    must keep to the values it allows, and takes the family's default list where the job file
    does not set it (a causal LM's weights default to ``[4, 8, 32]`` bits, not the CNN list).
    Raises ConfigError naming the field and what is allowed.
    """
    family = TaskFamily(family)
    given = spec.model_fields_set
    if spec.per_block:
        _check_per_block(spec, family)
    updates: dict[str, list] = {}
    for c in CHOICES:
        places = [(f"space.{c.name}", getattr(spec, c.name))] if c.name in given else []
        if c.per_layer:
            places += [(f"space.layers.{layer}.{c.name}", getattr(own, c.name)) for layer, own in spec.layers.items()
                       if getattr(own, c.name) is not None]
        if family not in c.families:
            for where, values in places:
                if any(v != c.default for v in values):
                    users = ", ".join(f.value for f in c.families)
                    raise ConfigError(f"{where}: a {family.value} task does not use {c.name} (a {users} task does); "
                                      f"allowed: [{c.default!r}], or leave it out")
            if list(getattr(spec, c.name) or [c.default]) != [c.default]:
                updates[c.name] = [c.default]
            continue
        narrow = c.narrow.get(family)
        if narrow is None:
            continue
        for where, values in places:
            bad = [v for v in values if narrow.allowed is not None and v not in narrow.allowed]
            if bad:
                raise ConfigError(f"{where}: {bad[0]!r} is not allowed for a {family.value} task; "
                                  f"allowed: {list(narrow.allowed)}")
        if c.name not in given:
            updates[c.name] = list(narrow.space_default)
    return spec.model_copy(update=updates) if updates else spec


def _check_per_block(spec: Any, family: TaskFamily) -> None:
    """``per_block`` is a causal LM's, and keeps activations float (SmoothQuant is chosen per group)."""
    if family is not TaskFamily.CAUSAL_LM:
        raise ConfigError(f"space.per_block: a {family.value} task has no blocks of linear groups; allowed: false "
                          "(true is for causal-lm tasks)")
    places = [("space.act_bits", spec.act_bits)] if "act_bits" in spec.model_fields_set else []
    places += [(f"space.layers.{name}.act_bits", own.act_bits) for name, own in spec.layers.items()]
    for where, values in places:
        if values is not None and any(v != FULL_PRECISION for v in values):
            raise ConfigError(f"{where}: per_block weight bits keep activations float; allowed: "
                              f"[{FULL_PRECISION}] with per_block: true (SmoothQuant is chosen per group: per_block: false)")
