"""The multi-fidelity screen's rung in a job folder: the cheap point of every candidate the job has
judged, how many were promoted, and which plans the planner proposed. The driver writes it before
the first trial and after each one; a worker reads it before judging its candidate
(:class:`~slimsearch.evaluators.fidelity.Screen`). Workers must share the job folder, as for their
ONNX files (:func:`~slimsearch.jobs.folder.model_file`); one that cannot see it judges against an
empty rung, which promotes whatever meets the bound. The rung is read from the study once, when the
driver starts (a resumed job's earlier candidates count), and grows with this driver's trials."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from slimsearch._io import atomic_write

RUNG_FILE = "screen_rung.json"


class RungFile:
    """The rung of a job's driver, written to job folder ``out``: its points on ``objectives``."""

    def __init__(self, out: Path, study, objectives: Sequence[str]):
        from slimsearch.jobs.warm_start import PLANNED_ATTR
        from slimsearch.search._study import records
        from slimsearch.search._teller import _key

        self.path, self.objectives = Path(out) / RUNG_FILE, tuple(objectives)
        self.points: list[dict[str, float]] = []
        self.promoted = 0
        # the planner enqueues its plans before the driver starts: their keys are known from here on
        self.planned = sorted(_key(t.params or t.system_attrs.get("fixed_params") or {})
                              for t in study.get_trials(deepcopy=False) if t.user_attrs.get(PLANNED_ATTR))
        for record in records(study):
            self._add(record)
        self._write()

    def add(self, record) -> None:
        """Count one finished trial (a search ``TrialRecord``) and rewrite the file."""
        if self._add(record):
            self._write()

    def _add(self, record) -> bool:
        from slimsearch.evaluators.fidelity import cheap_point

        point = cheap_point(record.values, self.objectives)
        if point is not None:
            self.points.append(point)
            self.promoted += record.state.value == "complete"
        return point is not None

    def _write(self) -> None:
        atomic_write(self.path, json.dumps({"points": self.points, "promoted": self.promoted, "planned": self.planned}))


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
