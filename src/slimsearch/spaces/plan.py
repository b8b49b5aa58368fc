"""CompressionPlan: every choice made for one candidate, as a JSON-round-tripping value."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Any, Mapping

from slimsearch.exceptions import ConfigError
from slimsearch.spaces.choices import (  # noqa: F401 - re-exported: the plan's vocabulary
    ACT_BITS,
    ACT_CALIBRATIONS,
    FULL_PRECISION,
    IMPORTANCES,
    SPARSITY_PATTERNS,
    WEIGHT_BITS,
    Scope,
    choice,
    choices,
    layer_fields,
)
from slimsearch.metric_names import TaskFamily

DESCRIBE_LAYERS = 8  # plans with more changed layers are described by counts


def _check_layer(self) -> None:
    for c in layer_fields():
        c.check(getattr(self, c.name))
    if self.sparsity_pattern == "2:4" and self.sparsity not in (0.0, 0.5):
        raise ConfigError("sparsity_pattern '2:4' zeroes exactly half of the weights, so sparsity must be "
                          f"0.5 (or 0 for dense), got {self.sparsity}")


LayerPlan = make_dataclass(
    "LayerPlan", [(c.name, c.kind, field(default=c.default)) for c in layer_fields()], frozen=True,
    namespace={"__post_init__": _check_layer, "__module__": __name__, "__doc__": """Choices for one layer (or prunable group).

    Its fields are the per-layer choices of :data:`slimsearch.spaces.choices.CHOICES`
    (``weight_bits``, ``act_bits``, ``prune_ratio``, ``group_size``, ``sparsity``,
    ``sparsity_pattern``, ``symmetric``, and those that methods add), each defaulting to
    the value that leaves the layer as it is.
    """})


@dataclass(frozen=True)
class DistillPlan:
    """Knowledge-distillation fine-tuning from the teacher's logits."""

    steps: int = 0
    temperature: float = choice("distill_temperature").default
    alpha: float = choice("distill_alpha").default
    lr: float = choice("distill_lr").default
    batch_size: int = 64
    hidden_weight: float = choice("distill_hidden_weight").default  # hidden-state matching (transformers)
    eval_every: int = 0  # report the metric every this many steps (0: only at the end)


# The model-wide choices (Scope.PLAN) are fields of the plan, each defaulting to the value that leaves
# the model as it is: the choice table declares them, so a new one needs nothing here.
_PlanChoices = make_dataclass(
    "_PlanChoices", [(c.field, c.kind, field(default=c.default)) for c in choices(Scope.PLAN)], frozen=True,
    namespace={"__module__": __name__, "__doc__": "The plan's model-wide choices (see CompressionPlan)."})


@dataclass(frozen=True)
class CompressionPlan(_PlanChoices):
    """One candidate: per-layer choices, distillation settings and the seed.

    Its model-wide choices (``importance``, ``act_calibration``, ``weight_method``,
    ``kv_bits``, ``ffn_keep``, ...) are the PLAN-scope entries of
    :data:`slimsearch.spaces.choices.CHOICES`, each a field with the default that
    leaves the model as it is. Applying a plan to the teacher is deterministic for its
    seed, which is what makes export and resume exact (DESIGN.md, "The values that flow").
    """

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    distill: DistillPlan = field(default_factory=DistillPlan)
    seed: int = 0
    drop: tuple[str, ...] = ()  # blocks/layers removed whole (depth)
    # profile -> power mode its figures are modelled at, for the profiles whose modes the
    # job lists; any other profile is modelled at its default mode.
    power_modes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.power_modes, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.power_modes.items()):
            raise ConfigError(f"power_modes must map profile names to power mode names, got {self.power_modes!r}")
        for c in choices(Scope.PLAN):
            value = getattr(self, c.field)
            if not c.allows(value):
                raise ConfigError(f"{c.field} must be one of {c.allowed}, got {value!r}")

    def model_wide(self) -> dict[str, Any]:
        """The model-wide choices, by field name."""
        return {c.field: getattr(self, c.field) for c in choices(Scope.PLAN)}

    def layer(self, name: str) -> LayerPlan:
        """The plan of layer ``name``; a layer the plan does not name is left as it is."""
        return self.layers.get(name, LayerPlan())

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": {name: asdict(lp) for name, lp in self.layers.items()},
            "distill": asdict(self.distill),
            "seed": self.seed,
            "drop": list(self.drop),
            **self.model_wide(),
            "power_modes": dict(self.power_modes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompressionPlan":
        try:
            return cls(
                layers={name: LayerPlan(**lp) for name, lp in data.get("layers", {}).items()},
                distill=DistillPlan(**data.get("distill", {})),
                seed=int(data.get("seed", 0)),
                drop=tuple(data.get("drop", ())),
                **{c.field: data.get(c.field, c.default) for c in choices(Scope.PLAN)},  # older plans lack some
                power_modes=data.get("power_modes", {}),
            )
        except TypeError as exc:
            raise ConfigError(f"plan: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> "CompressionPlan":
        return cls.from_dict(json.loads(text))

    def flat_params(self) -> dict[str, str]:
        """The plan flattened to ``name -> value`` strings, as MLflow params take them."""
        out = {f"{key}.{name}": str(value) for name, lp in self.layers.items() for key, value in asdict(lp).items()}
        out.update({f"distill.{key}": str(value) for key, value in asdict(self.distill).items()})
        out["seed"] = str(self.seed)
        out["drop"] = ",".join(self.drop)
        out.update({name: str(value) for name, value in self.model_wide().items()})
        out.update({f"power_mode.{profile}": mode for profile, mode in self.power_modes.items()})
        return out

    def describe(self) -> str:
        """The plan in words, for hover text and tables.

        Up to ``DESCRIBE_LAYERS`` layers: each one's bits and prune ratio. More (a
        transformer's 36 Linear layers): how many layers have each bit-width pair
        and how many groups each prune ratio, so the line stays readable. Layers and
        groups the plan leaves as they are (float, unpruned, dense) are not listed.
        """
        changed = {name: lp for name, lp in self.layers.items()
                   if lp.weight_bits < FULL_PRECISION or lp.act_bits < FULL_PRECISION or lp.prune_ratio or lp.sparsity}
        parts = []
        if len(changed) <= DESCRIBE_LAYERS:
            for name, lp in changed.items():
                bits = f"w{lp.weight_bits}a{lp.act_bits}"
                prune = f" -{lp.prune_ratio:.0%}" if lp.prune_ratio else ""
                parts.append(f"{name}:{bits}{prune}")
        else:
            bits = Counter(f"w{lp.weight_bits}a{lp.act_bits}" for lp in changed.values()
                           if lp.weight_bits < FULL_PRECISION or lp.act_bits < FULL_PRECISION)
            prunes = Counter(lp.prune_ratio for lp in changed.values() if lp.prune_ratio)
            parts += [f"{n} layers {pair}" for pair, n in sorted(bits.items())]
            parts += [f"{n} groups -{ratio:.0%}" for ratio, n in sorted(prunes.items())]
        if self.drop:
            parts.append(f"drop {'+'.join(self.drop)}")
        # a decoder LLM's model-wide choices (cuts, KV cache, weight method), where not as they leave it
        parts += [f"{c.field} {getattr(self, c.field)}" for c in choices(Scope.PLAN)
                  if c.families == (TaskFamily.CAUSAL_LM,) and getattr(self, c.field) != c.default]
        parts.append(f"KD {self.distill.steps} steps")
        parts += [f"{profile} at {mode}" for profile, mode in sorted(self.power_modes.items())]
        return ", ".join(parts)
