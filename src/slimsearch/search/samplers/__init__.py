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
                 constraints: Sequence = (), space: Optional[Mapping[str, Any]] = None, calibration=None):
    """The sampler a name stands for, seeded; unknown names list the choices.

    NSGA-II's default population of 50 would leave a 24-trial budget as pure random
    search, so the population is sized to give at least three generations. Constraints
    reach Optuna's samplers through each trial's ``Trial.set_constraint`` (the driver sets
    them; Optuna 5 deprecated the samplers' ``constraints_func``). Only ``auto`` uses
    ``estimate`` (``calibration``, an :class:`~slimsearch.search.OnlineCalibration`, corrects
    it where it is judged against constraints); ``space`` (the
    search's dimensions) lets it plan its first trials before any has run.
    """
    import optuna

    from slimsearch.search._types import Constraint

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
        from slimsearch.search.samplers.auto import FrontSampler

        # a fifth of the budget (5 to 20 trials) samples the space before the surrogates steer
        return FrontSampler(seed=seed, estimate=estimate, constraints=constraints, space=space,
                            n_startup=min(20, max(5, budget // 5)), calibration=calibration)
    return optuna.samplers.RandomSampler(seed=seed)


def seeded_at_first_trial(build: Callable[[int], Any], seed: int):
    """A sampler that calls ``build(seed + n)`` at this driver's first trial, numbered ``n``.

    A driver starting a study gets ``seed`` (so a run repeats for a seed); a resumed one
    ``seed`` plus the trials already asked (so it does not propose its first plans again);
    and drivers sharing a study each get their own, since the storage numbers every trial
    once: seeded alike they would propose the same plans. (Optuna's ``reseed_rng``, its
    answer for threads, draws from the OS and would end repeatable runs.)
    """
    from optuna.samplers import BaseSampler

    class _FirstTrialSeeded(BaseSampler):
        def __init__(self):
            self.sampler = None

        def before_trial(self, study, trial) -> None:
            if self.sampler is None:
                self.sampler = build(seed + trial.number)
            self.sampler.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.sampler.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.sampler.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.sampler.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            if self.sampler is not None:  # None: a trial of an earlier driver, told on resume
                self.sampler.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            if self.sampler is not None:
                self.sampler.reseed_rng()

    return _FirstTrialSeeded()
