"""Plan -> compressed model -> Metrics: prune, quantize, distill, measure."""

from __future__ import annotations

from slimsearch._device import resolve_device
from slimsearch.evaluators.candidate import apply_plan, evaluate, model_metrics, score
from slimsearch.evaluators.metrics import Metrics, Provenance
from slimsearch.structures.channels import fold_batchnorm, prunable_layers, prune_channels

__all__ = [
    "Metrics", "Provenance", "apply_plan", "evaluate", "fold_batchnorm", "model_metrics",
    "prunable_layers", "prune_channels", "resolve_device", "score",
]
