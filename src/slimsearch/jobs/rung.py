"""The multi-fidelity screen's rung in a job folder: the cheap point of every candidate the job has
judged, how many were promoted, and which plans the planner proposed. The driver writes it before
the first trial and after each one; a worker reads it before judging its candidate
(:class:`~slimsearch.evaluators.fidelity.Screen`). Workers must share the job folder, as for their
ONNX files (:func:`~slimsearch.jobs.folder.model_file`); one that cannot see it judges against an
empty rung, which promotes whatever meets the bound."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

from slimsearch._io import atomic_write

RUNG_FILE = "screen_rung.json"


def write_rung(out: Path, study, objectives: Mapping[str, str]) -> None:
    """Write the rung of ``study`` (its trials' cheap points on ``objectives``) to job folder ``out``."""
    from slimsearch.evaluators.fidelity import CHEAP_INCREASE
    from slimsearch.jobs.warm_start import PLANNED_ATTR
    from slimsearch.search._study import records
    from slimsearch.search._teller import _key

    points, promoted = [], 0
    for record in records(study):
        if not _finite(record.values.get(CHEAP_INCREASE)):
            continue
        points.append({k: float(record.values[k]) for k in (CHEAP_INCREASE, *objectives)
                       if _finite(record.values.get(k))})
        promoted += record.state.value == "complete"
    planned = sorted(_key(t.params or t.system_attrs.get("fixed_params") or {})
                     for t in study.get_trials(deepcopy=False) if t.user_attrs.get(PLANNED_ATTR))
    atomic_write(Path(out) / RUNG_FILE, json.dumps({"points": points, "promoted": promoted, "planned": planned}))


def read_rung(out, params: Mapping):
    """The :class:`~slimsearch.evaluators.fidelity.Rung` a worker judges the candidate ``params``
    against: what job folder ``out`` holds (an empty rung where it holds none)."""
    from slimsearch.evaluators.fidelity import Rung
    from slimsearch.search._teller import _key

    path = Path(out) / RUNG_FILE if out is not None else None
    if path is None or not path.is_file():
        return Rung()
    data = json.loads(path.read_text())
    return Rung(points=tuple(data["points"]), promoted=int(data["promoted"]), planned=_key(params) in data["planned"])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
