"""The search driver (Ray Tune trials, Optuna samplers), the Pareto front and hypervolume.

``search(space, evaluate, objectives, ...)`` is the Python door; ``slimsearch run``
(``job_runner.run_job``) is the job door; both run :func:`driver.run_trials`.
"""

from __future__ import annotations

from slimsearch.search.api import search
from slimsearch.search._types import Constraint, Range, SearchResult, TrialRecord, TrialState
from slimsearch.search.pareto import dominates, hypervolume, hypervolume_2d, pareto_front

__all__ = ["Constraint", "Range", "SearchResult", "TrialRecord", "TrialState", "dominates", "hypervolume",
           "hypervolume_2d", "pareto_front", "search"]
