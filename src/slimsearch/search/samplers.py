"""Sampler names to Optuna samplers."""

from __future__ import annotations

from enum import Enum

from slimsearch.exceptions import ConfigError


class Sampler(str, Enum):
    NSGA2 = "nsga2"
    TPE = "tpe"
    RANDOM = "random"


def make_sampler(name: str, *, seed: int, budget: int):
    """The Optuna sampler a name stands for, seeded; unknown names list the choices.

    NSGA-II's default population of 50 would leave a 24-trial budget as pure random
    search, so the population is sized to give at least three generations.
    """
    import optuna

    try:
        kind = Sampler(name)
    except ValueError:
        raise ConfigError(f"sampler must be one of {[s.value for s in Sampler]}, got {name!r}") from None
    if kind is Sampler.NSGA2:
        population = max(4, min(50, budget // 3))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    if kind is Sampler.TPE:
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)
