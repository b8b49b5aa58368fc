"""Plan -> compressed nn.Module: the registered compression methods, run in order.

Importing this package does not import torch; the methods load when first used.
"""

from __future__ import annotations

from slimsearch.compress.apply import apply_plan, finalize
from slimsearch.compress.registry import (
    Context,
    Method,
    apply_config,
    config_from_json,
    config_to_json,
    methods,
    plan_configs,
    register,
)

__all__ = ["Context", "Method", "apply_config", "apply_plan", "config_from_json", "config_to_json", "finalize",
           "methods", "plan_configs", "register"]
