"""Sampler names to samplers: Optuna's own, and ``auto``, slimsearch's estimate-aware one."""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Mapping, Optional, Sequence

from slimsearch.exceptions import ConfigError


class Sampler(str, Enum):
    NSGA2 = "nsga2"
    TPE = "tpe"
    RANDOM = "random"
    GP = "gp"
    AUTO = "auto"


def make_sampler(name: str, *, seed: int, budget: int, estimate: Optional[Callable[[dict], dict]] = None,
                 constraints: Sequence = (), space: Optional[Mapping[str, Any]] = None):
    """The sampler a name stands for, seeded; unknown names list the choices.

    NSGA-II's default population of 50 would leave a 24-trial budget as pure random
    search, so the population is sized to give at least three generations. Constraints
    reach Optuna's samplers through each trial's ``Trial.set_constraint`` (the driver sets
    them; Optuna 5 deprecated the samplers' ``constraints_func``). Only ``auto`` uses
    ``estimate``; ``space`` (the search's dimensions) lets it plan its first trials before
    any has run.
    """
    import optuna

    from slimsearch.search.driver import Constraint

    try:
        kind = Sampler(name)
    except ValueError:
        raise ConfigError(f"sampler must be one of {[s.value for s in Sampler]}, got {name!r}") from None
    constraints = tuple(Constraint.parse(c) for c in constraints)
    if kind is Sampler.NSGA2:
        population = max(4, min(50, budget // 3))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    if kind is Sampler.TPE:
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if kind is Sampler.GP:
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    if kind is Sampler.AUTO:
        from slimsearch.search._front import FrontSampler

        return FrontSampler(seed=seed, estimate=estimate, constraints=constraints, space=space)
    return optuna.samplers.RandomSampler(seed=seed)


def _distributions(space: Mapping[str, Any]) -> dict:
    """The Optuna distributions ``driver.suggest`` creates for ``space``."""
    import optuna.distributions as od

    from slimsearch.search.driver import Range

    out = {}
    for name, dim in space.items():
        if isinstance(dim, Range):
            if dim.integer:
                out[name] = od.IntDistribution(dim.low, dim.high, log=dim.log, step=dim.step or 1)
            else:
                out[name] = od.FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
        else:
            out[name] = od.CategoricalDistribution(list(dim))
    return out
