"""Database and tracking URLs: embedded defaults in the job folder, redaction for logs."""

from __future__ import annotations

import re
from pathlib import Path


def default_storage_url(out: Path) -> str:
    """The Optuna study database of a job: SQLite in its folder."""
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def default_tracking_uri(out: Path) -> str:
    """The MLflow backend store of a job: SQLite in its folder."""
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs, params and errors."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)
