"""SearchSpace: the job's choices laid over a task's layers, sampled into plans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import CompressionPlan, DistillPlan, LayerPlan

if TYPE_CHECKING:
    import optuna

    from slimsearch.job import SpaceSpec


@dataclass(frozen=True)
class SearchSpace:
    """Per-layer choices for every quantizable layer; prune ratios for prunable ones.

    Built from a job's ``space`` section and the layer names of the task's teacher.
    Parameter names are ``<choice>.<layer>`` (``weight_bits.conv2``) and
    ``distill_steps``; they are what Optuna records and what MLflow shows.
    """

    layers: tuple[str, ...]
    prunable: tuple[str, ...]
    choices: tuple[tuple[str, tuple], ...]  # (param name, choices), in a fixed order
    seed: int = 0

    @classmethod
    def build(cls, spec: "SpaceSpec", layers: Sequence[str], prunable: Sequence[str], *, seed: int = 0) -> "SearchSpace":
        unknown = sorted(set(spec.layers) - set(layers))
        if unknown:
            raise ConfigError(f"space.layers: unknown layer {unknown[0]!r}; allowed: {list(layers)}")
        choices: list[tuple[str, tuple]] = []
        for layer in layers:
            own = spec.layers.get(layer)
            for key in ("prune_ratio", "weight_bits", "act_bits"):
                if key == "prune_ratio" and layer not in prunable:
                    if own is not None and own.prune_ratio not in (None, [0.0], [0]):
                        raise ConfigError(
                            f"space.layers.{layer}.prune_ratio: layer {layer!r} cannot be pruned "
                            f"(its outputs are the model's outputs); prunable layers: {list(prunable)}"
                        )
                    continue
                values = getattr(own, key, None) if own is not None else None
                values = values if values is not None else getattr(spec, key)
                choices.append((f"{key}.{layer}", tuple(sorted(set(values)))))
        choices.append(("distill_steps", tuple(sorted(set(spec.distill_steps)))))
        return cls(layers=tuple(layers), prunable=tuple(prunable), choices=tuple(choices), seed=seed)

    def suggest(self, trial: "optuna.Trial") -> CompressionPlan:
        """Ask ``trial`` for one value of every choice and return the plan."""
        params = {name: trial.suggest_categorical(name, list(values)) for name, values in self.choices}
        return self.plan_from_params(params)

    def plan_from_params(self, params: dict) -> CompressionPlan:
        """The plan that a dict of parameter values (as Optuna records them) stands for."""
        layers = {}
        for layer in self.layers:
            layers[layer] = LayerPlan(
                prune_ratio=float(params.get(f"prune_ratio.{layer}", 0.0)),
                weight_bits=int(params.get(f"weight_bits.{layer}", 32)),
                act_bits=int(params.get(f"act_bits.{layer}", 32)),
            )
        return CompressionPlan(
            layers=layers, distill=DistillPlan(steps=int(params.get("distill_steps", 0))), seed=self.seed
        )

    @property
    def size(self) -> int:
        """How many distinct plans the space holds."""
        total = 1
        for _, values in self.choices:
            total *= len(values)
        return total
