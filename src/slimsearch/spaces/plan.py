"""CompressionPlan: every choice made for one candidate, as a JSON-round-tripping value."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from slimsearch.exceptions import ConfigError

FULL_PRECISION = 32
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)
# 16-bit activations need the opset-21 QDQ export, which the deployable graph does not use yet.
ACT_BITS = (8, 32)


@dataclass(frozen=True)
class LayerPlan:
    """Choices for one layer: share of output channels removed and bit-widths."""

    prune_ratio: float = 0.0
    weight_bits: int = FULL_PRECISION
    act_bits: int = FULL_PRECISION

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ConfigError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if self.weight_bits not in WEIGHT_BITS:
            raise ConfigError(f"weight_bits must be one of {list(WEIGHT_BITS)}, got {self.weight_bits}")
        if self.act_bits not in ACT_BITS:
            raise ConfigError(f"act_bits must be one of {list(ACT_BITS)}, got {self.act_bits}")


@dataclass(frozen=True)
class DistillPlan:
    """Knowledge-distillation fine-tuning from the teacher's logits."""

    steps: int = 0
    temperature: float = 4.0
    alpha: float = 0.7
    lr: float = 1e-3
    batch_size: int = 64


@dataclass(frozen=True)
class CompressionPlan:
    """One candidate: per-layer choices, distillation settings and the seed.

    Applying a plan to the teacher is deterministic for its seed, which is what
    makes export and resume exact (DESIGN.md, "The values that flow").
    """

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    distill: DistillPlan = field(default_factory=DistillPlan)
    seed: int = 0

    def layer(self, name: str) -> LayerPlan:
        """The plan of layer ``name``; a layer the plan does not name is left as it is."""
        return self.layers.get(name, LayerPlan())

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": {name: asdict(lp) for name, lp in self.layers.items()},
            "distill": asdict(self.distill),
            "seed": self.seed,
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
        return out

    def describe(self) -> str:
        """The plan in words, for hover text and tables."""
        parts = []
        for name, lp in self.layers.items():
            bits = f"w{lp.weight_bits}a{lp.act_bits}"
            prune = f" -{lp.prune_ratio:.0%}" if lp.prune_ratio else ""
            parts.append(f"{name}:{bits}{prune}")
        parts.append(f"KD {self.distill.steps} steps")
        return ", ".join(parts)
