"""Database and tracking URLs: the embedded defaults in the job folder, redaction, the SQLite file a URL names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional


def default_storage_url(out: Path) -> str:
    """The Optuna study database of a job: SQLite in its folder."""
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def default_tracking_uri(out: Path) -> str:
    """The MLflow backend store of a job: SQLite in its folder."""
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


# scheme://user:password@ — the password stops at the '@' and never spans whitespace or quotes,
# so a URL inside longer text (a job's JSON, an error message) is redacted and nothing after it.
_USERINFO = re.compile(r"""([A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s"'<>]*:)[^@\s"'<>]*@""")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it (``scheme://user:password@``) replaced by
    ``***``: for logs, MLflow params, the job registry and error messages. A lone URL or any
    text holding URLs, such as a job's JSON."""
    return _USERINFO.sub(r"\1***@", str(text))


def sqlite_path(url: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URL; None for other databases and in-memory SQLite."""
    match = re.match(r"sqlite(?:\+\w+)?:///([^?]*)", url)
    if match is None or match.group(1) in ("", ":memory:"):
        return None
    return Path(match.group(1)).expanduser().resolve()


def __getattr__(name: str):
    """The driver locks that lived here (claim_folder, claim_sqlite, driver_gone), forwarded for one release."""
    from slimsearch._compat import moved_attribute

    return moved_attribute(__name__, name, ("slimsearch.storage.locks",))
