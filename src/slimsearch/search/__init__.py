"""The search driver (Ray Tune trials, Optuna samplers), the Pareto front and hypervolume.

``slimsearch.search(space, evaluate, objectives, ...)`` (this package, called: it runs
:func:`slimsearch.search.api.search`) is the Python door; ``slimsearch run``
(``slimsearch.jobs.runner.run_job``) is the job door; both run :func:`driver.run_trials`.
"""

from __future__ import annotations

from slimsearch._package import callable_package
from slimsearch.search.api import search
from slimsearch.search._online import CalibrationFit, OnlineCalibration
from slimsearch.search._types import EVALUATE_ATTR, Constraint, Range, SearchResult, TrialRecord, TrialState
from slimsearch.search.pareto import dominates, hypervolume, hypervolume_2d, pareto_front

callable_package(__name__, search)

__all__ = ["EVALUATE_ATTR", "CalibrationFit", "Constraint", "OnlineCalibration", "Range", "SearchResult", "TrialRecord",
           "TrialState", "dominates", "hypervolume", "hypervolume_2d", "pareto_front", "search"]
