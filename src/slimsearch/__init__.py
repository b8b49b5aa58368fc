"""slimsearch: AutoML compression search.

Importing this package is cheap: it does not import torch, Ray, MLflow or Optuna,
start anything or open a database. Heavy parts load when a function that needs
them is called.

The functions below mirror the commands: ``run(job, **overrides)`` (``slimsearch run``),
``jobs()`` (``slimsearch jobs``), ``status(job)``, ``front(job)`` and
``export(job, out, ...)``, where ``job`` is a registry id, a job name or a job folder;
``search(space, evaluate, objectives, ...)`` searches any objective. ``jobs`` and
``search`` are also the packages of those names, and ``export`` the module
(:mod:`slimsearch._package`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from slimsearch import _compat
from slimsearch.exceptions import ConfigError, SlimSearchError

_compat.install()

__version__ = "0.1.0"
__all__ = ["ConfigError", "SlimSearchError", "__version__", "export", "front", "jobs", "run", "search", "status"]


def __getattr__(name: str) -> Any:
    # slimsearch.jobs(), slimsearch.search(...) and slimsearch.export(...): callable modules of those
    # names, imported when first used
    if name in ("jobs", "search", "export"):
        return importlib.import_module(f"slimsearch.{name}")
    raise AttributeError(f"module 'slimsearch' has no attribute {name!r}")


def run(job, **kwargs):
    """Run (or resume) a compression search job as ``slimsearch run`` does; returns its ``JobResult``.

    See :func:`slimsearch.launch.run` for the keywords (``out``, ``resume``, ``budget``,
    ``workers``, ...)."""
    from slimsearch.launch import run as run_job

    return run_job(job, **kwargs)


def status(job: str | Path):
    """The job's progress (``JobProgress``): candidates done of the budget, front size, hypervolume,
    time left."""
    from slimsearch.jobs.query import progress

    return progress(job)


def front(job: str | Path) -> list[dict]:
    """The job's Pareto front members (trial, run_id, metrics, provenance, plan, describe)."""
    from slimsearch.jobs.query import read_front

    return read_front(job)["front"]
