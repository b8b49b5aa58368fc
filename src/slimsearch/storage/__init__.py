"""Where results live: the Optuna study database URL and the MLflow tracking store."""

from __future__ import annotations

from slimsearch.storage.urls import default_storage_url, default_tracking_uri, redact

__all__ = ["default_storage_url", "default_tracking_uri", "redact"]
