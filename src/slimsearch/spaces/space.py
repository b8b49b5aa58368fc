"""SearchSpace: the job's choices laid over a task's layers, sampled into plans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import CompressionPlan, DistillPlan, LayerPlan

if TYPE_CHECKING:
    import optuna

    from slimsearch.job import SpaceSpec


# Model-wide choices, by their job-file key (a single value is fixed, not searched).
# The distillation ones set the DistillPlan field named after the prefix.
DISTILL_PREFIX = "distill_"
DISTILL_CHOICES = ("distill_temperature", "distill_alpha", "distill_lr", "distill_hidden_weight")
GLOBAL_CHOICES = ("group_size", "sparsity", "sparsity_pattern", "importance", "act_calibration", *DISTILL_CHOICES)
# ``power_mode.<profile>``: the power mode a profile's figures are modelled at.
POWER_MODE_PREFIX = "power_mode."


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
    def build(cls, spec: "SpaceSpec", layers: Sequence[str], prunable: Sequence[str], *,
              droppable: Sequence[str] = (), seed: int = 0,
              power_modes: Mapping[str, Sequence[str]] | None = None) -> "SearchSpace":
        """Lay ``spec`` over a model's layers; ``power_modes`` maps profiles to the modes the job lists."""
        named = list(dict.fromkeys([*layers, *prunable]))
        unknown = sorted(set(spec.layers) - set(named))
        if unknown:
            raise ConfigError(f"space.layers: unknown layer {unknown[0]!r}; allowed: {named}")
        choices: list[tuple[str, tuple]] = []

        def values_for(name: str, key: str):
            own = spec.layers.get(name)
            values = getattr(own, key, None) if own is not None else None
            return tuple(sorted(set(values if values is not None else getattr(spec, key))))

        for layer in layers:
            for key in ("weight_bits", "act_bits"):
                choices.append((f"{key}.{layer}", values_for(layer, key)))
        for name, own in spec.layers.items():
            if name not in prunable and own.prune_ratio not in (None, [0.0], [0]):
                raise ConfigError(
                    f"space.layers.{name}.prune_ratio: {name!r} cannot be pruned (its outputs are the "
                    f"model's outputs, or it is tied to such a layer); prunable layers: {list(prunable)}")
        for group in prunable:
            choices.append((f"prune_ratio.{group}", values_for(group, "prune_ratio")))
        if len(set(spec.drop)) > 1:
            choices += [(f"drop.{block}", (False, True)) for block in droppable]
        fixed = []
        for key in GLOBAL_CHOICES:
            values = tuple(sorted(set(getattr(spec, key))))
            if len(values) > 1:
                choices.append((key, values))
            else:
                fixed.append((key, values[0]))
        choices.append(("distill_steps", tuple(sorted(set(spec.distill_steps)))))
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
        glob = {**dict(self.fixed), **{k: params[k] for k in GLOBAL_CHOICES if k in params}}
        layers = {}
        for name in dict.fromkeys([*self.layers, *self.prunable]):
            layers[name] = LayerPlan(
                prune_ratio=float(params.get(f"prune_ratio.{name}", 0.0)),
                weight_bits=int(params.get(f"weight_bits.{name}", 32)),
                act_bits=int(params.get(f"act_bits.{name}", 32)),
                group_size=int(glob.get("group_size", 0)),
                sparsity=_sparsity(glob),
                sparsity_pattern=str(glob.get("sparsity_pattern", "unstructured")),
            )
        drop = tuple(b for b in self.droppable if params.get(f"drop.{b}", False))
        distill = DistillPlan(steps=int(params.get("distill_steps", 0)),
                              **{k[len(DISTILL_PREFIX):]: float(glob[k]) for k in DISTILL_CHOICES if k in glob})
        modes = {k: v for k, v in self.fixed if k.startswith(POWER_MODE_PREFIX)}
        modes.update({k: params[k] for k, _ in self.choices if k.startswith(POWER_MODE_PREFIX)})
        return CompressionPlan(
            layers=layers, distill=distill, seed=self.seed,
            drop=drop, importance=str(glob.get("importance", "l1")),
            act_calibration=str(glob.get("act_calibration", "minmax")),
            power_modes={k[len(POWER_MODE_PREFIX):]: str(v) for k, v in modes.items()},
        )

    @property
    def size(self) -> int:
        """How many distinct plans the space holds."""
        total = 1
        for _, values in self.choices:
            total *= len(values)
        return total


def _sparsity(choices: dict) -> float:
    """The sparsity a plan gets: 2:4 always zeroes half of the weights (when sparsity is asked for)."""
    sparsity = float(choices.get("sparsity", 0.0))
    if choices.get("sparsity_pattern") == "2:4" and sparsity > 0:
        return 0.5
    return sparsity
