"""Measured latencies to calibrate a profile on: samples, and the measurements CSV."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._layers import LayerCost, layer_costs

if TYPE_CHECKING:
    import torch

__all__ = ["MEASUREMENT_COLUMNS", "Rebuild", "Sample", "layer_samples", "load_measurements"]

Sample = tuple[Union["torch.nn.Module", Sequence[LayerCost]], Any, float]
"""``(model, example_input, measured_latency_ms)``, or ``(layer_costs, None, measured_ms)``."""

Rebuild = Callable[[str, str], tuple[Any, Any]]
"""``rebuild(task, plan_json) -> (model, batch-1 example input)``: the compressed model a
measurements row names (:func:`slimsearch.evaluators.load_measurements` passes one)."""


def layer_samples(samples: Iterable[Sample]) -> Iterable[tuple[Sequence[LayerCost], float]]:
    for index, sample in enumerate(samples):
        if not isinstance(sample, (tuple, list)) or len(sample) != 3:
            raise ConfigError(f"samples[{index}] must be (model or layer costs, example_input, "
                              f"measured_latency_ms), got {type(sample).__name__}")
        model, example_input, measured = sample
        if (isinstance(measured, bool) or not isinstance(measured, (int, float))
                or not math.isfinite(measured) or measured <= 0):
            raise ConfigError(f"samples[{index}]: measured_latency_ms must be a number > 0, got {measured!r}")
        if isinstance(model, (list, tuple)) and all(isinstance(layer, LayerCost) for layer in model):
            layers = model
        else:
            layers = layer_costs(model, example_input)
        yield layers, float(measured)


MEASUREMENT_COLUMNS = ("latency_ms", "layers", "task", "plan", "batch")
"""Columns of a measurements CSV (see :func:`load_measurements`)."""


def load_measurements(path: str | os.PathLike[str], *, rebuild: Optional[Rebuild] = None) -> list[Sample]:
    """Read a measurements CSV into calibration samples.

    One row per measured model. Columns: ``latency_ms`` (required, > 0) and either
    ``layers`` (JSON list of :meth:`LayerCost.to_dict` values) or ``task`` (a built-in
    task name or ``package.module:function``) with ``plan`` (a CompressionPlan as JSON;
    ``{}`` is the uncompressed teacher), rebuilt by ``rebuild`` and costed at ``batch``
    copies of the task's example input (``batch`` optional, default 1). Profiles know
    nothing of tasks and plans: :func:`slimsearch.evaluators.load_measurements` passes
    a ``rebuild`` that applies the plan to the task's teacher.

    Raises:
        ConfigError: Missing file, missing or unknown column, or a bad value; the message
            names the file, the row and the column.
    """
    import csv
    import json

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"measurements file {str(path)!r} does not exist")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        unknown = [c for c in header if c not in MEASUREMENT_COLUMNS]
        if unknown:
            raise ConfigError(f"{path}: header: unknown column(s) {unknown}; allowed: {list(MEASUREMENT_COLUMNS)}")
        if "latency_ms" not in header or not ("layers" in header or {"task", "plan"} <= set(header)):
            raise ConfigError(f"{path}: header: needs 'latency_ms' and either 'layers' or 'task' and 'plan', "
                              f"got {header}")
        rows = list(reader)
    samples: list[Sample] = []
    for number, row in enumerate(rows, start=2):
        where = f"{path}: row {number}"
        try:
            latency = float(row["latency_ms"])
        except (TypeError, ValueError):
            latency = float("nan")
        if not math.isfinite(latency) or latency <= 0:
            raise ConfigError(f"{where}: latency_ms: must be a number > 0, got {row['latency_ms']!r}")
        if row.get("layers"):
            try:
                layers = [LayerCost.from_dict(item) for item in json.loads(row["layers"])]
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where}: layers: must be a JSON list of layer costs ({exc})") from None
            samples.append((layers, None, latency))
            continue
        if not row.get("task") or not row.get("plan"):
            raise ConfigError(f"{where}: needs 'layers', or 'task' and 'plan'")
        batch_text = row.get("batch") or "1"
        if not batch_text.isdigit() or int(batch_text) < 1:
            raise ConfigError(f"{where}: batch: must be an int >= 1, got {batch_text!r}")
        if rebuild is None:
            raise ConfigError(f"{where}: a row naming a task and a plan needs a rebuild function; "
                              "slimsearch.evaluators.load_measurements reads such files")
        try:
            model, example = rebuild(row["task"], row["plan"])
        except (ConfigError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {' '.join(str(exc).split())}") from None
        batch = int(batch_text)
        samples.append((model, example.repeat(batch, *[1] * (example.dim() - 1)), latency))
    if len(samples) < 2:
        raise ConfigError(f"{path}: needs at least two rows of measurements, got {len(samples)}")
    return samples


