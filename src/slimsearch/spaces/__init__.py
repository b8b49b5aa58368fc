"""What can be chosen: per-layer choices and the CompressionPlan they make."""

from __future__ import annotations

from slimsearch.spaces.plan import CompressionPlan, DistillPlan, LayerPlan
from slimsearch.spaces.space import SearchSpace

__all__ = ["CompressionPlan", "DistillPlan", "LayerPlan", "SearchSpace"]
