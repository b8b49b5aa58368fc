"""slimsearch: AutoML compression search.

Importing this package is cheap: it does not import torch, Ray, MLflow or Optuna,
start anything or open a database. Heavy parts load when a function that needs
them is called.
"""

from __future__ import annotations

from slimsearch.exceptions import ConfigError, SlimSearchError

__version__ = "0.1.0"
__all__ = ["ConfigError", "SlimSearchError", "__version__"]
