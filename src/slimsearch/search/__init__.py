"""The search driver (Ray Tune trials, Optuna samplers), the Pareto front and hypervolume."""

from __future__ import annotations

from slimsearch.search.pareto import dominates, hypervolume_2d, pareto_front

__all__ = ["dominates", "hypervolume_2d", "pareto_front"]
